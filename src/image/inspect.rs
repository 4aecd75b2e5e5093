//! `kiln inspect`: what is inside a disk image, read without mounting anything and
//! without root.
//!
//! The image is opened by [`crate::image::open`] (raw, or qcow2 converted to a sparse raw
//! first; the GPT; each partition's filesystem label and UUID; the ext4 root read in
//! place). From the root come `/etc/os-release` ([`crate::image::os_release`]), the
//! installed kernels ([`crate::image::kernels`]) and the dpkg database
//! ([`crate::image::dpkg`]).

use crate::image::dpkg::{self, DpkgPackage};
use crate::image::kernels::{self, KernelFacts};
use crate::image::open::{FilesystemFacts, PartitionFacts, RootFs};
use crate::image::os_release;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

// `boottest` names these through `inspect`.
pub use crate::image::dpkg::upstream_version;
pub use crate::image::open::ImageFormat;

// ---------------------------------------------------------------------------------
// Facts
// ---------------------------------------------------------------------------------

/// Everything `inspect` reads from an image. `kiln inspect --json` prints this.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageFacts {
    /// The image as given on the command line.
    pub image: String,
    /// How the image file is stored.
    pub format: ImageFormat,
    /// Size of the disk in bytes (for qcow2, the virtual size).
    pub virtual_size: u64,
    /// Logical sector size the GPT was found with (512 or 4096).
    pub sector_size: u64,
    /// GUID of the disk (lower case, as blkid prints PTUUID).
    pub disk_guid: String,
    /// Used GPT entries, in table order.
    pub partitions: Vec<PartitionFacts>,
    /// Recognised filesystems, in partition table order.
    pub filesystems: Vec<FilesystemFacts>,
    /// Number of the partition holding the root filesystem read below.
    pub root_partition: u32,
    /// `/etc/os-release` of the root (or `/usr/lib/os-release`); empty if neither exists.
    pub os_release: BTreeMap<String, String>,
    /// Kernels found in `/boot` and `/lib/modules`, newest first.
    pub kernels: Vec<KernelFacts>,
    /// The dpkg (native) architecture, e.g. `amd64`.
    pub arch: Option<String>,
    /// Installed packages that matter for a GPU Kubernetes node (see
    /// [`is_key_package`]), by name (`name:arch` for a foreign architecture).
    pub packages: BTreeMap<String, PackageFacts>,
}

/// An installed package's version and hold state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackageFacts {
    pub version: String,
    /// Marked `hold` in dpkg's selections (`apt-mark hold`).
    pub held: bool,
}

// ---------------------------------------------------------------------------------
// The command
// ---------------------------------------------------------------------------------

/// `kiln inspect IMAGE [--json]`.
pub fn cmd_inspect(image: &Path, json: bool) -> Result<()> {
    let facts = inspect_image(image)?;
    let text = if json {
        let mut s = serde_json::to_string_pretty(&facts).context("serialising image facts")?;
        s.push('\n');
        s
    } else {
        render_facts(&facts)
    };
    crate::host::progress::print_stdout(&text)
}

/// Read the facts of a raw or qcow2 image without mounting it.
pub fn inspect_image(path: &Path) -> Result<ImageFacts> {
    let root = RootFs::open(path)?;
    let os_release = os_release::read(&root)?;
    let kernels = kernels::kernels(&root)?;
    let status = dpkg::read_status(&root)?;
    let arch_file = root.read_optional("/var/lib/dpkg/arch")?;
    let arch = dpkg::native_arch(&status, arch_file.as_deref().map(String::from_utf8_lossy).as_deref());
    let packages = key_packages(&status, arch.as_deref());

    let disk = root.disk();
    let layout = disk.layout();
    Ok(ImageFacts {
        image: path.display().to_string(),
        format: disk.format(),
        virtual_size: disk.size(),
        sector_size: layout.sector_size,
        disk_guid: crate::disk::gpt::guid_to_string(&layout.disk_guid).to_ascii_lowercase(),
        partitions: layout.partitions.iter().map(PartitionFacts::of).collect(),
        filesystems: disk.filesystems().to_vec(),
        root_partition: root.partition(),
        os_release,
        kernels,
        arch,
        packages,
    })
}

