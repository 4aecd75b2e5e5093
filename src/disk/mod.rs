//! Disk formats: GPT (fresh cloud layout, grow), FAT in userspace (the ESP, the
//! cloud-init seed), sparse files, and the hole-skipping checksum. Nothing here knows
//! about images or build stages.

pub mod checksum;
pub mod fat;
pub mod gpt;
pub mod sparse;
