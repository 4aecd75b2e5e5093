//! A lock on a directory (flock on the directory itself, so no lock file is left
//! behind): two kiln processes sharing a cache or an output directory take turns where
//! they would otherwise race (fetching one base, pruning the base cache, merging
//! `SHA256SUMS`). Shared locks mark a cache entry in use (a layer a build starts from);
//! whoever removes entries takes them exclusively first, and skips those in use.
//! Released when the guard is dropped.

use anyhow::{Context, Result};
use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::path::Path;

/// Holds the lock until dropped.
#[must_use = "the lock is released when this is dropped"]
#[derive(Debug)]
pub struct DirLock(File);

/// `dir`, opened to be locked.
fn open(dir: &Path) -> Result<File> {
    File::open(dir).with_context(|| format!("opening {}", dir.display()))
}

/// flock(2) `op` on `f`.
fn flock(f: &File, op: libc::c_int) -> std::io::Result<()> {
    // SAFETY: flock on an open descriptor.
    if unsafe { libc::flock(f.as_raw_fd(), op) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

impl DirLock {
    /// Lock `dir`, waiting for another holder; `what` says in the log what is waited for
    /// ("fetching this base").
    pub fn acquire(dir: &Path, what: &str) -> Result<DirLock> {
        let f = open(dir)?;
        if flock(&f, libc::LOCK_EX | libc::LOCK_NB).is_err() {
            tracing::info!("another kiln is {what}; waiting for it ({})", dir.display());
            flock(&f, libc::LOCK_EX).with_context(|| format!("locking {}", dir.display()))?;
        }
        Ok(DirLock(f))
    }

    /// A shared lock on `dir` (others may hold shared locks too): it is in use and must
    /// not be removed. Waits while someone holds it exclusively (is removing it); the
    /// caller checks that it still exists.
    pub fn shared(dir: &Path) -> Result<DirLock> {
        let f = open(dir)?;
        flock(&f, libc::LOCK_SH).with_context(|| format!("locking {}", dir.display()))?;
        Ok(DirLock(f))
    }

    /// An exclusive lock on `dir` if nobody holds one of any kind (`None`: in use).
    pub fn try_exclusive(dir: &Path) -> Result<Option<DirLock>> {
        let f = open(dir)?;
        match flock(&f, libc::LOCK_EX | libc::LOCK_NB) {
            Ok(()) => Ok(Some(DirLock(f))),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e).with_context(|| format!("locking {}", dir.display())),
        }
    }
}

impl Drop for DirLock {
    fn drop(&mut self) {
        let _ = flock(&self.0, libc::LOCK_UN);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_holder_waits_for_the_first() {
        let d = tempfile::tempdir().unwrap();
        let first = DirLock::acquire(d.path(), "testing").unwrap();
        let path = d.path().to_owned();
        let (tx, rx) = std::sync::mpsc::channel();
        let t = std::thread::spawn(move || {
            let _second = DirLock::acquire(&path, "testing").unwrap();
            tx.send(()).unwrap();
        });
        // The second cannot have it while the first holds it.
        assert!(rx.recv_timeout(std::time::Duration::from_millis(200)).is_err());
        drop(first);
        rx.recv_timeout(std::time::Duration::from_secs(10)).unwrap();
        t.join().unwrap();
        assert!(DirLock::acquire(&d.path().join("missing"), "testing").is_err());
    }

    #[test]
    fn shared_holders_keep_out_an_exclusive_one() {
        let d = tempfile::tempdir().unwrap();
        let a = DirLock::shared(d.path()).unwrap();
        let b = DirLock::shared(d.path()).unwrap();
        assert!(DirLock::try_exclusive(d.path()).unwrap().is_none());
        drop(a);
        assert!(DirLock::try_exclusive(d.path()).unwrap().is_none());
        drop(b);
        let x = DirLock::try_exclusive(d.path()).unwrap().expect("nobody holds it");
        assert!(DirLock::try_exclusive(d.path()).unwrap().is_none());
        drop(x);
    }
}
