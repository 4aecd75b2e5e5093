//! `kiln build`: the pipeline (`pipeline`) and what it runs: the base (`acquire`),
//! the root tarball (`unpack`), per-stage timings, and the provisioning stages
//! (`provision` drives `stages`: chroot session, apt, overlays, hooks, scrub,
//! bootloader).

pub mod acquire;
pub mod pipeline;
pub mod provision;
pub mod stages;
pub mod timings;
pub mod unpack;

pub use pipeline::{BuildOpts, BuildReport, build};
