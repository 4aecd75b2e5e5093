//! Cancellation: SIGINT and SIGTERM set a flag instead of killing kiln, so that the
//! running child is stopped and every guard (mounts, loop devices, partial outputs)
//! unwinds on the normal error path. A second signal exits at once; the private mount
//! namespace and autoclear loop devices still release everything then.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

static CANCELLED: AtomicBool = AtomicBool::new(false);
static SIGNALS: AtomicUsize = AtomicUsize::new(0);

#[derive(Debug)]
pub struct Cancelled;

impl std::fmt::Display for Cancelled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("interrupted by a signal; everything kiln had mounted or attached was released")
    }
}

impl std::error::Error for Cancelled {}

extern "C" fn on_signal(_: libc::c_int) {
    CANCELLED.store(true, Ordering::SeqCst);
    if SIGNALS.fetch_add(1, Ordering::SeqCst) >= 1 {
        unsafe { libc::_exit(130) };
    }
}

/// Install the SIGINT/SIGTERM handlers.
pub fn install() {
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
    let act = SigAction::new(SigHandler::Handler(on_signal), SaFlags::SA_RESTART, SigSet::empty());
    for s in [Signal::SIGINT, Signal::SIGTERM] {
        unsafe {
            let _ = sigaction(s, &act);
        }
    }
}

pub fn is_cancelled() -> bool {
    CANCELLED.load(Ordering::SeqCst)
}

/// Err if a signal asked kiln to stop.
pub fn check() -> anyhow::Result<()> {
    if is_cancelled() {
        return Err(Cancelled.into());
    }
    Ok(())
}

/// Without the `fault-injection` feature (the product) there are no faults to inject.
#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn fault_point(_stage: &str) -> anyhow::Result<()> {
    Ok(())
}

/// Test support, only with the `fault-injection` feature: `KILN_FAULT=STAGE:error|sigterm|sigkill`
/// injects a fault when the build reaches the boundary before STAGE (tests/safety.rs).
#[cfg(feature = "fault-injection")]
pub fn fault_point(stage: &str) -> anyhow::Result<()> {
    let Ok(spec) = std::env::var("KILN_FAULT") else {
        return Ok(());
    };
    let Some((at, what)) = spec.split_once(':') else {
        return Ok(());
    };
    if at != stage {
        return Ok(());
    }
    match what {
        "error" => anyhow::bail!("injected fault before stage {stage} (KILN_FAULT)"),
        "sigterm" => {
            unsafe { libc::raise(libc::SIGTERM) };
            check()
        }
        "sigkill" => crate::host::supervisor::sigkill_kiln(),
        _ => Ok(()),
    }
}
