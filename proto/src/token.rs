//! Where the zero-config admin token lives, and which endpoint it is for.
//!
//! When no token is configured, chatd generates one at start and writes it,
//! once per admin address it serves, to [`TokenLocations::write_dir`] under
//! a name derived from that address ([`AdminAddr::file_name`]), with the
//! address recorded inside ([`token_file_text`]). `chatctl` derives the same
//! name from its `--endpoint` in each of [`TokenLocations::read_dirs`], and
//! sends a token found there only when the recorded address is its
//! endpoint's. So two instances on one host never overwrite each other's
//! token, and a local token never travels to another host.

use std::ffi::OsString;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Where chatctl looks for token files, most specific first:
/// `$RUNTIME_DIRECTORY` (set by systemd's `RuntimeDirectory=`),
/// `/run/chatd`, `$XDG_RUNTIME_DIR/chatd`, `/tmp/chatd-<uid>`.
pub fn default_token_dirs() -> Vec<PathBuf> {
    TokenLocations::from_env().read_dirs()
}

/// Where chatd writes the token files it generates: `$RUNTIME_DIRECTORY`,
/// else `/run/chatd` when running as root, else `$XDG_RUNTIME_DIR/chatd`,
/// else `/tmp/chatd-<uid>`.
pub fn default_token_write_dir() -> PathBuf {
    TokenLocations::from_env().write_dir()
}

/// One address the admin API listens on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl AdminAddr {
    /// The token file's name for this address: `admin-127.0.0.1-50051.token`,
    /// `admin-__1-50051.token` for `[::1]:50051`, `admin-unix-<hash>.token`
    /// for a socket (a hash of its path, which may be long).
    pub fn file_name(&self) -> String {
        match self {
            Self::Tcp(addr) => {
                let ip: String = addr
                    .ip()
                    .to_canonical()
                    .to_string()
                    .chars()
                    .map(|c| if c == ':' { '_' } else { c })
                    .collect();
                format!("admin-{ip}-{}.token", addr.port())
            }
            Self::Unix(path) => format!("admin-unix-{:016x}.token", fnv1a(path)),
        }
    }
}

impl fmt::Display for AdminAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp(addr) => write!(f, "{addr}"),
            Self::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// A stable 64-bit hash (FNV-1a) of a path's bytes.
fn fnv1a(path: &Path) -> u64 {
    use std::os::unix::ffi::OsStrExt;
    path.as_os_str()
        .as_bytes()
        .iter()
        .fold(0xcbf2_9ce4_8422_2325, |hash, &b| {
            (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        })
}

/// The prefix of the line that records the address a token file is for.
const ADDRESS_LINE: &str = "address ";

/// A token file: the secret on the first line (so `--token-file` and
/// `admin.token_file` read it as any token file), then the address.
pub fn token_file_text(secret: &str, addr: &AdminAddr) -> String {
    format!("{secret}\n{ADDRESS_LINE}{addr}\n")
}

/// The secret of a token file and the address it records, if any.
pub fn parse_token_file(text: &str) -> (String, Option<String>) {
    let mut lines = text.lines();
    let secret = lines.next().unwrap_or_default().trim().to_owned();
    let addr = lines
        .find_map(|l| l.strip_prefix(ADDRESS_LINE))
        .map(|a| a.trim().to_owned());
    (secret, addr)
}

/// The inputs that decide the token's location, apart from the process
/// environment so they can be tested.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenLocations {
    /// `$RUNTIME_DIRECTORY`; with several directories (space-separated), the
    /// first.
    pub runtime_directory: Option<PathBuf>,
    /// `$XDG_RUNTIME_DIR`.
    pub xdg_runtime_dir: Option<PathBuf>,
    /// The real user id of this process.
    pub uid: u32,
}

impl TokenLocations {
    /// Reads the environment and the process's user id.
    pub fn from_env() -> Self {
        Self::from_lookup(
            |name| std::env::var_os(name),
            rustix::process::getuid().as_raw(),
        )
    }

