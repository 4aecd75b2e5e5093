//! Which kernels an image has, read the same way from an unmounted image ([`RootFs`],
//! for `inspect` and `verify`) and from the mounted root during a build ([`RootDir`],
//! for kernel headers, the module check and the bootloader) — always from the image,
//! never the host's `uname -r`.

use crate::host::rootdir::RootDir;
use crate::image::dpkg::dpkg_version_cmp;
use crate::image::open::RootFs;
use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Read access to an image's tree, paths absolute inside the image, symlinks resolved
/// inside it (so `/lib/modules` works on merged-/usr systems).
pub trait ImageTree {
    /// Whether `path` is a directory (following symlinks); false if it does not exist.
    fn is_dir(&self, path: &str) -> Result<bool>;
    /// Names in directory `path`, sorted, without `.` and `..`.
    fn read_dir(&self, path: &str) -> Result<Vec<String>>;
    /// Whether something is at `path`.
    fn exists(&self, path: &str) -> Result<bool>;
}

impl ImageTree for RootFs {
    fn is_dir(&self, path: &str) -> Result<bool> {
        RootFs::is_dir(self, path)
    }
    fn read_dir(&self, path: &str) -> Result<Vec<String>> {
        RootFs::read_dir(self, path)
    }
    fn exists(&self, path: &str) -> Result<bool> {
        RootFs::exists(self, path)
    }
}

impl ImageTree for RootDir {
    fn is_dir(&self, path: &str) -> Result<bool> {
        RootDir::is_dir(self, path)
    }
    fn read_dir(&self, path: &str) -> Result<Vec<String>> {
        RootDir::read_dir(self, path)
    }
    fn exists(&self, path: &str) -> Result<bool> {
        RootDir::exists(self, path)
    }
}

/// One installed kernel version and where it was seen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelFacts {
    /// The version as in the file names, e.g. `5.15.0-91-generic`.
    pub version: String,
    /// `/boot/vmlinuz-VERSION` exists.
    pub vmlinuz: bool,
    /// `/boot/initrd.img-VERSION` exists.
    pub initrd: bool,
    /// `/lib/modules/VERSION` exists.
    pub modules: bool,
}

impl KernelFacts {
    /// The image can boot it: it has both the kernel and its modules.
    pub fn bootable(&self) -> bool {
        self.vmlinuz && self.modules
    }
}

/// Kernel versions from `/boot/vmlinuz-*`, `/boot/initrd.img-*` (only alongside one of
/// the others) and `/lib/modules/*`, newest first in dpkg order.
pub fn kernels(root: &impl ImageTree) -> Result<Vec<KernelFacts>> {
    let mut found: BTreeMap<String, KernelFacts> = BTreeMap::new();
    fn entry<'a>(found: &'a mut BTreeMap<String, KernelFacts>, v: &str) -> &'a mut KernelFacts {
        found.entry(v.to_string()).or_insert_with(|| KernelFacts {
            version: v.to_string(),
            vmlinuz: false,
            initrd: false,
            modules: false,
        })
    }
    if root.is_dir("/boot")? {
        for name in root.read_dir("/boot")? {
            if let Some(v) = name.strip_prefix("vmlinuz-").filter(|v| !v.is_empty()) {
                entry(&mut found, v).vmlinuz = true;
            }
        }
    }
    // /lib is a symlink to usr/lib on merged-/usr jammy; both trees resolve it.
    if root.is_dir("/lib/modules")? {
        for name in root.read_dir("/lib/modules")? {
            if root.is_dir(&format!("/lib/modules/{name}"))? {
                entry(&mut found, &name).modules = true;
            }
        }
    }
    for k in found.values_mut() {
        k.initrd = root.exists(&format!("/boot/initrd.img-{}", k.version))?;
    }
    let mut kernels: Vec<KernelFacts> = found.into_values().collect();
    kernels.sort_by(|a, b| dpkg_version_cmp(&b.version, &a.version));
    Ok(kernels)
}

/// Kernels the image boots: versions with both `/boot/vmlinuz-V` and a `/lib/modules/V`
/// directory, newest first.
pub fn bootable_kernels(root: &impl ImageTree) -> Result<Vec<String>> {
    Ok(kernels(root)?
        .into_iter()
        .filter(KernelFacts::bootable)
        .map(|k| k.version)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::inspect::test_images::images;

    /// The same tree, unmounted in the test image and as a directory on the host.
    #[test]
    fn image_and_host_tree_agree() {
        let dir = tempfile::tempdir().unwrap();
        let w = |p: &str| {
            let p = dir.path().join(p);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, "").unwrap();
        };
        w("usr/lib/modules/5.15.0-91-generic/modules.dep");
        w("usr/lib/modules/5.15.0-100-generic/modules.dep");
        for v in ["5.15.0-91-generic", "5.15.0-88-generic", "5.15.0-100-generic"] {
            w(&format!("boot/vmlinuz-{v}"));
        }
        w("boot/initrd.img-5.15.0-91-generic");
        std::os::unix::fs::symlink("usr/lib", dir.path().join("lib")).unwrap();
        std::os::unix::fs::symlink("vmlinuz-5.15.0-91-generic", dir.path().join("boot/vmlinuz")).unwrap();
        let host = RootDir::open(dir.path()).unwrap();
        let image = RootFs::open(&images().raw).unwrap();

        let want = [
            ("5.15.0-100-generic", true, false, true),
            ("5.15.0-91-generic", true, true, true),
            ("5.15.0-88-generic", true, false, false),
        ];
        for got in [kernels(&host).unwrap(), kernels(&image).unwrap()] {
            let got: Vec<(&str, bool, bool, bool)> = got
                .iter()
                .map(|k| (k.version.as_str(), k.vmlinuz, k.initrd, k.modules))
                .collect();
            assert_eq!(got, want);
        }
        let bootable = ["5.15.0-100-generic", "5.15.0-91-generic"];
        assert_eq!(bootable_kernels(&host).unwrap(), bootable);
        assert_eq!(bootable_kernels(&image).unwrap(), bootable);

        let empty = tempfile::tempdir().unwrap();
        assert!(
            bootable_kernels(&RootDir::open(empty.path()).unwrap())
                .unwrap()
                .is_empty()
        );
    }
}
