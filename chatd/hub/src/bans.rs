//! Bans: addresses and networks refused at connect.
//!
//! The list lives in memory behind [`Bans`] and in `<state_dir>/bans.json`,
//! which is rewritten atomically (temporary file, fsync, rename, fsync of the
//! directory) on every change, so a crash leaves either the old list or the
//! new one. A change is saved first and applied only once saved: the file
//! never lags behind what chatd enforces. Expired bans stop applying at once
//! and are dropped from the file at the next change.

use std::fs;
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock};
use std::time::SystemTime;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::files;
use crate::lock::{lock, read, write};

/// The file name inside `server.state_dir`.
pub const BANS_FILE: &str = "bans.json";

/// One ban.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ban {
    /// Normalised: host bits cleared.
    pub net: IpNet,
    pub reason: String,
    pub created_at: SystemTime,
    /// `None`: never expires.
    pub expires_at: Option<SystemTime>,
}

impl Ban {
    pub fn is_active(&self, now: SystemTime) -> bool {
        self.expires_at.is_none_or(|at| at > now)
    }

    pub fn matches(&self, ip: IpAddr, now: SystemTime) -> bool {
        self.is_active(now) && self.net.contains(&ip.to_canonical())
    }

    /// The target as operators write it: a bare address for a single host.
    pub fn target(&self) -> String {
        format_target(&self.net)
    }

    /// The reason, or a default when none was given.
    pub fn reason_text(&self) -> &str {
        if self.reason.trim().is_empty() {
            "no reason given"
        } else {
            &self.reason
        }
    }
}

/// Why a ban operation failed.
#[derive(Debug, thiserror::Error)]
pub enum BanError {
    #[error(
        "{0:?} is not an IP address or CIDR network (e.g. 203.0.113.7, 203.0.113.0/24, 2001:db8::/32)"
    )]
    BadTarget(String),
    #[error("no ban for {0}")]
    NotFound(String),
    #[error("the ban would expire before it starts; give a future time or a positive duration")]
    AlreadyExpired,
    #[error("cannot read the bans file {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("the bans file {} is not valid: {reason}; fix or remove it", path.display())]
    Invalid { path: PathBuf, reason: String },
    #[error("cannot save the bans to {}: {source}", path.display())]
    Write { path: PathBuf, source: io::Error },
    #[error("cannot use `server.state_dir`: {source}")]
    UnsafeDir { source: io::Error },
}

/// Parses `203.0.113.7`, `203.0.113.0/24`, `2001:db8::/32`; clears host bits.
pub fn parse_target(text: &str) -> Result<IpNet, BanError> {
    let text = text.trim();
    if let Ok(net) = text.parse::<IpNet>() {
        return Ok(canonical(net).trunc());
    }
    match text.parse::<IpAddr>() {
        Ok(ip) => Ok(IpNet::from(ip.to_canonical())),
        Err(_) => Err(BanError::BadTarget(text.to_string())),
    }
}

/// An IPv4-mapped IPv6 network (`::ffff:10.0.0.0/104`) as the IPv4 one.
fn canonical(net: IpNet) -> IpNet {
    match net {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.addr().to_ipv4_mapped() {
            Some(v4) => ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96)
                .map(IpNet::V4)
                .unwrap_or(net),
            None => net,
        },
        _ => net,
    }
}

/// A normalised target as text: a bare address for a single host.
pub fn format_target(net: &IpNet) -> String {
    if net.prefix_len() == net.max_prefix_len() {
        net.addr().to_string()
    } else {
        net.to_string()
    }
}

/// The ban list and its file.
#[derive(Debug)]
pub struct Bans {
    list: RwLock<Vec<Ban>>,
    /// The file; its lock also serialises changes, so saves land in order.
    file: Mutex<PathBuf>,
}

impl Bans {
    /// An empty list that will be saved in `state_dir`.
    pub fn empty(state_dir: &Path) -> Bans {
        Bans {
            list: RwLock::new(Vec::new()),
            file: Mutex::new(state_dir.join(BANS_FILE)),
        }
    }

