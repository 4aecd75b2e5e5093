//! `kiln build`: the pipeline (`pipeline`) and what it runs: the base (`acquire`),
//! the root tarball (`unpack`), per-stage timings, and the provisioning stages
//! (`provision` drives `stages`: chroot session, apt, overlays, hooks, scrub,
//! bootloader).

pub mod acquire;
pub mod archive;
pub mod base;
pub mod bootstrap;
pub mod layers;
pub mod lock;
pub mod pipeline;
pub mod provision;
pub mod resolve;
pub mod stages;
pub mod timings;
pub mod unpack;

pub use pipeline::{BuildOpts, BuildReport, build};

/// A stage boundary: where a cancellation request (SIGINT/SIGTERM) and, in test builds,
/// an injected fault take effect; then the stage's timing starts.
pub fn boundary(timings: &mut timings::Timings, stage: &str) -> anyhow::Result<()> {
    crate::host::cancel::check()?;
    crate::host::cancel::fault_point(stage)?;
    timings.begin(stage);
    Ok(())
}
