//! Generates the admin API from `chatd/admin/v1/admin.proto` with a vendored
//! `protoc`, so building never needs one installed.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let well_known = protoc_bin_vendored::include_path()?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);

    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc);

    tonic_prost_build::configure()
        .build_transport(false)
        .file_descriptor_set_path(out_dir.join("chatd_admin_v1.bin"))
        .compile_with_config(
            config,
            &[PathBuf::from("chatd/admin/v1/admin.proto")],
            &[PathBuf::from("."), well_known],
        )?;
    Ok(())
}
