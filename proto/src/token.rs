//! Where the zero-config admin token lives.
//!
//! When no token is configured, chatd generates one at start and writes it to
//! [`default_token_write_path`]; `chatctl` reads the first readable file of
//! [`default_token_paths`]. Both derive from the same [`TokenLocations`], so
//! the two agree without any configuration.

use std::ffi::OsString;
use std::path::PathBuf;

/// The token file's name inside its directory.
pub const TOKEN_FILE_NAME: &str = "admin.token";

/// Where chatctl looks for the token, most specific first:
/// `$RUNTIME_DIRECTORY/admin.token` (set by systemd's `RuntimeDirectory=`),
/// `/run/chatd/admin.token`, `$XDG_RUNTIME_DIR/chatd/admin.token`,
/// `/tmp/chatd-<uid>/admin.token`.
pub fn default_token_paths() -> Vec<PathBuf> {
    TokenLocations::from_env().read_paths()
}

/// Where chatd writes the token it generates: `$RUNTIME_DIRECTORY`, else
/// `/run/chatd` when running as root, else `$XDG_RUNTIME_DIR/chatd`, else
/// `/tmp/chatd-<uid>`; joined with `admin.token`.
pub fn default_token_write_path() -> PathBuf {
    TokenLocations::from_env().write_path()
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

    /// The candidate files, in the order a client should try them.
    pub fn read_paths(&self) -> Vec<PathBuf> {
        let mut paths = Vec::with_capacity(4);
        if let Some(dir) = &self.runtime_directory {
            paths.push(dir.join(TOKEN_FILE_NAME));
        }
        paths.push(PathBuf::from("/run/chatd").join(TOKEN_FILE_NAME));
        if let Some(dir) = &self.xdg_runtime_dir {
            paths.push(dir.join("chatd").join(TOKEN_FILE_NAME));
        }
        paths.push(self.tmp_dir().join(TOKEN_FILE_NAME));
        paths
    }

    /// The file the daemon writes its generated token to.
    pub fn write_path(&self) -> PathBuf {
        let dir = if let Some(dir) = &self.runtime_directory {
            dir.clone()
        } else if self.uid == 0 {
            PathBuf::from("/run/chatd")
        } else if let Some(dir) = &self.xdg_runtime_dir {
            dir.join("chatd")
        } else {
            self.tmp_dir()
        };
        dir.join(TOKEN_FILE_NAME)
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
    fn read_paths_with_everything_set() {
        let loc = locations(
            &[
                ("RUNTIME_DIRECTORY", "/run/custom"),
                ("XDG_RUNTIME_DIR", "/run/user/1000"),
            ],
            1000,
        );
        assert_eq!(
            strings(loc.read_paths()),
            [
                "/run/custom/admin.token",
                "/run/chatd/admin.token",
                "/run/user/1000/chatd/admin.token",
                "/tmp/chatd-1000/admin.token",
            ]
        );
    }

    #[test]
    fn read_paths_with_nothing_set() {
        let loc = locations(&[("XDG_RUNTIME_DIR", "")], 1000);
        assert_eq!(
            strings(loc.read_paths()),
            ["/run/chatd/admin.token", "/tmp/chatd-1000/admin.token"]
        );
    }

    #[test]
    fn runtime_directory_takes_the_first_of_several() {
        let loc = locations(&[("RUNTIME_DIRECTORY", "/run/chatd /run/other")], 0);
        assert_eq!(loc.write_path(), PathBuf::from("/run/chatd/admin.token"));
    }

    #[test]
    fn write_path_order() {
        let systemd = locations(
            &[
                ("RUNTIME_DIRECTORY", "/run/x"),
                ("XDG_RUNTIME_DIR", "/run/user/5"),
            ],
            5,
        );
        assert_eq!(systemd.write_path(), PathBuf::from("/run/x/admin.token"));
        let root = locations(&[("XDG_RUNTIME_DIR", "/run/user/0")], 0);
        assert_eq!(root.write_path(), PathBuf::from("/run/chatd/admin.token"));
        let user = locations(&[("XDG_RUNTIME_DIR", "/run/user/5")], 5);
        assert_eq!(
            user.write_path(),
            PathBuf::from("/run/user/5/chatd/admin.token")
        );
        let bare = locations(&[], 5);
        assert_eq!(bare.write_path(), PathBuf::from("/tmp/chatd-5/admin.token"));
    }

    #[test]
    fn the_write_path_is_always_one_of_the_read_paths() {
        for (vars, uid) in [
            (vec![("RUNTIME_DIRECTORY", "/run/x")], 7),
            (vec![("XDG_RUNTIME_DIR", "/run/user/7")], 7),
            (vec![("XDG_RUNTIME_DIR", "/run/user/0")], 0),
            (vec![], 7),
        ] {
            let loc = locations(&vars, uid);
            assert!(loc.read_paths().contains(&loc.write_path()), "{loc:?}");
        }
    }
}