/// Installed key packages by name; foreign-architecture ones as `name:arch`.
fn key_packages(status: &[DpkgPackage], native: Option<&str>) -> BTreeMap<String, PackageFacts> {
    status
        .iter()
        .filter(|p| p.is_installed() && is_key_package(&p.name))
        .map(|p| {
            let foreign = !p.arch.is_empty() && p.arch != "all" && native.is_some_and(|n| n != p.arch);
            let key = if foreign {
                format!("{}:{}", p.name, p.arch)
            } else {
                p.name.clone()
            };
            (
                key,
                PackageFacts {
                    version: p.version.clone(),
                    held: p.is_held(),
                },
            )
        })
        .collect()
}

/// Whether `inspect` reports a package: kernels, NVIDIA driver bits, the container
/// runtime, Kubernetes and dkms.
pub fn is_key_package(name: &str) -> bool {
    const PREFIXES: [&str; 5] = [
        "linux-image-",
        "linux-headers-",
        "linux-modules-",
        "nvidia-",
        "libnvidia-",
    ];
    const NAMES: [&str; 7] = [
        "containerd",
        "containerd.io",
        "runc",
        "kubelet",
        "kubeadm",
        "kubectl",
        "dkms",
    ];
    PREFIXES.iter().any(|p| name.starts_with(p)) || NAMES.contains(&name)
}

// ---------------------------------------------------------------------------------
// Human output
// ---------------------------------------------------------------------------------

/// The human form of `kiln inspect`: sections with aligned tables.
pub fn render_facts(f: &ImageFacts) -> String {
    let mut out = String::new();
    let mut section = |title: String, body: String| {
        if !out.is_empty() {
            out.push('\n');
        }
        out.push_str(&title);
        out.push('\n');
        out.push_str(&body);
    };
    section(
        format!("Image: {}", f.image),
        table(
            &["", ""],
            &[
                vec!["format".into(), f.format.as_str().into()],
                vec![
                    "size".into(),
                    format!(
                        "{} ({} bytes)",
                        crate::host::progress::human_size(f.virtual_size),
                        f.virtual_size
                    ),
                ],
                vec!["disk GUID".into(), f.disk_guid.clone()],
                vec![
                    "architecture".into(),
                    f.arch.clone().unwrap_or_else(|| "(unknown)".into()),
                ],
            ],
            &[],
            false,
        ),
    );

    let rows: Vec<Vec<String>> = f
        .partitions
        .iter()
        .map(|p| {
            vec![
                p.number.to_string(),
                p.type_name.clone(),
                p.start_lba.to_string(),
                p.end_lba.to_string(),
                crate::host::progress::human_size(p.size),
                p.name.clone(),
            ]
        })
        .collect();
    section(
        format!("Partitions (GPT, {}-byte sectors)", f.sector_size),
        table(
            &["#", "TYPE", "START", "END", "SIZE", "NAME"],
            &rows,
            &[0, 2, 3, 4],
            true,
        ),
    );

    let rows: Vec<Vec<String>> = f
        .filesystems
        .iter()
        .map(|fs| {
            let root = if fs.partition == f.root_partition { "root" } else { "" };
            vec![
                fs.partition.to_string(),
                fs.version
                    .clone()
                    .map_or_else(|| fs.fs_type.clone(), |v| format!("{} ({v})", fs.fs_type)),
                fs.label.clone().unwrap_or_default(),
                fs.uuid.clone(),
                root.into(),
            ]
        })
        .collect();
    section(
        "Filesystems".into(),
        table(&["#", "TYPE", "LABEL", "UUID", ""], &rows, &[0], true),
    );

    let rows: Vec<Vec<String>> = f.os_release.iter().map(|(k, v)| vec![k.clone(), v.clone()]).collect();
    section(
        format!("OS release (partition {})", f.root_partition),
        if rows.is_empty() {
            "  (no /etc/os-release)\n".into()
        } else {
            table(&["", ""], &rows, &[], false)
        },
    );

    let rows: Vec<Vec<String>> = f
        .kernels
        .iter()
        .map(|k| {
            let yes = |b: bool| if b { "yes" } else { "-" }.to_string();
            vec![k.version.clone(), yes(k.vmlinuz), yes(k.initrd), yes(k.modules)]
        })
        .collect();
    section(
        "Kernels (newest first)".into(),
        if rows.is_empty() {
            "  (none)\n".into()
        } else {
            table(&["VERSION", "VMLINUZ", "INITRD", "MODULES"], &rows, &[], true)
        },
    );

    let rows: Vec<Vec<String>> = f
        .packages
        .iter()
        .map(|(n, p)| vec![n.clone(), p.version.clone(), if p.held { "hold" } else { "" }.into()])
        .collect();
    section(
        "Packages".into(),
        if rows.is_empty() {
            "  (none)\n".into()
        } else {
            table(&["NAME", "VERSION", ""], &rows, &[], true)
        },
    );
    out
}

