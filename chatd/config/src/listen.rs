//! Listen settings: socket addresses, trusted networks and TLS file pairs.

use std::net::SocketAddr;
use std::path::PathBuf;

use super::error::{ConfigError, invalid};
use super::raw::RawAddrs;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Every address of a listen setting.
pub(super) fn addrs(key: &'static str, value: &RawAddrs) -> Result<Vec<SocketAddr>, ConfigError> {
    let mut out: Vec<SocketAddr> = Vec::new();
    for a in value.items() {
        let a = addr(key, a.trim())?;
        if out.contains(&a) {
            return Err(invalid(key, a, "each address once"));
        }
        out.push(a);
    }
    Ok(out)
}

/// `10.0.0.0/8`, or a single address such as `192.0.2.1`.
pub(super) fn nets(key: &'static str, values: &[String]) -> Result<Vec<ipnet::IpNet>, ConfigError> {
    values
        .iter()
        .map(|v| {
            let v = v.trim();
            v.parse::<ipnet::IpNet>()
                .or_else(|_| v.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                .map(|n| n.trunc())
                .map_err(|_| {
                    invalid(
                        key,
                        format!("{v:?}"),
                        "a CIDR such as \"10.0.0.0/8\" or \"fd00::/8\", or an address such as \"192.0.2.1\"",
                    )
                })
        })
        .collect()
}

/// Both files or neither.
pub(super) fn tls_files(
    (cert_key, cert): (&'static str, &str),
    (key_key, key): (&'static str, &str),
) -> Result<Option<TlsFiles>, ConfigError> {
    match (cert.is_empty(), key.is_empty()) {
        (true, true) => Ok(None),
        (false, false) => Ok(Some(TlsFiles {
            cert: PathBuf::from(cert),
            key: PathBuf::from(key),
        })),
        (false, true) => Err(invalid(
            key_key,
            "\"\"",
            format!("the key file of {cert_key} (set both or neither)"),
        )),
        (true, false) => Err(invalid(
            cert_key,
            "\"\"",
            format!("the certificate file of {key_key} (set both or neither)"),
        )),
    }
}

pub(super) fn addr(key: &'static str, value: &str) -> Result<SocketAddr, ConfigError> {
    value.parse().map_err(|_| {
        invalid(
            key,
            format!("{value:?}"),
            "expected IP:PORT, e.g. \"0.0.0.0:8080\" or \"[::1]:8080\" (port 0 picks a free port)",
        )
    })
}
