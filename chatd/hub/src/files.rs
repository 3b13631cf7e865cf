//! Private files: created 0600 in 0700 directories, replaced atomically.
//!
//! Directories that hold secrets or state are checked before use without
//! following a symbolic link someone else planted: a fallback directory under
//! `/tmp` may have been created by another user before chatd ever ran.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// Writes `bytes` to `path` so that readers see the old or the new content,
/// never a mix, even across a crash. The directory must pass
/// [`check_private_dir`]; the temporary file is created afresh (`O_EXCL`,
/// `O_NOFOLLOW`), so a link left in its place cannot redirect the write.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    create_private_dir(dir)?;
    check_private_dir(dir)?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(path.file_name().unwrap_or_default());
    tmp_name.push(".tmp");
    let tmp = dir.join(tmp_name);
    // A leftover from a crash (or anything else) goes; `remove_file` removes
    // a link itself, never its target.
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut file = private_file(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    fs::rename(&tmp, path)?;
    fs::File::open(dir)?.sync_all()
}

/// Creates `dir` and its parents, the last one mode 0700.
pub fn create_private_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    match fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
    {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(()),
        Err(e) => Err(e),
    }
}

/// Creates `path` with mode 0600; fails if anything (a file, a link) is
/// already there.
pub fn private_file(path: &Path) -> io::Result<fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(path)
}

/// Refuses a directory that someone else could tamper with: it must belong
/// to this user and be writable by no one else. A symbolic link is looked at
/// itself first (no-follow): it is followed only when this user or root made
/// it, since a link in a shared directory like `/tmp` may be anyone's.
pub fn check_private_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let me = rustix::process::geteuid().as_raw();
    let refuse = |why: String| {
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("refusing {}: {why}", dir.display()),
        ))
    };
    let link = fs::symlink_metadata(dir)?;
    let meta = if link.file_type().is_symlink() {
        if link.uid() != me && link.uid() != 0 {
            return refuse(format!(
                "it is a symbolic link owned by uid {}, not by uid {me} or root",
                link.uid()
            ));
        }
        fs::metadata(dir)?
    } else {
        link
    };
    if !meta.is_dir() {
        return refuse("it is not a directory".into());
    }
    if meta.uid() != me || meta.mode() & 0o022 != 0 {
        return refuse(format!(
            "it must belong to uid {me} and be writable by it alone (it belongs to uid {}, mode {:o})",
            meta.uid(),
            meta.mode() & 0o7777
        ));
    }
    Ok(())
}

/// The lock file inside `server.state_dir`; it holds the holder's pid.
pub const STATE_LOCK_FILE: &str = "chatd.lock";

/// Why this process cannot have the state directory.
#[derive(Debug, thiserror::Error)]
pub enum StateLockError {
    #[error(
        "`server.state_dir` {} is in use by another chatd (pid {pid}); give each instance its own `server.state_dir`",
        dir.display()
    )]
    InUse { dir: PathBuf, pid: String },
    #[error("cannot lock `server.state_dir` {}: {source}", dir.display())]
    Io { dir: PathBuf, source: io::Error },
}

/// This process's hold on its state directory, for as long as it lives (the
/// kernel lets go when it exits, however it exits). Two chatd processes on
/// one directory would each keep their own bans and overwrite each other's
/// `bans.json`: the second is refused instead.
#[derive(Debug)]
pub struct StateLock {
    _file: fs::File,
}

impl StateLock {
    /// Takes the lock, or says which process holds it.
    pub fn acquire(dir: &Path) -> Result<StateLock, StateLockError> {
        use std::os::unix::fs::OpenOptionsExt;
        let failed = |source| StateLockError::Io {
            dir: dir.to_path_buf(),
            source,
        };
        create_private_dir(dir).map_err(failed)?;
        // Before anything is created inside: a directory someone else owns
        // (a fallback under a shared `/tmp`, planted in advance) is refused
        // untouched.
        check_private_dir(dir).map_err(failed)?;
        let path = dir.join(STATE_LOCK_FILE);
        let mut file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
            .open(&path)
            .map_err(failed)?;
        match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(rustix::io::Errno::WOULDBLOCK) => {
                return Err(StateLockError::InUse {
                    dir: dir.to_path_buf(),
                    pid: holder(&path),
                });
            }
            Err(e) => return Err(failed(e.into())),
        }
        // The pid only names the holder for the next one refused: a full
        // disk does not stop the start for it.
        let _ = file
            .set_len(0)
            .and_then(|()| writeln!(file, "{}", std::process::id()));
        Ok(StateLock { _file: file })
    }

    /// For a process taking over from a running chatd, which holds the lock
    /// until it exits: tries every `every` until it has it.
    pub async fn take_over(
        dir: &Path,
        every: std::time::Duration,
    ) -> Result<StateLock, StateLockError> {
        loop {
            match StateLock::acquire(dir) {
                Err(StateLockError::InUse { .. }) => tokio::time::sleep(every).await,
                other => return other,
            }
        }
    }
}

/// The pid a lock file names, for the refusal: only a number is repeated,
/// since the file's bytes may be anyone's (escape sequences included) and
/// end up on the operator's terminal.
fn holder(path: &Path) -> String {
    let text = fs::read(path).unwrap_or_default();
    let first = text.split(|b| *b == b'\n').next().unwrap_or_default();
    std::str::from_utf8(first)
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .map_or_else(|| "unknown".to_string(), |pid| pid.to_string())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn a_shared_or_linked_directory_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let private = dir.path().join("private");
        create_private_dir(&private).expect("create");
        check_private_dir(&private).expect("ours, 0700");

        let open = dir.path().join("open");
        fs::create_dir(&open).expect("create");
        fs::set_permissions(&open, fs::Permissions::from_mode(0o777)).expect("chmod");
        let e = check_private_dir(&open).expect_err("world-writable");
        assert!(e.to_string().contains("writable by it alone"), "{e}");

        let file = dir.path().join("file");
        fs::write(&file, "x").expect("write");
        let e = check_private_dir(&file).expect_err("not a directory");
        assert!(e.to_string().contains("not a directory"), "{e}");
    }

    #[test]
    fn a_planted_temporary_link_does_not_redirect_the_write() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("state");
        create_private_dir(&state).expect("create");
        let victim = dir.path().join("victim");
        fs::write(&victim, "untouched").expect("write");
        std::os::unix::fs::symlink(&victim, state.join(".bans.json.tmp")).expect("link");
        atomic_write(&state.join("bans.json"), b"new").expect("write");
        assert_eq!(fs::read_to_string(&victim).expect("read"), "untouched");
        assert_eq!(
            fs::read_to_string(state.join("bans.json")).expect("read"),
            "new"
        );
        let mode = fs::metadata(state.join("bans.json"))
            .expect("file")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
