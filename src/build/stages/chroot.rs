//! The chroot session: what a package script needs to run inside the image, and nothing
//! that outlives the build.
//!
//! Inside the image root it mounts /proc, /sys, /dev (bind, read-only for the host's
//! devices), a fresh /dev/pts, and tmpfs on /run and /tmp — all on kiln's [`MountStack`]
//! in kiln's private mount namespace. Ubuntu's /etc/resolv.conf is a symlink to
//! ../run/systemd/resolve/stub-resolv.conf; since /run is a fresh tmpfs, the host's
//! resolver is written there and the image's symlink is never touched. A policy-rc.d
//! keeps package scripts from starting services. Every command runs in its own PID
//! namespace (`unshare --pid --fork --kill-child`), so a daemon a package script starts
//! dies with it. [`Session::close`] removes all of it.

use crate::host::cmd::Cmd;
use crate::host::mounts::MountStack;
use crate::host::rootdir::RootDir;
use anyhow::{Context, Result};
use nix::mount::MsFlags;
use std::path::{Path, PathBuf};

const POLICY_RC_D: &str = "/usr/sbin/policy-rc.d";
const POLICY_MARK: &str = "# kiln: no services start during the image build\n";
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

pub struct Session {
    root: PathBuf,
    /// /proc of the image, resolved inside the root.
    proc_mp: PathBuf,
    depth: usize,
    saved_policy: Option<Vec<u8>>,
    pub jobs: usize,
    /// `SOURCE_DATE_EPOCH` for every command (reproducible builds).
    pub source_date_epoch: Option<u64>,
}

/// Extra kernel-module compiler flags for builds in the image (see [`Session::cmd`]).
pub const KCFLAGS: &str = "-g0";

impl Session {
    pub fn enter(root: &Path, rd: &RootDir, mounts: &mut MountStack) -> Result<Session> {
        let depth = mounts.len();
        let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
        // Mount points are resolved inside the image root: a symlinked /proc or /run in
        // the image must not send a mount onto the host.
        let mp = |d: &str| rd.mount_point(d);
        let proc_mp = mp("/proc")?;
        mounts.mount("proc", &proc_mp, Some("proc"), nosuid, None)?;
        mounts.mount("sysfs", &mp("/sys")?, Some("sysfs"), nosuid | MsFlags::MS_RDONLY, None)?;
        mounts.bind(Path::new("/dev"), &mp("/dev")?, false)?;
        mounts.mount(
            "devpts",
            &mp("/dev/pts")?,
            Some("devpts"),
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            Some("newinstance,ptmxmode=0666,mode=620,gid=5"),
        )?;
        mounts.mount(
            "tmpfs",
            &mp("/run")?,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=755"),
        )?;
        mounts.mount(
            "tmpfs",
            &mp("/tmp")?,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=1777"),
        )?;

        // The resolver: Ubuntu's resolv.conf points into /run, now our tmpfs.
        let host_resolv = std::fs::read("/etc/resolv.conf").unwrap_or_default();
        rd.create_dir_all("/run/systemd/resolve", 0o755)?;
        rd.write_file("/run/systemd/resolve/stub-resolv.conf", &host_resolv, 0o644)?;
        rd.write_file("/run/systemd/resolve/resolv.conf", &host_resolv, 0o644)?;
        let md = rd.symlink_metadata("/etc/resolv.conf").ok();
        if !md.as_ref().is_some_and(|m| m.file_type().is_symlink()) {
            tracing::warn!("the image's /etc/resolv.conf is not a symlink into /run; apt may not resolve names");
        }

        let saved_policy = if rd.exists(POLICY_RC_D)? {
            Some(rd.read(POLICY_RC_D)?)
        } else {
            None
        };
        write_policy(rd)?;
        let jobs = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
        Ok(Session {
            root: root.to_owned(),
            proc_mp,
            depth,
            saved_policy,
            jobs,
            source_date_epoch: None,
        })
    }

    /// A command to run inside the image.
    pub fn cmd(&self, program: &str) -> Cmd {
        let cmd = self.cmd_plain(program);
        match self.source_date_epoch {
            Some(e) => cmd.env("SOURCE_DATE_EPOCH", e.to_string()),
            None => cmd,
        }
    }

    fn cmd_plain(&self, program: &str) -> Cmd {
        Cmd::new("unshare")
            .args(["--pid", "--fork", "--kill-child"])
            .arg(format!("--mount-proc={}", self.proc_mp.display()))
            .arg("--")
            .arg("chroot")
            .arg(&self.root)
            .arg(program)
            .env_clear_to(&[])
            .env("PATH", PATH)
            .env("HOME", "/root")
            .env("LC_ALL", "C.UTF-8")
            .env("LANG", "C.UTF-8")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .env("DEBCONF_NONINTERACTIVE_SEEN", "true")
            .env("TERM", "dumb")
            .env("MAKEFLAGS", format!("-j{}", self.jobs))
            // Kernel modules built here (DKMS) are stripped of debug info when they are
            // installed (dkms.conf STRIP defaults to yes), so generating it is wasted
            // work, and the NVIDIA modules are the build's longest step. kbuild
            // appends KCFLAGS last, so -g0 wins over the kernel config's -g.
            .env("KCFLAGS", KCFLAGS)
    }

    /// The image's own policy-rc.d back in place (a layer, `build/layers.rs`, is taken
    /// without the session's files); [`Session::resume`] puts kiln's back.
    pub fn suspend(&self, rd: &RootDir) -> Result<()> {
        match &self.saved_policy {
            Some(orig) => rd.write_file(POLICY_RC_D, orig, 0o755),
            None => rd.remove_file(POLICY_RC_D),
        }
    }

    /// Undo [`Session::suspend`].
    pub fn resume(&self, rd: &RootDir) -> Result<()> {
        write_policy(rd)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Tear down: every process left of the session killed, policy-rc.d restored or
    /// removed, mounts released in reverse.
    pub fn close(self, rd: &RootDir, mounts: &mut MountStack) -> Result<()> {
        // Nothing the session started may keep its mounts busy (or outlive it).
        crate::host::supervisor::kill_session();
        let r1 = self.suspend(rd);
        let r2 = mounts
            .unwind_to(self.depth)
            .context("releasing the chroot session's mounts");
        r1.context("removing policy-rc.d")?;
        r2
    }
}

/// kiln's policy-rc.d: no service starts during the build.
fn write_policy(rd: &RootDir) -> Result<()> {
    rd.create_dir_all("/usr/sbin", 0o755)?;
    rd.write_file(
        POLICY_RC_D,
        format!("#!/bin/sh\n{POLICY_MARK}exit 101\n").as_bytes(),
        0o755,
    )
}
