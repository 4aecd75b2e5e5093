//! Mounts as guards, kept in a stack and released in reverse order, all inside a
//! private mount namespace.
//!
//! [`enter_private_namespace`] runs before kiln starts any thread: it unshares the mount
//! namespace and makes every mount private, so nothing kiln mounts propagates to the
//! host, and everything it mounted vanishes with its process even after SIGKILL.
//!
//! A directory whose unmount failed is never deleted: [`MountStack::close`] reports the
//! failure, the mount stays in the build's state ledger (`host/state.rs`), and the
//! pipeline removes its work directory only when the ledger holds nothing.

use anyhow::{Context, Result};
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

/// Unshare the mount namespace and make all mounts private (recursively).
/// Must be called while the process is single-threaded.
pub fn enter_private_namespace() -> Result<()> {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).context(
        "creating a private mount namespace (unshare CLONE_NEWNS): kiln must run as root (in a container: --privileged)",
    )?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .context("making / private in kiln's mount namespace")?;
    tracing::debug!("entered a private mount namespace");
    Ok(())
}

struct Mounted {
    target: PathBuf,
    what: String,
}

/// Mounts in the order they were made; released last-first.
#[derive(Default)]
pub struct MountStack {
    mounts: Vec<Mounted>,
}

impl MountStack {
    pub fn new() -> Self {
        Self::default()
    }

    /// Mount a filesystem (`fstype` Some) or a bind/special mount.
    pub fn mount(
        &mut self,
        source: &str,
        target: &Path,
        fstype: Option<&str>,
        flags: MsFlags,
        data: Option<&str>,
    ) -> Result<()> {
        std::fs::create_dir_all(target).with_context(|| format!("creating mount point {}", target.display()))?;
        mount(Some(source), target, fstype, flags, data).with_context(|| {
            format!(
                "mounting {source} ({}) on {}",
                fstype.unwrap_or("bind"),
                target.display()
            )
        })?;
        tracing::debug!("mounted {source} on {}", target.display());
        crate::host::state::record_mount(target);
        self.mounts.push(Mounted {
            target: target.to_owned(),
            what: source.to_owned(),
        });
        Ok(())
    }

    /// Bind-mount `source` on `target` (recursively with `rec`), private.
    pub fn bind(&mut self, source: &Path, target: &Path, rec: bool) -> Result<()> {
        let mut flags = MsFlags::MS_BIND;
        if rec {
            flags |= MsFlags::MS_REC;
        }
        if source.is_file() && !target.exists() {
            std::fs::write(target, b"").with_context(|| format!("creating bind target {}", target.display()))?;
        }
        self.mount(&source.to_string_lossy(), target, None, flags, None)?;
        // Keep anything mounted below from propagating back.
        mount(
            None::<&str>,
            target,
            None::<&str>,
            MsFlags::MS_REC | MsFlags::MS_PRIVATE,
            None::<&str>,
        )
        .with_context(|| format!("making {} private", target.display()))?;
        Ok(())
    }

    /// How many mounts the stack holds (a depth to unwind back to).
    pub fn len(&self) -> usize {
        self.mounts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.mounts.is_empty()
    }

    /// Unmount everything above `depth` (last first), reporting the first failure.
    pub fn unwind_to(&mut self, depth: usize) -> Result<()> {
        let mut first_err = None;
        while self.mounts.len() > depth {
            let m = self.mounts.pop().unwrap();
            let res = unmount(&m.target);
            if res.is_ok() {
                crate::host::state::forget_mount(&m.target);
            }
            if let Err(e) = res {
                let e = e.context(format!("unmounting {} from {}", m.what, m.target.display()));
                tracing::error!("{e:#}");
                first_err.get_or_insert(e);
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Unmount everything, last first.
    pub fn close(mut self) -> Result<()> {
        self.unwind_to(0)
    }
}

fn unmount(target: &Path) -> Result<()> {
    // A busy mount (a process left behind by a package script) gets a few retries;
    // MNT_DETACH is not used: we want to know the filesystem is really released
    // before the loop device under it is detached and the image checksummed.
    let mut delay = std::time::Duration::from_millis(50);
    for attempt in 0..6 {
        match umount2(target, MntFlags::empty()) {
            Ok(()) => {
                tracing::debug!("unmounted {}", target.display());
                return Ok(());
            }
            Err(nix::errno::Errno::EBUSY) if attempt < 5 => {
                std::thread::sleep(delay);
                delay *= 2;
            }
            Err(e) => return Err(e.into()),
        }
    }
    unreachable!()
}

impl Drop for MountStack {
    fn drop(&mut self) {
        if !self.mounts.is_empty() {
            let _ = self.unwind_to(0);
        }
    }
}

/// The mount points of this mount namespace, from `/proc/self/mountinfo` (none if it
/// cannot be read).
pub fn mount_points() -> Vec<PathBuf> {
    parse_mountinfo(&std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default())
}

/// The mount points (field 5) of mountinfo text, with the kernel's octal escapes
/// (`\040` for a space, `\011`, `\012`, `\134`) undone.
pub fn parse_mountinfo(text: &str) -> Vec<PathBuf> {
    text.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|t| PathBuf::from(std::ffi::OsString::from_vec(unescape_octal(t))))
        .collect()
}

/// Undo the `\NNN` octal escapes the kernel writes for space, tab, newline and backslash.
fn unescape_octal(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let byte = b
            .get(i + 1..i + 4)
            .filter(|d| b[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)))
            .and_then(|d| u8::from_str_radix(std::str::from_utf8(d).ok()?, 8).ok());
        match byte {
            Some(c) => {
                out.push(c);
                i += 4;
            }
            _ => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_fields_unescaped() {
        let text = "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n\
                    80 22 7:0 / /tmp/out\\040dir/.kiln-work-1/root rw - ext4 /dev/loop0 rw\n\
                    81 22 0:5 / /a\\011b\\134c rw - tmpfs tmpfs rw\n";
        assert_eq!(
            parse_mountinfo(text),
            [
                PathBuf::from("/"),
                PathBuf::from("/tmp/out dir/.kiln-work-1/root"),
                PathBuf::from("/a\tb\\c"),
            ]
        );
        assert_eq!(parse_mountinfo("1 1 0:1 / /x\\400 rw\n"), [PathBuf::from("/x\\400")]);
        assert!(mount_points().contains(&PathBuf::from("/")));
    }
}