    /// Reads `state_dir/bans.json`; a missing file is an empty list.
    pub fn load(state_dir: &Path) -> Result<Bans, BanError> {
        let bans = Bans::empty(state_dir);
        bans.reload(state_dir)?;
        Ok(bans)
    }

    /// Replaces the list with the one in `state_dir/bans.json` (which may be
    /// a new directory). Returns how many bans are in force.
    pub fn reload(&self, state_dir: &Path) -> Result<usize, BanError> {
        let mut file = lock(&self.file);
        // Only a directory nobody else can write to is trusted: a fallback
        // under /tmp may have been made, and filled, by another user.
        match files::check_private_dir(state_dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => return Err(BanError::UnsafeDir { source }),
        }
        let path = state_dir.join(BANS_FILE);
        let list = read_file(&path)?;
        let now = SystemTime::now();
        let active = list.iter().filter(|b| b.is_active(now)).count();
        *write(&self.list) = list;
        *file = path;
        Ok(active)
    }

    /// The ban that refuses `ip` now, if any.
    pub fn check(&self, ip: IpAddr) -> Option<Ban> {
        let now = SystemTime::now();
        read(&self.list)
            .iter()
            .find(|b| b.matches(ip, now))
            .cloned()
    }

    /// Bans in force, ordered by target.
    pub fn active(&self) -> Vec<Ban> {
        let now = SystemTime::now();
        let mut bans: Vec<Ban> = read(&self.list)
            .iter()
            .filter(|b| b.is_active(now))
            .cloned()
            .collect();
        bans.sort_by_key(|b| b.net);
        bans
    }

    /// Adds `ban`, replacing any ban of the same target; saved before it
    /// applies. Blocks on file I/O.
    pub fn add(&self, ban: Ban) -> Result<Ban, BanError> {
        let now = SystemTime::now();
        if !ban.is_active(now) {
            return Err(BanError::AlreadyExpired);
        }
        self.change(|list| {
            list.retain(|b| b.net != ban.net);
            list.push(ban.clone());
            Ok(())
        })?;
        Ok(ban)
    }

    /// Lifts the ban of `net`. Blocks on file I/O.
    pub fn remove(&self, net: IpNet) -> Result<(), BanError> {
        let now = SystemTime::now();
        self.change(|list| {
            let before = list.len();
            list.retain(|b| b.net != net || !b.is_active(now));
            if list.len() == before {
                return Err(BanError::NotFound(format_target(&net)));
            }
            Ok(())
        })
    }

    /// Applies `edit` to a copy of the list (expired bans dropped), saves
    /// it, then makes it current.
    fn change(
        &self,
        edit: impl FnOnce(&mut Vec<Ban>) -> Result<(), BanError>,
    ) -> Result<(), BanError> {
        let file = lock(&self.file);
        let now = SystemTime::now();
        let mut list: Vec<Ban> = read(&self.list)
            .iter()
            .filter(|b| b.is_active(now))
            .cloned()
            .collect();
        edit(&mut list)?;
        write_file(&file, &list)?;
        *write(&self.list) = list;
        Ok(())
    }
}

/// The file format: readable and editable by hand. Unknown fields are
/// errors, so a typo (`expire_at`) cannot silently make a ban permanent.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredFile<B> {
    bans: Vec<B>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredBan {
    target: String,
    #[serde(default)]
    reason: String,
    /// RFC 3339.
    created_at: String,
    /// RFC 3339; absent or null: never.
    #[serde(default)]
    expires_at: Option<String>,
}

/// Longest reason kept from the file; the admin API refuses longer ones.
/// Longest kick or ban reason accepted, in bytes: a reason travels in one
/// server line to the client and in the room's leave notice.
pub const MAX_REASON_BYTES: usize = 256;