    /// Builds from any environment lookup; empty values count as unset.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<OsString>, uid: u32) -> Self {
        let var = |name: &str| lookup(name).filter(|value| !value.is_empty());
        let runtime_directory = var("RUNTIME_DIRECTORY").and_then(|value| {
            // systemd joins several RuntimeDirectory= entries with spaces.
            let value = value.to_string_lossy().into_owned();
            value
                .split(' ')
                .find(|part| !part.is_empty())
                .map(PathBuf::from)
        });
        Self {
            runtime_directory,
            xdg_runtime_dir: var("XDG_RUNTIME_DIR").map(PathBuf::from),
            uid,
        }
    }

    /// The candidate directories, in the order a client should try them.
    pub fn read_dirs(&self) -> Vec<PathBuf> {
        let mut dirs = Vec::with_capacity(4);
        if let Some(dir) = &self.runtime_directory {
            dirs.push(dir.clone());
        }
        dirs.push(PathBuf::from("/run/chatd"));
        if let Some(dir) = &self.xdg_runtime_dir {
            dirs.push(dir.join("chatd"));
        }
        dirs.push(self.tmp_dir());
        dirs
    }

    /// The directory the daemon writes its generated tokens to.
    pub fn write_dir(&self) -> PathBuf {
        if let Some(dir) = &self.runtime_directory {
            dir.clone()
        } else if self.uid == 0 {
            PathBuf::from("/run/chatd")
        } else if let Some(dir) = &self.xdg_runtime_dir {
            dir.join("chatd")
        } else {
            self.tmp_dir()
        }
    }

    fn tmp_dir(&self) -> PathBuf {
        PathBuf::from(format!("/tmp/chatd-{}", self.uid))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn locations(vars: &[(&str, &str)], uid: u32) -> TokenLocations {
        let vars: Vec<(String, OsString)> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), OsString::from(v)))
            .collect();
        TokenLocations::from_lookup(
            |name| vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()),
            uid,
        )
    }

    fn strings(paths: Vec<PathBuf>) -> Vec<String> {
        paths.into_iter().map(|p| p.display().to_string()).collect()
    }

    #[test]
    fn read_dirs_with_everything_set() {
        let loc = locations(
            &[
                ("RUNTIME_DIRECTORY", "/run/custom"),
                ("XDG_RUNTIME_DIR", "/run/user/1000"),
            ],
            1000,
        );
        assert_eq!(
            strings(loc.read_dirs()),
            [
                "/run/custom",
                "/run/chatd",
                "/run/user/1000/chatd",
                "/tmp/chatd-1000",
            ]
        );
    }

    #[test]
    fn read_dirs_with_nothing_set() {
        let loc = locations(&[("XDG_RUNTIME_DIR", "")], 1000);
        assert_eq!(strings(loc.read_dirs()), ["/run/chatd", "/tmp/chatd-1000"]);
    }

    #[test]
    fn runtime_directory_takes_the_first_of_several() {
        let loc = locations(&[("RUNTIME_DIRECTORY", "/run/chatd /run/other")], 0);
        assert_eq!(loc.write_dir(), PathBuf::from("/run/chatd"));
    }

    #[test]
    fn write_dir_order() {
        let systemd = locations(
            &[
                ("RUNTIME_DIRECTORY", "/run/x"),
                ("XDG_RUNTIME_DIR", "/run/user/5"),
            ],
            5,
        );
        assert_eq!(systemd.write_dir(), PathBuf::from("/run/x"));
        let root = locations(&[("XDG_RUNTIME_DIR", "/run/user/0")], 0);
        assert_eq!(root.write_dir(), PathBuf::from("/run/chatd"));
        let user = locations(&[("XDG_RUNTIME_DIR", "/run/user/5")], 5);
        assert_eq!(user.write_dir(), PathBuf::from("/run/user/5/chatd"));
        let bare = locations(&[], 5);
        assert_eq!(bare.write_dir(), PathBuf::from("/tmp/chatd-5"));
    }

    #[test]
    fn the_write_dir_is_always_one_of_the_read_dirs() {
        for (vars, uid) in [
            (vec![("RUNTIME_DIRECTORY", "/run/x")], 7),
            (vec![("XDG_RUNTIME_DIR", "/run/user/7")], 7),
            (vec![("XDG_RUNTIME_DIR", "/run/user/0")], 0),
            (vec![], 7),
        ] {
            let loc = locations(&vars, uid);
            assert!(loc.read_dirs().contains(&loc.write_dir()), "{loc:?}");
        }
    }

    #[test]
    fn each_address_has_its_own_file_and_the_file_records_it() {
        let v4 = AdminAddr::Tcp("127.0.0.1:50051".parse().expect("addr"));
        let other = AdminAddr::Tcp("127.0.0.1:50052".parse().expect("addr"));
        let v6 = AdminAddr::Tcp("[::1]:50051".parse().expect("addr"));
        let unix = AdminAddr::Unix("/run/chatd/admin.sock".into());
        assert_eq!(v4.file_name(), "admin-127.0.0.1-50051.token");
        assert_eq!(v6.file_name(), "admin-__1-50051.token");
        assert_ne!(v4.file_name(), other.file_name());
        assert!(unix.file_name().starts_with("admin-unix-"));
        let (secret, addr) = parse_token_file(&token_file_text("s3cret", &v6));
        assert_eq!(secret, "s3cret");
        assert_eq!(addr.as_deref(), Some("[::1]:50051"));
        assert_eq!(parse_token_file("bare\n"), ("bare".to_owned(), None));
    }
}