/// Columns padded to their widest cell, indented by two; `right` lists the columns
/// aligned right. Trailing blanks are trimmed.
fn table(headers: &[&str], rows: &[Vec<String>], right: &[usize], with_header: bool) -> String {
    let mut widths: Vec<usize> = headers
        .iter()
        .map(|h| if with_header { h.chars().count() } else { 0 })
        .collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::from(" ");
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            s.push(' ');
            if right.contains(&i) {
                s.push_str(&format!("{cell:>w$}"));
            } else {
                s.push_str(&format!("{cell:<w$}"));
            }
            s.push(' ');
        }
        s.truncate(s.trim_end().len());
        s.push('\n');
        s
    };
    let mut out = String::new();
    if with_header {
        out.push_str(&line(headers.to_vec()));
    }
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

// ---------------------------------------------------------------------------------
// Test images
// ---------------------------------------------------------------------------------

/// Small disk images made with the real tools (sgdisk, mkfs.ext4, mkfs.fat,
/// qemu-img), built once per test process and shared by the tests here and in
/// `payload`. No root needed.
#[cfg(test)]
pub(crate) mod test_images {
    use crate::host::cmd::Cmd;
    use std::path::{Path, PathBuf};
    use std::sync::OnceLock;

    pub const ROOT_UUID: &str = "0f3e6a52-1c2b-4d5e-8f90-a1b2c3d4e5f6";
    pub const ESP_ID: &str = "ABCD1234";

    pub const OS_RELEASE: &str = r#"PRETTY_NAME="Ubuntu 22.04.4 LTS"
NAME="Ubuntu"
VERSION_ID="22.04"
VERSION="22.04.4 LTS (Jammy Jellyfish)"
VERSION_CODENAME=jammy
ID=ubuntu
ID_LIKE=debian
HOME_URL="https://www.ubuntu.com/"
SUPPORT_URL="https://help.ubuntu.com/"
BUG_REPORT_URL="https://bugs.launchpad.net/ubuntu/"
PRIVACY_POLICY_URL="https://www.ubuntu.com/legal/terms-and-policies/privacy-policy"
UBUNTU_CODENAME=jammy
"#;

    pub const DPKG_STATUS: &str = "\
Package: base-files
Essential: yes
Status: install ok installed
Priority: required
Architecture: amd64
Version: 12ubuntu4.6
Description: Debian base system miscellaneous files
 This package contains the basic filesystem hierarchy of a Debian system, and
 several important miscellaneous files.

Package: kubelet
Status: hold ok installed
Architecture: amd64
Version: 1.30.0-1.1
Depends: iptables (>= 1.4.21), kubernetes-cni (>= 1.2.0)

Package: kubeadm
Status: hold ok installed
Architecture: amd64
Version: 1.30.0-1.1

Package: kubectl
Status: install ok installed
Architecture: amd64
Version: 1.30.0-1.1

Package: containerd.io
Status: install ok installed
Architecture: amd64
Version: 1.7.22-1

Package: nvidia-driver-565-server
Status: install ok installed
Architecture: amd64
Source: nvidia-graphics-drivers-565-server (565.57.01-0ubuntu0.22.04.4)
Version: 565.57.01-0ubuntu0.22.04.4

Package: libnvidia-compute-565-server
Status: install ok installed
Architecture: i386
Version: 565.57.01-0ubuntu0.22.04.4

Package: linux-image-5.15.0-91-generic
Status: install ok installed
Architecture: amd64
Version: 5.15.0-91.101

Package: linux-image-5.15.0-88-generic
Status: deinstall ok config-files
Architecture: amd64
Version: 5.15.0-88.98

Package: dkms
Status: install ok half-configured
Architecture: all
Version: 2.8.7-2ubuntu2.2

Package: bash
Status: install ok installed
Architecture: amd64
Version: 5.1-6ubuntu1.1
";

