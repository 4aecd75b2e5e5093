//! Reading a finished image without mounting it: `inspect` (partitions, filesystems,
//! packages, kernels), the API registration `payload`, and `verify` against the
//! definition's expectations.

pub mod inspect;
pub mod payload;
pub mod verify;
