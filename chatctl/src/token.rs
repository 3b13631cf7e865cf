//! Finding the admin token: `--token`, else `--token-file`, else a token
//! file chatd generated for this very endpoint (see [`chatd_proto::token`]),
//! else none.
//!
//! A discovered token is only ever sent to the endpoint it was issued for:
//! its file is looked up by the endpoint's address, and used only when the
//! address recorded inside matches. `--endpoint http://other:50051` finds
//! nothing, so the local instance's token never travels there.

use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};

use chatd_proto::AdminAddr;
use chatd_proto::token::parse_token_file;

use crate::connect::EndpointAddr;
use crate::error::ChatctlError;

/// Token files are a few dozen bytes; anything past this is not a token.
const MAX_TOKEN_FILE_BYTES: u64 = 4096;

/// A token and where it came from (for messages).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    pub secret: String,
    pub origin: String,
}

/// Picks the token. In each of `dirs`, in order, the file chatd writes for
/// `endpoint` is tried; missing or unreadable ones are skipped, since most
/// of them will not exist on a given machine.
pub fn resolve(
    token: Option<&str>,
    token_file: Option<&Path>,
    dirs: &[PathBuf],
    endpoint: &EndpointAddr,
) -> Result<Option<Token>, ChatctlError> {
    if let Some(secret) = token {
        return Ok(Some(Token {
            secret: secret.trim().to_owned(),
            origin: "--token".to_owned(),
        }));
    }
    if let Some(path) = token_file {
        let (secret, _) = read_token_file(path).map_err(|source| ChatctlError::TokenFile {
            path: path.to_owned(),
            source,
        })?;
        return Ok(Some(Token {
            secret,
            origin: path.display().to_string(),
        }));
    }
    Ok(discover(dirs, &admin_addrs(endpoint)))
}

/// The first token file in `dirs` issued for one of `addrs`.
pub fn discover(dirs: &[PathBuf], addrs: &[AdminAddr]) -> Option<Token> {
    dirs.iter().find_map(|dir| {
        addrs.iter().find_map(|addr| {
            let path = dir.join(addr.file_name());
            let (secret, recorded) = read_token_file(&path).ok()?;
            // The name alone could be anyone's choice; the content says
            // which endpoint chatd issued the token for.
            (recorded? == addr.to_string()).then(|| Token {
                secret,
                origin: path.display().to_string(),
            })
        })
    })
}

/// The admin addresses `endpoint` may be: its IP and port, both loopback
/// addresses for `localhost`, nothing for any other host name (a name is
/// not resolved: whoever answers for it is not known to be local).
pub fn admin_addrs(endpoint: &EndpointAddr) -> Vec<AdminAddr> {
    match endpoint {
        EndpointAddr::Unix(path) => vec![AdminAddr::Unix(path.clone())],
        EndpointAddr::Url { uri, .. } => {
            let Some(host) = uri.host() else {
                return Vec::new();
            };
            let port = uri.port_u16().unwrap_or(match uri.scheme_str() {
                Some("https") => 443,
                _ => 80,
            });
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let ips: Vec<IpAddr> = if host.eq_ignore_ascii_case("localhost") {
                vec![Ipv4Addr::LOCALHOST.into(), Ipv6Addr::LOCALHOST.into()]
            } else {
                host.parse::<IpAddr>()
                    .map(|ip| vec![ip])
                    .unwrap_or_default()
            };
            ips.into_iter()
                .map(|ip| AdminAddr::Tcp(SocketAddr::new(ip.to_canonical(), port)))
                .collect()
        }
    }
}

/// The secret (first line) and the recorded address of a token file.
fn read_token_file(path: &Path) -> std::io::Result<(String, Option<String>)> {
    let mut text = String::new();
    std::fs::File::open(path)?
        .take(MAX_TOKEN_FILE_BYTES)
        .read_to_string(&mut text)?;
    Ok(parse_token_file(&text))
}