    /// The test images, in a directory removed when the test process exits.
    pub struct Images {
        pub dir: PathBuf,
        /// GPT 14 BIOS boot, 15 ESP (FAT32 `UEFI`), 1 ext4 `cloudimg-rootfs`.
        pub raw: PathBuf,
        /// `raw` converted to qcow2.
        pub qcow2: PathBuf,
        /// The same GPT with no filesystem on partition 1.
        pub no_ext4: PathBuf,
        /// A text file.
        pub not_image: PathBuf,
    }

    static IMAGES: OnceLock<Images> = OnceLock::new();

    extern "C" fn remove_images() {
        if let Some(i) = IMAGES.get() {
            let _ = std::fs::remove_dir_all(&i.dir);
        }
    }

    /// Build the images on first use.
    pub fn images() -> &'static Images {
        IMAGES.get_or_init(|| {
            let dir = tempfile::Builder::new()
                .prefix("kiln-inspect-test-")
                .tempdir()
                .unwrap()
                .keep();
            // SAFETY: registers a plain function with no preconditions; it only
            // removes the directory made here when the test binary exits.
            unsafe { libc::atexit(remove_images) };
            build(&dir)
        })
    }

    /// Path of a tool, also looking in the sbin directories a non-root PATH lacks.
    pub fn tool(name: &str, package: &str) -> PathBuf {
        let path = std::env::var_os("PATH").unwrap_or_default();
        std::env::split_paths(&path)
            .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
            .map(|d| d.join(name))
            .find(|p| p.is_file())
            .unwrap_or_else(|| panic!("the tests need `{name}`: apt-get install -y {package}"))
    }

    const SECTOR: u64 = 512;
    const ESP_START: u64 = 10240;
    const ROOT_START: u64 = 92160;
    const DISK_SECTORS: u64 = 72 * 2048; // 72 MiB

    fn build(dir: &Path) -> Images {
        let root = dir.join("root");
        populate(&root);

        let raw = dir.join("disk.raw");
        image_from_tree(&root, &raw);

        let qcow2 = dir.join("disk.qcow2");
        to_qcow2(&raw, &qcow2);

        let no_ext4 = dir.join("no-ext4.raw");
        partition(&no_ext4);
        mkfs_esp(&no_ext4);

        let not_image = dir.join("notes.txt");
        std::fs::write(&not_image, "this is not a disk image\n".repeat(100)).unwrap();

        Images {
            dir: dir.to_path_buf(),
            raw,
            qcow2,
            no_ext4,
            not_image,
        }
    }

    /// A raw disk with the cloud image's layout whose ext4 root holds the tree `root`.
    pub fn image_from_tree(root: &Path, raw: &Path) {
        partition(raw);
        mkfs_esp(raw);
        let last = DISK_SECTORS - 34; // the backup GPT takes the last 33 sectors
        let blocks_4k = (last + 1 - ROOT_START) * SECTOR / 4096;
        Cmd::new(tool("mkfs.ext4", "e2fsprogs"))
            .args(["-q", "-F", "-b", "4096", "-L", "cloudimg-rootfs", "-U", ROOT_UUID])
            .arg("-E")
            .arg(format!("offset={},nodiscard", ROOT_START * SECTOR))
            .arg("-d")
            .arg(root)
            .arg(raw)
            .arg(format!("{}k", blocks_4k * 4))
            .run()
            .unwrap();
    }

    /// Convert a raw image to qcow2 with `qemu-img`.
    pub fn to_qcow2(raw: &Path, qcow2: &Path) {
        Cmd::new(tool("qemu-img", "qemu-utils"))
            .args(["convert", "-f", "raw", "-O", "qcow2"])
            .arg(raw)
            .arg(qcow2)
            .run()
            .unwrap();
    }

    /// A sparse file with the cloud image's GPT layout, small.
    fn partition(file: &Path) {
        std::fs::File::create(file)
            .unwrap()
            .set_len(DISK_SECTORS * SECTOR)
            .unwrap();
        Cmd::new(tool("sgdisk", "gdisk"))
            .args(["-n", "14:2048:+4M", "-t", "14:ef02", "-c", "14:bios"])
            .args(["-n", &format!("15:{ESP_START}:+40M"), "-t", "15:ef00", "-c", "15:esp"])
            .args(["-n", &format!("1:{ROOT_START}:0"), "-t", "1:8300", "-c", "1:rootfs"])
            .arg(file)
            .run()
            .unwrap();
    }

    fn mkfs_esp(file: &Path) {
        Cmd::new(tool("mkfs.fat", "dosfstools"))
            .args([
                "-F",
                "32",
                "-n",
                "UEFI",
                "-i",
                ESP_ID,
                "--offset",
                &ESP_START.to_string(),
            ])
            .arg(file)
            .arg((40 * 1024).to_string())
            .run()
            .unwrap();
    }

    /// A jammy-like root tree: merged /usr, kernels, dpkg database.
    fn populate(root: &Path) {
        use std::os::unix::fs::{PermissionsExt, symlink};
        let w = |p: &str, text: &str| {
            let p = root.join(p);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        };
        w("usr/lib/os-release", OS_RELEASE);
        w("usr/lib/modules/5.15.0-91-generic/modules.dep", "");
        w("usr/lib/modules/5.15.0-100-generic/modules.dep", "");
        w("usr/bin/true", "");
        for v in ["5.15.0-91-generic", "5.15.0-88-generic", "5.15.0-100-generic"] {
            w(&format!("boot/vmlinuz-{v}"), "kernel");
        }
        w("boot/initrd.img-5.15.0-91-generic", "initrd");
        w("var/lib/dpkg/status", DPKG_STATUS);
        w("var/lib/dpkg/arch", "amd64\ni386\n");
        w("etc/kiln-secret", "0123456789");
        std::fs::set_permissions(root.join("etc/kiln-secret"), std::fs::Permissions::from_mode(0o640)).unwrap();
        symlink("../usr/lib/os-release", root.join("etc/os-release")).unwrap();
        symlink("usr/lib", root.join("lib")).unwrap();
        symlink("usr/bin", root.join("bin")).unwrap();
        symlink("vmlinuz-5.15.0-91-generic", root.join("boot/vmlinuz")).unwrap();
    }
}

