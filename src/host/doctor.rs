//! `kiln doctor`: find what a crashed kiln left behind, and with `--fix` release it.
//!
//! kiln's own design leaves nothing after a crash (private mount namespace, autoclear
//! loop devices, the build as PID 1 of its own PID namespace), so doctor is the
//! backstop: it reports processes still marked as part of a build session whose build is
//! gone (by the `KILN_SESSION` marker, never by name), loop
//! devices still attached to kiln's partial images, mounts under kiln work directories
//! in the host's namespace, work directories with a state file of a process that is
//! gone, and partial outputs. `--fix` ends those processes, unmounts (deepest first),
//! detaches, and removes
//! work directories and partial outputs — a directory is removed only once nothing is
//! mounted in it.

use crate::{host::mounts, host::state, host::supervisor};
use anyhow::{Context, Result};
use serde::Serialize;
use std::path::{Path, PathBuf};

#[derive(Debug, Serialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Finding {
    Loop {
        device: PathBuf,
        backing: PathBuf,
    },
    Mount {
        target: PathBuf,
    },
    WorkDir {
        path: PathBuf,
        pid: Option<u32>,
    },
    Partial {
        path: PathBuf,
    },
    /// A process of a build session (marked with [`supervisor::SESSION_ENV`]) whose
    /// build is gone.
    Process {
        pid: u32,
        session: PathBuf,
        command: String,
    },
}

/// Is process `pid` running? A zombie (a killed build not yet reaped by its parent) is not.
fn pid_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // "pid (comm) S ...": the state follows the last ')'.
        Ok(stat) => {
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                != Some("Z")
        }
        Err(_) => false,
    }
}

/// Look for leftovers: globally (loop devices, mounts) and in `dirs` (output
/// directories: work directories and partial files).
pub fn scan(dirs: &[PathBuf]) -> Result<Vec<Finding>> {
    let mut out = session_processes();
    for e in std::fs::read_dir("/sys/block").context("reading /sys/block")?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with("loop") {
            continue;
        }
        let dev = PathBuf::from(format!("/dev/{name}"));
        if let Some(b) = state::loop_backing(&dev) {
            // The backing path is the one the attaching process saw: for a build in a
            // container it is the container's path (/work/out/x.raw.partial), which may
            // not exist here. So kiln's are recognised by name, and a running build by
            // its work directory (when the path resolves here) or by a live process
            // holding the device open (kiln holds every device it attached).
            let running = b.parent().is_some_and(dirs_running) || held_open(&name);
            if is_kiln_backing(&b) && !running {
                out.push(Finding::Loop {
                    device: dev,
                    backing: b,
                });
            }
        }
    }
    for target in mounts::mount_points() {
        if target.to_string_lossy().contains("/.kiln-work-") {
            out.push(Finding::Mount { target });
        }
    }
    for d in dirs {
        let Ok(rd) = std::fs::read_dir(d) else { continue };
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            let p = e.path();
            if n.starts_with(".kiln-work-") && p.is_dir() {
                let pid = state::read(&p).ok().flatten().map(|s| s.pid);
                if workdir_alive(&p) {
                    continue; // a running build
                }
                out.push(Finding::WorkDir { path: p, pid });
            } else if n.ends_with(".partial") {
                let busy = dirs_running(d);
                if !busy {
                    out.push(Finding::Partial { path: p });
                }
            }
        }
    }
    Ok(out)
}

/// Is `backing` (a loop device's backing file as sysfs shows it) one of kiln's: a
/// partial output (`NAME.raw.partial`) or a file in a work directory (`.kiln-work-*`)?
/// By name only, since the path may be a container's.
pub fn is_kiln_backing(backing: &Path) -> bool {
    let s = backing.to_string_lossy();
    let s = s.trim_end_matches(" (deleted)");
    s.ends_with(".raw.partial") || s.contains("/.kiln-work-")
}

