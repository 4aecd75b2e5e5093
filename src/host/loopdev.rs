//! Loop devices as guards.
//!
//! The kernel on our build machines (and in many CI containers) has no GPT partition
//! support, so `losetup -P` shows no partitions. kiln therefore attaches one loop device
//! per partition, with the offset *and* size limit taken from the GPT: without the size
//! limit, mkfs on an offset device runs to the end of the file and overwrites the backup
//! GPT.
//!
//! Every device is attached with autoclear, so once nothing holds it open (kiln's
//! process is gone, the mounts in its private namespace are gone) the kernel detaches it
//! even after SIGKILL. [`Loop::close`] detaches explicitly and reports errors; `Drop`
//! does the same on error paths and only logs.
//!
//! In a container /dev is a snapshot taken when it started (a tmpfs with the nodes that
//! existed then) and there is no udev, so the device the kernel hands out
//! (`LOOP_CTL_GET_FREE`, which creates loopN if none is free) may have no node. kiln then
//! makes the node itself ([`ensure_node`]: mknod with the major:minor from sysfs); it
//! never waits for udev and never uses partition nodes. The nodes it makes stay (as
//! losetup's would): they name a kernel device, not a build, and removing one could race
//! with another build that was just handed the same device.

use anyhow::{Context, Result};
use loopdev::LoopDevice;
use std::fs::{File, OpenOptions};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

pub struct Loop {
    dev: Option<LoopDevice>,
    path: PathBuf,
    backing: PathBuf,
}

impl Loop {
    /// Attach `backing[offset .. offset+size]` to a free loop device.
    pub fn attach(backing: &Path, offset: u64, size: u64, read_only: bool) -> Result<Loop> {
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(backing)
            .with_context(|| format!("opening {} to attach a loop device", backing.display()))?;
        let ctl = OpenOptions::new().read(true).write(true).open("/dev/loop-control").context(
            "opening /dev/loop-control: kiln needs root and the loop module (modprobe loop; in a container run with --privileged)",
        )?;
        // Another process can take the device between GET_FREE and SET_FD: retry.
        let mut last_err = None;
        for _ in 0..10 {
            let n = next_free(&ctl).context(
                "no free loop device (losetup -a lists the ones in use; `kiln doctor` finds ones kiln left)",
            )?;
            let path = ensure_node(n)?;
            let dev = LoopDevice::open(&path).with_context(|| format!("opening {}", path.display()))?;
            match dev
                .with()
                .offset(offset)
                .size_limit(size)
                .read_only(read_only)
                .autoclear(true)
                .attach_fd(file.as_raw_fd())
            {
                Ok(()) => {
                    tracing::debug!(
                        "attached {} to {} (offset {offset}, size {size})",
                        path.display(),
                        backing.display()
                    );
                    crate::host::state::record_loop(&path, backing);
                    return Ok(Loop {
                        dev: Some(dev),
                        path,
                        backing: backing.to_owned(),
                    });
                }
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => last_err = Some(e),
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!(
                            "attaching {} at offset {offset} to {}",
                            backing.display(),
                            path.display()
                        )
                    });
                }
            }
        }
        Err(last_err.unwrap()).context("every free loop device was taken by someone else while attaching")
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Detach now, reporting failure.
    pub fn close(mut self) -> Result<()> {
        self.detach()
    }

    fn detach(&mut self) -> Result<()> {
        if let Some(dev) = self.dev.take() {
            dev.detach().with_context(|| {
                format!(
                    "detaching {} (backed by {})",
                    self.path.display(),
                    self.backing.display()
                )
            })?;
            crate::host::state::forget_loop(&self.path);
            tracing::debug!("detached {}", self.path.display());
        }
        Ok(())
    }
}

/// `LOOP_CTL_GET_FREE`: the number of a free loop device (the kernel adds one if none is).
fn next_free(ctl: &File) -> std::io::Result<u32> {
    const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
    // SAFETY: the ioctl takes no argument and returns a device number or -1.
    let n = unsafe { libc::ioctl(ctl.as_raw_fd(), LOOP_CTL_GET_FREE as _) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(n as u32)
}

/// The `MAJOR:MINOR` of block device `name` (`loop7`) from sysfs.
pub fn sysfs_devnum(name: &str) -> Result<(u32, u32)> {
    let candidates = [
        format!("/sys/block/{name}/dev"),
        format!("/sys/devices/virtual/block/{name}/dev"),
    ];
    for c in &candidates {
        if let Ok(s) = std::fs::read_to_string(c) {
            return parse_devnum(&s).with_context(|| format!("{c} holds {:?}, not MAJOR:MINOR", s.trim()));
        }
    }
    anyhow::bail!(
        "{name} is not in sysfs ({}): is /sys mounted (in a container: run with --privileged)?",
        candidates.join(", ")
    )
}

fn parse_devnum(s: &str) -> Option<(u32, u32)> {
    let (ma, mi) = s.trim().split_once(':')?;
    Some((ma.parse().ok()?, mi.parse().ok()?))
}

/// `/dev/loopN`, made with mknod (major:minor from sysfs) when it is missing, as in a
/// container whose /dev was copied before the kernel created loopN. An existing node
/// must be the block device sysfs names; a node some other process makes at the same
/// moment is fine.
pub fn ensure_node(n: u32) -> Result<PathBuf> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let name = format!("loop{n}");
    let path = PathBuf::from(format!("/dev/{name}"));
    let (major, minor) = sysfs_devnum(&name)?;
    let want = libc::makedev(major, minor);
    match std::fs::metadata(&path) {
        Ok(m) if m.file_type().is_block_device() && m.rdev() == want => return Ok(path),
        Ok(m) => anyhow::bail!(
            "{} exists but is not block device {major}:{minor} (mode {:o}, rdev {:#x}); remove it or fix /dev",
            path.display(),
            m.mode(),
            m.rdev()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("stat {}", path.display())),
    }
    match nix::sys::stat::mknod(
        &path,
        nix::sys::stat::SFlag::S_IFBLK,
        nix::sys::stat::Mode::from_bits_truncate(0o660),
        want,
    ) {
        Ok(()) => {
            tracing::info!(
                "made {} (block {major}:{minor}): the device is newer than this /dev (a container's)",
                path.display()
            );
            Ok(path)
        }
        Err(nix::errno::Errno::EEXIST) => Ok(path),
        Err(e) => Err(e).with_context(|| {
            format!(
                "making the missing node {} (block {major}:{minor}); in a container kiln needs --privileged (CAP_MKNOD \
                 and the devices cgroup)",
                path.display()
            )
        }),
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        if let Err(e) = self.detach() {
            // Autoclear still releases it once the last user closes it.
            tracing::warn!("{e:#}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devnum_parses_sysfs_format() {
        assert_eq!(parse_devnum("7:12\n"), Some((7, 12)));
        assert_eq!(parse_devnum("259:0"), Some((259, 0)));
        assert_eq!(parse_devnum("7"), None);
        assert_eq!(parse_devnum("a:b"), None);
    }
}
