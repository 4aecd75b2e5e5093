//! The work directory's record of what a running build holds (loop devices, mounts),
//! so that `kiln doctor` can find and release what a crashed kiln left behind, and a new
//! build refuses to reuse a work directory with stale resources.
//!
//! The record is a small JSON file, rewritten (atomically) on every change.

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

pub const STATE_FILE: &str = "kiln-state.json";

#[derive(Default, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct State {
    pub pid: u32,
    pub loops: Vec<(PathBuf, PathBuf)>,
    pub mounts: Vec<PathBuf>,
}

static CURRENT: Mutex<Option<(PathBuf, State)>> = Mutex::new(None);

/// `workdir/kiln.lock`, held (flock) by the build for as long as it runs. A pid alone
/// cannot say whether a build is alive once builds run in containers (the pid is the
/// one in the build's PID namespace); a lock on the shared file can, from the host or
/// any container, and the kernel drops it when the build dies, by any signal.
pub const LOCK_FILE: &str = "kiln.lock";
static LOCK: Mutex<Option<std::fs::File>> = Mutex::new(None);

/// Is the build of `workdir` running? `None` when it has no lock file (an older kiln).
pub fn build_alive(workdir: &Path) -> Option<bool> {
    use std::os::unix::io::AsRawFd;
    let f = std::fs::File::open(workdir.join(LOCK_FILE)).ok()?;
    // SAFETY: flock on an open descriptor.
    let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) };
    Some(r != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EWOULDBLOCK))
}

/// Start recording into `workdir/kiln-state.json`.
pub fn start(workdir: &Path) -> Result<()> {
    {
        use std::os::unix::io::AsRawFd;
        let lock = workdir.join(LOCK_FILE);
        let f = std::fs::File::create(&lock).with_context(|| format!("creating {}", lock.display()))?;
        // SAFETY: flock on an open descriptor.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            anyhow::bail!("{} is locked: another build uses this work directory", lock.display());
        }
        *LOCK.lock().unwrap() = Some(f);
    }
    let path = workdir.join(STATE_FILE);
    let st = State {
        pid: crate::host::supervisor::host_pid(),
        ..Default::default()
    };
    write(&path, &st)?;
    *CURRENT.lock().unwrap() = Some((path, st));
    Ok(())
}

/// Stop recording and remove the file (everything was released).
pub fn finish() {
    if let Some((path, _)) = CURRENT.lock().unwrap().take() {
        let _ = std::fs::remove_file(path);
    }
    LOCK.lock().unwrap().take();
}

pub fn read(workdir: &Path) -> Result<Option<State>> {
    let path = workdir.join(STATE_FILE);
    match std::fs::read(&path) {
        Ok(b) => Ok(Some(
            serde_json::from_slice(&b).with_context(|| format!("parsing {}", path.display()))?,
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

fn write(path: &Path, st: &State) -> Result<()> {
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(st)?).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming {}", tmp.display()))?;
    Ok(())
}

fn update(f: impl FnOnce(&mut State)) {
    let mut g = CURRENT.lock().unwrap();
    if let Some((path, st)) = g.as_mut() {
        f(st);
        if let Err(e) = write(path, st) {
            tracing::warn!("could not update the state file: {e:#}");
        }
    }
}

pub fn record_loop(dev: &Path, backing: &Path) {
    update(|s| s.loops.push((dev.to_owned(), backing.to_owned())));
}

pub fn forget_loop(dev: &Path) {
    update(|s| s.loops.retain(|(d, _)| d != dev));
}

pub fn record_mount(target: &Path) {
    update(|s| s.mounts.push(target.to_owned()));
}

pub fn forget_mount(target: &Path) {
    update(|s| s.mounts.retain(|t| t != target));
}

/// Does `workdir`'s state file name a loop device or mount that is still there?
pub fn holds_anything(workdir: &Path) -> bool {
    !stale_resources(workdir).unwrap_or_default().is_empty()
}

/// Resources recorded in `workdir`'s state file that still exist: loop devices still
/// attached to the recorded backing file, and mount points still mounted.
pub fn stale_resources(workdir: &Path) -> Result<Vec<Resource>> {
    let Some(st) = read(workdir)? else { return Ok(vec![]) };
    let mut out = Vec::new();
    for (dev, backing) in st.loops {
        if loop_backing(&dev).is_some_and(|b| b == backing) {
            out.push(Resource::Loop(dev, backing));
        }
    }
    let mounted = crate::host::mounts::mount_points();
    for m in st.mounts {
        if mounted.contains(&m) {
            out.push(Resource::Mount(m));
        }
    }
    Ok(out)
}

#[derive(Debug, Clone, PartialEq)]
pub enum Resource {
    Loop(PathBuf, PathBuf),
    Mount(PathBuf),
}

/// The backing file of an attached loop device, from sysfs.
pub fn loop_backing(dev: &Path) -> Option<PathBuf> {
    let name = dev.file_name()?.to_string_lossy().into_owned();
    let s = std::fs::read_to_string(format!("/sys/block/{name}/loop/backing_file")).ok()?;
    Some(PathBuf::from(s.trim_end()))
}