fn read_file(path: &Path) -> Result<Vec<Ban>, BanError> {
    let text = match fs::read_to_string(path) {
        Ok(text) => text,
        // A link to nowhere is a mistake to report, not an empty list.
        Err(e)
            if e.kind() == io::ErrorKind::NotFound
                && fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink()) =>
        {
            return Err(BanError::Read {
                path: path.to_owned(),
                source: io::Error::new(
                    io::ErrorKind::NotFound,
                    "it is a symbolic link to a file that does not exist",
                ),
            });
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(BanError::Read {
                path: path.to_owned(),
                source,
            });
        }
    };
    let invalid = |reason: String| BanError::Invalid {
        path: path.to_owned(),
        reason,
    };
    let stored: StoredFile<serde_json::Value> =
        serde_json::from_str(&text).map_err(|e| invalid(e.to_string()))?;
    stored
        .bans
        .into_iter()
        .enumerate()
        .map(|(i, entry)| {
            // Errors name the entry by position and target.
            let name = match entry.get("target").and_then(|t| t.as_str()) {
                Some(target) => format!("ban #{} ({target:?})", i + 1),
                None => format!("ban #{}", i + 1),
            };
            let bad = |what: String| invalid(format!("{name}: {what}"));
            let b: StoredBan = serde_json::from_value(entry).map_err(|e| bad(e.to_string()))?;
            let time = |field: &str, text: &str| {
                humantime::parse_rfc3339_weak(text)
                    .map_err(|e| bad(format!("`{field}` {text:?}: {e}")))
            };
            Ok(Ban {
                net: parse_target(&b.target).map_err(|e| bad(e.to_string()))?,
                // The file may have been edited by hand: its reasons reach
                // banned clients' terminals, so they are cleaned like chat.
                reason: bounded(chatd_text::sanitize::clean(&b.reason), MAX_REASON_BYTES),
                created_at: time("created_at", &b.created_at)?,
                expires_at: b
                    .expires_at
                    .as_deref()
                    .map(|t| time("expires_at", t))
                    .transpose()?,
            })
        })
        .collect()
}