/// Does a process this /proc shows hold block device `name` (`loop3`) open? By device
/// number, so it works whatever path the process opened it by (a container's /dev).
/// A doctor in a separate PID namespace (a new container) sees only its own processes;
/// detaching a device that is still in use is safe all the same: the kernel only marks
/// a busy device for autoclear, which kiln's devices already are.
fn held_open(name: &str) -> bool {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let Ok((major, minor)) = crate::host::loopdev::sysfs_devnum(name) else {
        return false;
    };
    let want = libc::makedev(major, minor);
    let me = std::process::id().to_string();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return false;
    };
    procs.flatten().any(|p| {
        let pid = p.file_name();
        let pid = pid.to_string_lossy();
        if pid == me || !pid.bytes().all(|b| b.is_ascii_digit()) {
            return false;
        }
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            return false;
        };
        fds.flatten()
            .any(|fd| std::fs::metadata(fd.path()).is_ok_and(|m| m.file_type().is_block_device() && m.rdev() == want))
    })
}

/// Processes marked as part of a build session whose build is no longer running. By
/// the marker in their environment, never by name: kiln runs every session as PID 1 of
/// its own namespace, so this finds something only if that guarantee was broken (or the
/// session came from an older kiln).
fn session_processes() -> Vec<Finding> {
    let mut out = Vec::new();
    let me = std::process::id();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return out;
    };
    let key = format!("{}=", supervisor::SESSION_ENV);
    for e in procs.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(env) = std::fs::read(e.path().join("environ")) else {
            continue;
        };
        let Some(session) = env
            .split(|b| *b == 0)
            .find_map(|v| v.strip_prefix(key.as_bytes()))
            .map(|v| PathBuf::from(String::from_utf8_lossy(v).into_owned()))
        else {
            continue;
        };
        if session_build_alive(pid, &session) {
            continue;
        }
        let command = std::fs::read(e.path().join("cmdline"))
            .map(|c| String::from_utf8_lossy(&c).replace('\0', " ").trim_end().to_string())
            .unwrap_or_default();
        out.push(Finding::Process { pid, session, command });
    }
    out
}

/// Is the build that `session` (a work directory, as the session's processes see it)
/// names still running? The path is resolved through the root (`/proc/PID/root`) of the
/// process or of its nearest ancestor in whose root it exists: commands in the image
/// are chrooted, but their parents (`unshare`, the build itself) see the build's
/// filesystem, a container's included. The answer comes from the build's lock on its work
/// directory, which holds across PID and mount namespaces. No ancestor that sees the work
/// directory means the build is gone (an orphan is re-parented outside it). In doubt (no
/// lock file: an older kiln), alive: doctor never kills what may be a running build.
fn session_build_alive(pid: u32, session: &Path) -> bool {
    let rel = session.strip_prefix("/").unwrap_or(session);
    let mut p = pid;
    for _ in 0..64 {
        let work = Path::new("/proc").join(p.to_string()).join("root").join(rel);
        if work.is_dir() {
            return match state::build_alive(&work) {
                Some(alive) => alive,
                None => state::read(&work).ok().flatten().is_none_or(|s| pid_alive(s.pid)),
            };
        }
        match parent_pid(p) {
            Some(pp) if pp > 1 => p = pp,
            _ => return false,
        }
    }
    false
}

/// The parent of `pid`, from /proc/PID/stat ("pid (comm) state ppid ...").
fn parent_pid(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()
}

