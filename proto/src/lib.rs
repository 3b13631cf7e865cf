//! The gRPC admin API of chatd, shared by the daemon (server side) and
//! `chatctl` (client side).
//!
//! Layout:
//! - `chatd/admin/v1/admin.proto` (beside this crate) is the source of truth;
//!   [`admin::v1`] is the code generated from it at build time.
//! - [`FILE_DESCRIPTOR_SET`] feeds gRPC server reflection, so `grpcurl` works
//!   without the `.proto` file.
//! - [`token`] says where the zero-config admin token lives, so the daemon
//!   writes it where `chatctl` looks.

pub mod token;

pub use token::{AdminAddr, default_token_dirs, default_token_write_dir};

/// Generated code, one module per protobuf package.
pub mod admin {
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/chatd.admin.v1.rs"));
    }
}

/// The encoded `FileDescriptorSet` of `chatd.admin.v1`, for
/// `tonic_reflection::server::Builder::register_encoded_file_descriptor_set`.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/chatd_admin_v1.bin"));

#[cfg(test)]
mod tests {
    use prost::Message;

    #[test]
    fn descriptor_set_names_the_admin_service() {
        let set = prost_types::FileDescriptorSet::decode(super::FILE_DESCRIPTOR_SET)
            .expect("the build script wrote a valid descriptor set");
        let file = set
            .file
            .iter()
            .find(|file| file.package() == "chatd.admin.v1")
            .expect("chatd.admin.v1 is in the set");
        let services: Vec<&str> = file.service.iter().map(|s| s.name()).collect();
        assert_eq!(services, ["Admin"]);
    }
}