/// `text` cut to at most `max` bytes, on a character boundary.
fn bounded(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

fn write_file(path: &Path, list: &[Ban]) -> Result<(), BanError> {
    let stored = StoredFile::<StoredBan> {
        bans: list
            .iter()
            .map(|b| StoredBan {
                target: b.target(),
                reason: b.reason.clone(),
                created_at: humantime::format_rfc3339_millis(b.created_at).to_string(),
                expires_at: b
                    .expires_at
                    .map(|t| humantime::format_rfc3339_millis(t).to_string()),
            })
            .collect(),
    };
    let failed = |source: io::Error| BanError::Write {
        path: path.to_owned(),
        source,
    };
    // Serialising plain strings cannot fail; the error path is a guard.
    let mut text = serde_json::to_vec_pretty(&stored).map_err(|e| failed(e.into()))?;
    text.push(b'\n');
    files::atomic_write(path, &text).map_err(failed)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn ban(target: &str, expires_in: Option<Duration>) -> Ban {
        let now = SystemTime::now();
        Ban {
            net: parse_target(target).expect("valid target"),
            reason: "spam".into(),
            created_at: now,
            expires_at: expires_in.map(|d| now + d),
        }
    }

    #[test]
    fn targets_are_normalised() {
        let t = |s: &str| parse_target(s).map(|n| format_target(&n));
        assert_eq!(t("203.0.113.7").ok().as_deref(), Some("203.0.113.7"));
        assert_eq!(t("203.0.113.9/24").ok().as_deref(), Some("203.0.113.0/24"));
        assert_eq!(t("2001:db8::1").ok().as_deref(), Some("2001:db8::1"));
        assert_eq!(t("::ffff:10.1.2.3").ok().as_deref(), Some("10.1.2.3"));
        assert!(matches!(t("nope"), Err(BanError::BadTarget(_))));
        assert!(matches!(t("10.0.0.0/33"), Err(BanError::BadTarget(_))));
    }

    #[test]
    fn matching_covers_networks_mapped_addresses_and_expiry() {
        let now = SystemTime::now();
        let net = ban("10.0.0.0/8", None);
        assert!(net.matches("10.2.3.4".parse().expect("ip"), now));
        assert!(net.matches("::ffff:10.2.3.4".parse().expect("ip"), now));
        assert!(!net.matches("11.0.0.1".parse().expect("ip"), now));
        let expired = Ban {
            expires_at: Some(now - Duration::from_secs(1)),
            ..ban("10.0.0.1", None)
        };
        assert!(!expired.matches("10.0.0.1".parse().expect("ip"), now));
    }

    #[test]
    fn changes_are_saved_and_survive_a_reload() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("state");
        let bans = Bans::load(&state).expect("no file is an empty list");
        bans.add(ban("192.0.2.0/24", None)).expect("add");
        bans.add(ban("198.51.100.7", Some(Duration::from_secs(3600))))
            .expect("add");
        bans.add(ban("192.0.2.0/24", None)).expect("replace");
        assert_eq!(bans.active().len(), 2);
        let again = Bans::load(&state).expect("load");
        // The file keeps milliseconds.
        let summary = |bans: &Bans| -> Vec<(String, String, Option<u128>)> {
            bans.active()
                .iter()
                .map(|b| {
                    let ms = |t: SystemTime| {
                        t.duration_since(std::time::UNIX_EPOCH)
                            .map_or(0, |d| d.as_millis())
                    };
                    (b.target(), b.reason.clone(), b.expires_at.map(ms))
                })
                .collect()
        };
        assert_eq!(summary(&again), summary(&bans));
        again
            .remove(parse_target("198.51.100.7").expect("target"))
            .expect("remove");
        assert!(matches!(
            again.remove(parse_target("198.51.100.7").expect("target")),
            Err(BanError::NotFound(_))
        ));
        assert_eq!(Bans::load(&state).expect("load").active().len(), 1);
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(state.join(BANS_FILE))
            .expect("file")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn a_corrupt_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::write(dir.path().join(BANS_FILE), "{ not json").expect("write");
        let e = Bans::load(dir.path()).expect_err("rejected").to_string();
        assert!(e.contains(BANS_FILE), "{e}");
    }

    #[test]
    fn a_misspelt_field_is_an_error_naming_the_entry_and_field() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::write(
            dir.path().join(BANS_FILE),
            r#"{"bans": [{"target": "192.0.2.1", "created_at": "2025-01-01T00:00:00Z", "expire_at": "2025-01-02T00:00:00Z"}]}"#,
        )
        .expect("write");
        let e = Bans::load(dir.path()).expect_err("rejected").to_string();
        assert!(
            e.contains(BANS_FILE)
                && e.contains("ban #1")
                && e.contains("192.0.2.1")
                && e.contains("expire_at"),
            "{e}"
        );
    }

    #[test]
    fn a_dangling_link_is_an_error_not_an_empty_list() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::os::unix::fs::symlink(dir.path().join("gone.json"), dir.path().join(BANS_FILE))
            .expect("link");
        let e = Bans::load(dir.path()).expect_err("rejected").to_string();
        assert!(e.contains(BANS_FILE) && e.contains("does not exist"), "{e}");
    }

    #[test]
    fn reasons_from_the_file_are_cleaned_and_bounded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let long = "x".repeat(5000);
        fs::write(
            dir.path().join(BANS_FILE),
            format!(
                r#"{{"bans": [
                  {{"target": "192.0.2.1", "reason": "a\u001b]0;pwned\u0007b\r\n*** c", "created_at": "2025-01-01T00:00:00Z"}},
                  {{"target": "192.0.2.2", "reason": "{long}", "created_at": "2025-01-01T00:00:00Z"}}
                ]}}"#
            ),
        )
        .expect("write");
        let bans = Bans::load(dir.path()).expect("load").active();
        let reason = &bans[0].reason;
        assert!(
            !reason.chars().any(char::is_control) && !reason.contains("pwned"),
            "{reason:?}"
        );
        assert!(bans[1].reason.len() <= MAX_REASON_BYTES);
    }

    #[test]
    fn a_state_dir_someone_else_may_write_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("state");
        fs::create_dir(&state).expect("create");
        fs::set_permissions(&state, fs::Permissions::from_mode(0o777)).expect("chmod");
        fs::write(state.join(BANS_FILE), r#"{"bans": []}"#).expect("write");
        let e = Bans::load(&state).expect_err("refused").to_string();
        assert!(
            e.contains("server.state_dir") && e.contains("writable by it alone"),
            "{e}"
        );
    }
}
