//! kiln builds GPU Kubernetes node images offline, by writing the disk directly.
//!
//! Layers, each depending only on the ones above it in this list:
//! - [`error`]: error kinds (user errors exit 2);
//! - [`host`]: the command runner, mounts and loop devices as guards, the state ledger,
//!   cancellation, the build's own PID namespace, confined writes into an image root,
//!   `doctor`;
//! - [`disk`]: GPT, FAT, sparse files, checksums;
//! - [`definition`]: image definitions (`images/*.toml`) and what they expect of an image;
//! - [`image`]: reading a finished image without mounting it (inspect, payload, verify);
//! - [`build`]: the pipeline and its stages;
//! - [`publish`]: uploading a finished image to S3 and registering its payload;
//! - [`boottest`]: booting a throwaway copy in QEMU and checking it from inside.

pub mod boottest;
pub mod build;
pub mod definition;
pub mod disk;
pub mod error;
pub mod host;
pub mod image;
pub mod publish;