/// SIGKILL leftover session processes and wait (10 s at most) until they are gone.
fn end_processes(findings: &[Finding]) -> Result<()> {
    let pids: Vec<u32> = findings
        .iter()
        .filter_map(|f| {
            if let Finding::Process { pid, .. } = f {
                Some(*pid)
            } else {
                None
            }
        })
        .collect();
    for pid in &pids {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(*pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while pids.iter().any(|p| pid_alive(*p)) {
        if std::time::Instant::now() > deadline {
            anyhow::bail!("session processes still running 10 s after SIGKILL: {pids:?}");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    for pid in &pids {
        println!("ended process {pid}");
    }
    Ok(())
}

/// Is the build of work directory `w` running? By its lock (works across PID
/// namespaces: a build in a container), else by the pid it recorded.
fn workdir_alive(w: &Path) -> bool {
    state::build_alive(w).unwrap_or_else(|| state::read(w).ok().flatten().is_some_and(|s| pid_alive(s.pid)))
}

/// Is a kiln build running in output directory `d`?
fn dirs_running(d: &Path) -> bool {
    std::fs::read_dir(d)
        .map(|rd| {
            rd.flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with(".kiln-work-") && workdir_alive(&e.path()))
        })
        .unwrap_or(false)
}

/// Release findings: session processes, then mounts deepest first, then loop devices, then directories/files.
pub fn fix(findings: &[Finding]) -> Result<()> {
    // Processes first: they are what holds the mounts and loop devices.
    end_processes(findings)?;
    let mut mounts: Vec<&PathBuf> = findings
        .iter()
        .filter_map(|f| {
            if let Finding::Mount { target } = f {
                Some(target)
            } else {
                None
            }
        })
        .collect();
    mounts.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
    for m in &mounts {
        // A build killed while it copied a layer left its root frozen (fsfreeze), and a
        // frozen filesystem cannot be unmounted cleanly: thaw it first. Thawing one that
        // is not frozen fails harmlessly.
        if crate::host::cmd::Cmd::new("fsfreeze")
            .arg("-u")
            .arg(m.as_path())
            .run()
            .is_ok()
        {
            println!("thawed {}, frozen by a killed build", m.display());
        }
        nix::mount::umount2(m.as_path(), nix::mount::MntFlags::empty())
            .with_context(|| format!("unmounting {}", m.display()))?;
        println!("unmounted {}", m.display());
    }
    for f in findings {
        if let Finding::Loop { device, .. } = f {
            // In a new container the device may have no node yet.
            let n = device
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_prefix("loop"))
                .and_then(|n| n.parse::<u32>().ok());
            if let Some(n) = n {
                crate::host::loopdev::ensure_node(n)?;
            }
            loopdev::LoopDevice::open(device)
                .and_then(|d| d.detach())
                .with_context(|| format!("detaching {}", device.display()))?;
            println!("detached {}", device.display());
        }
    }
    let still_mounted = mounts::mount_points();
    for f in findings {
        match f {
            Finding::WorkDir { path, .. } => {
                if still_mounted.iter().any(|m| m.starts_with(path)) {
                    anyhow::bail!("{} still has something mounted; not removing it", path.display());
                }
                std::fs::remove_dir_all(path).with_context(|| format!("removing {}", path.display()))?;
                println!("removed {}", path.display());
            }
            Finding::Partial { path } => {
                std::fs::remove_file(path).with_context(|| format!("removing {}", path.display()))?;
                println!("removed {}", path.display());
            }
            _ => {}
        }
    }
    Ok(())
}

pub fn cmd_doctor(dirs: &[PathBuf], do_fix: bool, json: bool) -> Result<()> {
    let findings = scan(dirs)?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ "findings": findings }))?
        );
    } else if findings.is_empty() {
        println!("nothing left behind by kiln");
    } else {
        for f in &findings {
            match f {
                Finding::Loop { device, backing } => {
                    println!("loop device {} attached to {}", device.display(), backing.display())
                }
                Finding::Mount { target } => println!("mount {}", target.display()),
                Finding::WorkDir { path, pid } => println!(
                    "work directory {} (kiln pid {} is gone)",
                    path.display(),
                    pid.map(|p| p.to_string()).unwrap_or("?".into())
                ),
                Finding::Partial { path } => println!("partial output {}", path.display()),
                Finding::Process { pid, session, command } => {
                    println!(
                        "process {pid} of the build session {} is still running: {command}",
                        session.display()
                    )
                }
            }
        }
    }
    if findings.is_empty() {
        return Ok(());
    }
    if do_fix {
        fix(&findings)?;
        return Ok(());
    }
    anyhow::bail!(
        "{} leftover(s) found; run `kiln doctor --fix {}` to release them",
        findings.len(),
        dirs.iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(" ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kiln_backings_are_recognised_by_name_whatever_the_path() {
        // A container's paths, which need not exist on the host.
        assert!(is_kiln_backing(Path::new("/work/out/gpu.raw.partial")));
        assert!(is_kiln_backing(Path::new("/work/out/gpu.raw.partial (deleted)")));
        assert!(is_kiln_backing(Path::new("/out/.kiln-work-1234/base.raw")));
        assert!(!is_kiln_backing(Path::new("/var/lib/images/gpu.raw")));
        assert!(!is_kiln_backing(Path::new("/home/u/disk.img")));
    }
}
