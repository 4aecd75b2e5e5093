//! Reading an image: `open` (a raw or qcow2 disk, its GPT and filesystems, its ext4 root
//! read in place without mounting), the facts read from a root (`os_release`, `kernels`,
//! `dpkg`), and what is built on them: `inspect` (partitions, filesystems, packages,
//! kernels), the API registration `payload`, and `verify` against the definition's
//! expectations (module signatures read by `modsig`). `kernels` and `dpkg` also serve the build on its mounted root.

pub mod copyright;
pub mod diff;
pub mod dpkg;
pub mod inspect;
pub mod kernels;
pub mod modsig;
pub mod open;
pub mod os_release;
pub mod payload;
pub mod sbom;
pub mod verify;
