//! Nothing outlives kiln: `kiln build` runs as PID 1 of a PID namespace of its own.
//!
//! The process the user (or CI) starts is a small supervisor. Before any thread exists
//! it unshares a PID namespace and forks; the child becomes PID 1 of that namespace and
//! runs the whole build, and so everything the build starts (apt, dpkg, maintainer
//! scripts, DKMS and its compilers, hooks and whatever they fork) lives in that
//! namespace. When a PID namespace's init dies, the kernel SIGKILLs every other process
//! in it, nested namespaces included; nothing can escape by daemonizing, double-forking
//! or changing credentials.
//!
//! Why this and not the alternatives:
//! - A parent-death signal on each child (what `unshare --kill-child` relies on) is not a
//!   guarantee: the kernel clears it when the process changes credentials, and it only
//!   reaches the direct child, so a tree under `apt-get` kept compiling after kiln was
//!   SIGKILLed.
//! - A cgroup killed as a whole needs a delegated, writable cgroup v2 hierarchy; this
//!   is not there on hybrid-cgroup hosts or in many `--privileged` containers.
//!
//! The one parent-death signal left is the build process's own: kiln sets it in code it
//! controls, and that process never execs and never changes its credentials, so the
//! kernel keeps it. A pipe closes the race between `fork` and `prctl`: if the supervisor
//! died before the signal was armed, the child sees the pipe's writer gone and exits.
//!
//! Signals: SIGINT, SIGTERM and SIGHUP to the supervisor are forwarded once each to the
//! build (which unwinds its guards, see [`crate::host::cancel`]); the build is in its own
//! process group so a terminal's Ctrl-C reaches it only through the supervisor. The
//! supervisor exits with the build's exit code, or dies by the same signal that killed it.
//!
//! When a command is cancelled, and when the build ends, the build (as PID 1) sends
//! SIGKILL to every other process of its namespace ([`kill_session`]), so a cancelled
//! build also releases its mounts and loop devices at once.

use anyhow::{Context, Result};
use std::sync::atomic::{AtomicI32, Ordering};

/// The environment variable that marks every process of a build's session; its value
/// is the build's work directory. `kiln doctor` finds leftovers by it, never by name.
pub const SESSION_ENV: &str = "KILN_SESSION";

static CHILD: AtomicI32 = AtomicI32::new(0);
static UP: AtomicI32 = AtomicI32::new(-1);
static HOST_PID: AtomicI32 = AtomicI32::new(0);

/// The build process's PID as the host sees it (in its own namespace it is 1).
pub fn host_pid() -> u32 {
    match HOST_PID.load(Ordering::SeqCst) {
        0 => std::process::id(),
        p => p as u32,
    }
}

/// Are we PID 1 of the build's own namespace?
pub fn is_session_init() -> bool {
    HOST_PID.load(Ordering::SeqCst) != 0
}

extern "C" fn forward(sig: libc::c_int) {
    let child = CHILD.load(Ordering::SeqCst);
    if child > 0 {
        let sig = if sig == libc::SIGHUP { libc::SIGTERM } else { sig };
        unsafe { libc::kill(child, sig) };
    }
}

