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

use anyhow::{Context, Result};
use loopdev::{LoopControl, LoopDevice};
use std::fs::OpenOptions;
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
        let ctl = LoopControl::open().context(
            "opening /dev/loop-control: kiln needs root and the loop module (modprobe loop; in a container run with --privileged)",
        )?;
        // Another process can take the device between GET_FREE and SET_FD: retry.
        let mut last_err = None;
        for _ in 0..10 {
            let dev = ctl.next_free().context(
                "no free loop device (losetup -a lists the ones in use; `kiln doctor` finds ones kiln left)",
            )?;
            let path = dev.path().unwrap_or_else(|| PathBuf::from("/dev/loop?"));
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

impl Drop for Loop {
    fn drop(&mut self) {
        if let Err(e) = self.detach() {
            // Autoclear still releases it once the last user closes it.
            tracing::warn!("{e:#}");
        }
    }
}