#[cfg(test)]
mod tests {
    use super::test_images::{self, images};
    use super::*;
    use crate::error::exit_code;

    #[test]
    fn raw_image_facts() {
        let f = inspect_image(&images().raw).unwrap();
        assert_eq!(f.format, ImageFormat::Raw);
        assert_eq!(f.sector_size, 512);
        assert_eq!(f.virtual_size, 72 << 20);

        let parts: Vec<(u32, &str, u64, &str)> = f
            .partitions
            .iter()
            .map(|p| (p.number, p.type_name.as_str(), p.start_lba, p.name.as_str()))
            .collect();
        assert_eq!(
            parts,
            [
                (1, "Linux filesystem", 92160, "rootfs"),
                (14, "BIOS boot", 2048, "bios"),
                (15, "EFI System", 10240, "esp")
            ]
        );
        assert_eq!(f.partitions[1].size, 4 << 20);
        assert_eq!(f.partitions[2].offset, 10240 * 512);

        let fs: Vec<(u32, &str, Option<&str>, &str)> = f
            .filesystems
            .iter()
            .map(|x| (x.partition, x.fs_type.as_str(), x.label.as_deref(), x.uuid.as_str()))
            .collect();
        assert_eq!(
            fs,
            [
                (1, "ext4", Some("cloudimg-rootfs"), test_images::ROOT_UUID),
                (15, "vfat", Some("UEFI"), "ABCD-1234")
            ]
        );
        assert_eq!(f.filesystems[1].version.as_deref(), Some("FAT32"));
        assert_eq!(f.root_partition, 1);

        // /etc/os-release is a symlink to ../usr/lib/os-release in the image.
        assert_eq!(
            f.os_release,
            crate::image::os_release::parse_os_release(test_images::OS_RELEASE)
        );

        let kernels: Vec<(&str, bool, bool, bool)> = f
            .kernels
            .iter()
            .map(|k| (k.version.as_str(), k.vmlinuz, k.initrd, k.modules))
            .collect();
        assert_eq!(
            kernels,
            [
                ("5.15.0-100-generic", true, false, true),
                ("5.15.0-91-generic", true, true, true),
                ("5.15.0-88-generic", true, false, false),
            ]
        );

        assert_eq!(f.arch.as_deref(), Some("amd64"));
        let pkgs: Vec<(&str, &str, bool)> = f
            .packages
            .iter()
            .map(|(n, p)| (n.as_str(), p.version.as_str(), p.held))
            .collect();
        assert_eq!(
            pkgs,
            [
                ("containerd.io", "1.7.22-1", false),
                ("kubeadm", "1.30.0-1.1", true),
                ("kubectl", "1.30.0-1.1", false),
                ("kubelet", "1.30.0-1.1", true),
                ("libnvidia-compute-565-server:i386", "565.57.01-0ubuntu0.22.04.4", false),
                ("linux-image-5.15.0-91-generic", "5.15.0-91.101", false),
                ("nvidia-driver-565-server", "565.57.01-0ubuntu0.22.04.4", false),
            ],
            "bash is not a key package; config-files and half-configured are not installed"
        );
    }