/// Split into supervisor and build. Must be called while the process is single-threaded.
/// Returns in the build process (PID 1 of the new namespace); the supervisor never
/// returns: it waits for the build and exits as it did.
pub fn enter_own_pid_namespace() -> Result<()> {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWPID).context(
        "creating a PID namespace for the build (unshare CLONE_NEWPID): kiln build must run as root \
         (in a container: --privileged)",
    )?;
    let cloexec = nix::fcntl::OFlag::O_CLOEXEC;
    // down: the supervisor's end closing tells a just-forked build that it is gone.
    // up: the build's test-only way to have its supervisor SIGKILLed (fault injection:
    // as PID 1 of its namespace the build itself is immune to its own SIGKILL).
    let (rd, wr) = nix::unistd::pipe2(cloexec).context("creating the supervisor pipe")?;
    let (up_rd, up_wr) = nix::unistd::pipe2(cloexec).context("creating the supervisor pipe")?;
    match unsafe { nix::unistd::fork() }.context("forking the build process")? {
        nix::unistd::ForkResult::Child => {
            drop(wr);
            drop(up_rd);
            UP.store(std::os::fd::IntoRawFd::into_raw_fd(up_wr), Ordering::SeqCst);
            unsafe {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    libc::_exit(125);
                }
                // The supervisor died before the signal was armed: its end is closed.
                let mut pfd = libc::pollfd {
                    fd: std::os::fd::AsRawFd::as_raw_fd(&rd),
                    events: 0,
                    revents: 0,
                };
                if libc::poll(&mut pfd, 1, 0) > 0 && pfd.revents & libc::POLLHUP != 0 {
                    libc::_exit(125);
                }
                // Our own process group: a terminal's Ctrl-C goes to the supervisor,
                // which forwards it once.
                libc::setpgid(0, 0);
            }
            // The read end stays open (and unread) for the build's lifetime.
            std::mem::forget(rd);
            // /proc is still the host's: "self" resolves to our PID there.
            let pid = std::fs::read_link("/proc/self")
                .ok()
                .and_then(|p| p.to_str().and_then(|s| s.parse::<i32>().ok()))
                .unwrap_or(0);
            HOST_PID.store(pid, Ordering::SeqCst);
            Ok(())
        }
        nix::unistd::ForkResult::Parent { child } => {
            drop(rd);
            drop(up_wr);
            CHILD.store(child.as_raw(), Ordering::SeqCst);
            use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
            let act = SigAction::new(SigHandler::Handler(forward), SaFlags::SA_RESTART, SigSet::empty());
            for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
                unsafe {
                    let _ = sigaction(s, &act);
                }
            }
            // Until the build exits (its end of `up` closes) or asks to be SIGKILLed.
            let mut byte = [0u8; 1];
            loop {
                match nix::unistd::read(&up_rd, &mut byte) {
                    Err(nix::errno::Errno::EINTR) => continue,
                    Ok(1) if byte[0] == b'K' => unsafe {
                        libc::raise(libc::SIGKILL);
                    },
                    _ => break,
                }
            }
            let status = loop {
                match nix::sys::wait::waitpid(child, None) {
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(e) => {
                        eprintln!("error: waiting for the build process: {e}");
                        std::process::exit(1);
                    }
                    Ok(s) => break s,
                }
            };
            drop(wr);
            match status {
                nix::sys::wait::WaitStatus::Exited(_, code) => std::process::exit(code),
                nix::sys::wait::WaitStatus::Signaled(_, sig, _) => {
                    // Die the same way, so callers see what happened to the build.
                    unsafe {
                        libc::signal(sig as libc::c_int, libc::SIG_DFL);
                        libc::raise(sig as libc::c_int);
                    }
                    std::process::exit(128 + sig as i32);
                }
                _ => std::process::exit(1),
            }
        }
    }
}

/// Have the supervisor (the process the user started) SIGKILLed, as if by the user: it
/// dies, and with it (parent-death signal) this build and its whole namespace. For fault
/// injection in tests; outside a supervised build, SIGKILL this process.
pub fn sigkill_kiln() -> ! {
    let fd = UP.load(Ordering::SeqCst);
    unsafe {
        if fd >= 0 {
            libc::write(fd, b"K".as_ptr().cast(), 1);
        } else {
            libc::raise(libc::SIGKILL);
        }
        loop {
            libc::pause();
        }
    }
}

/// SIGKILL every process of the build's namespace but the build itself, and wait (at
/// most 10 s) until they are gone, so their mounts and loop devices are released.
/// Called only when no command of the runner is waiting for its own child. A no-op
/// outside the build's own namespace (unit tests, other commands).
pub fn kill_session() {
    if !is_session_init() {
        return;
    }
    // As PID 1 of the namespace, kill(-1) reaches every other process in it (and in
    // namespaces nested in it), never the caller. Orphans are re-parented to us, so
    // once none is left to reap, none is left at all.
    if unsafe { libc::kill(-1, libc::SIGKILL) } == 0 {
        tracing::debug!("killed what was left of the build session");
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => {
                if std::time::Instant::now() > deadline {
                    tracing::warn!("processes of the build session are still exiting after 10 s");
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return, // ECHILD: nothing left
        }
    }
}

static MARKER: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Mark every command started from now on as part of the build whose work directory
/// is `workdir` (see [`SESSION_ENV`]).
pub fn set_session_marker(workdir: &std::path::Path) {
    let _ = MARKER.set(workdir.to_string_lossy().into_owned());
}

/// The session marker, once the build has one.
pub fn session_marker() -> Option<&'static str> {
    MARKER.get().map(String::as_str)
}
