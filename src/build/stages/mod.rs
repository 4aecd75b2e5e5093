//! Provisioning stages, each run inside the image through the chroot session.

pub mod apt;
pub mod bootloader;
pub mod chroot;
pub mod dkms;
pub mod hooks;
pub mod kernel;
pub mod overlays;
pub mod scrub;
pub mod signing;