    #[test]
    fn qcow2_gives_the_same_facts() {
        let raw = inspect_image(&images().raw).unwrap();
        let q = inspect_image(&images().qcow2).unwrap();
        assert_eq!(q.format, ImageFormat::Qcow2);
        assert_eq!(q.image, images().qcow2.display().to_string());
        assert_eq!(
            ImageFacts {
                image: raw.image.clone(),
                format: ImageFormat::Raw,
                ..q
            },
            raw
        );
    }

    #[test]
    fn json_and_human_output() {
        let f = inspect_image(&images().raw).unwrap();
        let json = serde_json::to_value(&f).unwrap();
        assert_eq!(
            json["packages"]["kubelet"],
            serde_json::json!({"version": "1.30.0-1.1", "held": true})
        );
        assert_eq!(json["format"], "raw");
        let back: ImageFacts = serde_json::from_value(json).unwrap();
        assert_eq!(back, f);

        let text = render_facts(&f);
        for want in [
            "EFI System",
            "cloudimg-rootfs",
            "ABCD-1234",
            "VERSION_CODENAME",
            "5.15.0-100-generic",
            "hold",
        ] {
            assert!(text.contains(want), "{want} missing from:\n{text}");
        }
        // Columns line up: in the partition table every SIZE ends in the same column.
        let table: Vec<&str> = text
            .lines()
            .skip_while(|l| !l.starts_with("Partitions"))
            .skip(2)
            .take_while(|l| !l.is_empty())
            .collect();
        assert_eq!(table.len(), 3, "{text}");
        let ends: Vec<usize> = table.iter().map(|l| l.find("MiB").unwrap()).collect();
        assert!(ends.iter().all(|e| *e == ends[0]), "{text}");
    }

    #[test]
    fn input_errors_are_user_errors() {
        let i = images();
        let e = inspect_image(&i.not_image).unwrap_err();
        assert_eq!(exit_code(&e), 2, "{e:#}");
        let msg = format!("{e:#}");
        assert!(
            msg.contains("notes.txt") && msg.contains("no GPT") && msg.contains("expected"),
            "{msg}"
        );

        let e = inspect_image(&i.no_ext4).unwrap_err();
        assert_eq!(exit_code(&e), 2, "{e:#}");
        let msg = format!("{e:#}");
        assert!(msg.contains("no-ext4.raw") && msg.contains("no ext4 root"), "{msg}");

        let e = inspect_image(&i.dir.join("missing.raw")).unwrap_err();
        assert_eq!(exit_code(&e), 2, "{e:#}");

        let empty = i.dir.join("empty.raw");
        std::fs::write(&empty, b"").unwrap();
        assert_eq!(exit_code(&inspect_image(&empty).unwrap_err()), 2);

        let fake_qcow = i.dir.join("fake.qcow2");
        std::fs::write(&fake_qcow, b"QFI\xfb\0\0\0\x09garbage").unwrap();
        assert_eq!(exit_code(&inspect_image(&fake_qcow).unwrap_err()), 2);
    }
}
