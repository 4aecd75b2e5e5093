//! Host resources: the one command runner, mounts and loop devices as guards, the state
//! ledger of what a build holds, cancellation, directory locks, the build's own PID namespace, confined
//! writes into an image root, progress reporting, and `doctor` for leftovers. Nothing
//! here knows about images, definitions or build stages.

pub mod buildlog;
pub mod cancel;
pub mod cmd;
pub mod dirlock;
pub mod doctor;
pub mod download;
pub mod loopdev;
pub mod mounts;
pub mod progress;
pub mod rootdir;
pub mod state;
pub mod supervisor;
