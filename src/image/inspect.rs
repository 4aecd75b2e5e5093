//! `kiln inspect`: what is inside a disk image, read without mounting anything and
//! without root.
//!
//! The image (raw, or qcow2 converted to a sparse raw first) is read directly:
//! the GPT with `gptman`, each partition's filesystem label and UUID from its
//! superblock or boot sector, and files of the ext4 root with `ext4-view` over the
//! image file at the partition's byte offset ([`RootFs`]). From the root come
//! `/etc/os-release`, the installed kernels and the dpkg database.
//!
//! The pure helpers here ([`parse_os_release`], [`parse_dpkg_status`],
//! [`dpkg_version_cmp`], [`upstream_version`]) and [`RootFs`] are shared with the
//! later stages (`payload`, `verify`).

use crate::error::user;
use crate::host::cmd::Cmd;
use anyhow::{Context, Result, anyhow};
use ext4_view::{Ext4, Ext4Error, Ext4Read, FileType};
use serde::{Deserialize, Serialize};
use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use tempfile::TempDir;

/// The first bytes of a qcow2 image.
const QCOW2_MAGIC: &[u8; 4] = b"QFI\xfb";

/// The label Ubuntu's cloud images give their root filesystem.
pub const ROOTFS_LABEL: &str = "cloudimg-rootfs";

/// What every `user` error about the input says was expected.
const EXPECTED_IMAGE: &str =
    "expected a raw or qcow2 GPT disk image like Ubuntu's cloud image, with an ext4 root filesystem";

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

/// How an image file is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    Raw,
    Qcow2,
}

impl ImageFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
        }
    }
}

/// One used GPT entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionFacts {
    /// Partition number (1-based index in the GPT entry array).
    pub number: u32,
    /// `BIOS boot`, `EFI System`, `Linux filesystem`, ... or the type GUID if unknown.
    pub type_name: String,
    /// Partition type GUID, lower case.
    pub type_guid: String,
    /// Unique partition GUID (PARTUUID), lower case.
    pub guid: String,
    /// First sector.
    pub start_lba: u64,
    /// Last sector (inclusive).
    pub end_lba: u64,
    /// Byte offset of the partition in the disk.
    pub offset: u64,
    /// Size in bytes.
    pub size: u64,
    /// The GPT partition name (may be empty).
    pub name: String,
}

/// A filesystem found at the start of a partition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FilesystemFacts {
    /// Partition number the filesystem is on.
    pub partition: u32,
    /// `ext4`, `ext3`, `ext2` or `vfat` (blkid's TYPE).
    pub fs_type: String,
    /// `FAT32`/`FAT16`/`FAT12` for vfat; none for ext.
    pub version: Option<String>,
    /// The volume label, if there is one.
    pub label: Option<String>,
    /// The UUID as blkid prints it: `8-4-4-4-12` lower-case hex for ext, `ABCD-1234`
    /// (the volume id) for FAT.
    pub uuid: String,
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
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        // `kiln inspect IMAGE | head` is fine.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other.context("writing to stdout"),
    }
}

/// Read the facts of a raw or qcow2 image without mounting it.
pub fn inspect_image(path: &Path) -> Result<ImageFacts> {
    let disk = Disk::open(path)?;
    let layout = disk.read_layout()?;
    let root = RootFs::from_layout(disk, &layout)?;

    let os_release = read_os_release(&root)?;
    let kernels = read_kernels(&root)?;
    let status = match root.read_optional("/var/lib/dpkg/status")? {
        Some(bytes) => parse_dpkg_status(&String::from_utf8_lossy(&bytes)),
        None => Vec::new(),
    };
    let arch_file = root.read_optional("/var/lib/dpkg/arch")?;
    let arch = dpkg_arch(&status, arch_file.as_deref().map(String::from_utf8_lossy).as_deref());
    let packages = key_packages(&status, arch.as_deref());

    Ok(ImageFacts {
        image: path.display().to_string(),
        format: root.disk.format,
        virtual_size: root.disk.len,
        sector_size: layout.sector_size,
        disk_guid: layout.disk_guid,
        partitions: layout.partitions,
        filesystems: layout.filesystems,
        root_partition: root.partition,
        os_release,
        kernels,
        arch,
        packages,
    })
}

fn read_os_release(root: &RootFs) -> Result<BTreeMap<String, String>> {
    // os-release(5): /etc/os-release wins, /usr/lib/os-release is the fallback. On
    // Ubuntu the former is a symlink to ../usr/lib/os-release, which RootFs follows.
    for p in ["/etc/os-release", "/usr/lib/os-release"] {
        if let Some(bytes) = root.read_optional(p)? {
            return Ok(parse_os_release(&String::from_utf8_lossy(&bytes)));
        }
    }
    Ok(BTreeMap::new())
}

/// Kernel versions from `/boot/vmlinuz-*`, `/boot/initrd.img-*` (only alongside one
/// of the others) and `/lib/modules/*`, newest first in dpkg order.
fn read_kernels(root: &RootFs) -> Result<Vec<KernelFacts>> {
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
    // /lib is a symlink to usr/lib on merged-/usr jammy; RootFs resolves it.
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

/// The native dpkg architecture: that of `base-files` (or of `dpkg`) in the status
/// file, else the first line of `/var/lib/dpkg/arch`.
fn dpkg_arch(status: &[DpkgPackage], arch_file: Option<&str>) -> Option<String> {
    let from_status = ["base-files", "dpkg"].iter().find_map(|want| {
        status
            .iter()
            .find(|p| p.name == *want && p.is_installed() && !p.arch.is_empty() && p.arch != "all")
            .map(|p| p.arch.clone())
    });
    from_status.or_else(|| {
        arch_file?
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .map(str::to_string)
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
// Opening the disk
// ---------------------------------------------------------------------------------

/// A disk image opened as raw bytes: the file itself, or the sparse raw conversion of
/// a qcow2 (kept alive by `_tmp`).
struct Disk {
    /// The path the user gave, for messages.
    source: PathBuf,
    format: ImageFormat,
    file: File,
    len: u64,
    _tmp: Option<TempDir>,
}

/// The partition table and the filesystems found on it.
struct Layout {
    sector_size: u64,
    disk_guid: String,
    partitions: Vec<PartitionFacts>,
    filesystems: Vec<FilesystemFacts>,
}

impl Disk {
    fn open(path: &Path) -> Result<Disk> {
        let shown = path.display();
        let mut file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(user(format!("{shown}: no such file; {EXPECTED_IMAGE}")));
            }
            Err(e) => return Err(e).with_context(|| format!("opening {shown}")),
        };
        let meta = file
            .metadata()
            .with_context(|| format!("reading metadata of {shown}"))?;
        if meta.is_dir() {
            return Err(user(format!("{shown} is a directory; {EXPECTED_IMAGE}")));
        }
        let mut magic = [0u8; 8];
        let got = read_up_to(&mut file, &mut magic).with_context(|| format!("reading {shown}"))?;
        if got >= 4 && &magic[..4] == QCOW2_MAGIC {
            return Disk::open_qcow2(path, &magic[..got]);
        }
        Ok(Disk {
            source: path.to_path_buf(),
            format: ImageFormat::Raw,
            file,
            len: meta.len(),
            _tmp: None,
        })
    }

    /// Convert a qcow2 to a sparse raw in a temporary directory and open that.
    ///
    /// The kernel kiln runs on has no nbd module, so `qemu-nbd` cannot expose the
    /// qcow2 as a block device; `qemu-img convert` writes a raw file instead, skipping
    /// zero runs, so the copy only takes the space of the data.
    fn open_qcow2(path: &Path, header: &[u8]) -> Result<Disk> {
        let shown = path.display();
        let version = header.get(4..8).map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
        if !matches!(version, Some(2 | 3)) {
            return Err(user(format!(
                "{shown} starts like a qcow2 image but its header is not qcow2 version 2 or 3; {EXPECTED_IMAGE}"
            )));
        }
        let tmp = tempfile::Builder::new()
            .prefix("kiln-inspect-")
            .tempdir()
            .context("creating a temporary directory for the raw copy of a qcow2 image")?;
        let raw = tmp.path().join("disk.raw");
        Cmd::new("qemu-img")
            .args(["convert", "-f", "qcow2", "-O", "raw"])
            .arg(path)
            .arg(&raw)
            .run()
            .with_context(|| format!("converting {shown} from qcow2 to raw"))?;
        let file = File::open(&raw).with_context(|| format!("opening {}", raw.display()))?;
        let len = file
            .metadata()
            .with_context(|| format!("reading metadata of {}", raw.display()))?
            .len();
        Ok(Disk {
            source: path.to_path_buf(),
            format: ImageFormat::Qcow2,
            file,
            len,
            _tmp: Some(tmp),
        })
    }

    /// Read the GPT and probe each partition for a filesystem.
    fn read_layout(&self) -> Result<Layout> {
        let shown = self.source.display();
        let mut f = &self.file;
        let gpt = gptman::GPT::find_from(&mut f)
            .map_err(|e| user(format!("{shown}: no GPT partition table found ({e}); {EXPECTED_IMAGE}")))?;
        let ss = gpt.sector_size;
        let mut partitions = Vec::new();
        let mut filesystems = Vec::new();
        for (number, p) in gpt.iter().filter(|(_, p)| p.is_used()) {
            let sectors = p.size().map_err(|e| {
                user(format!(
                    "{shown}: GPT partition {number} is invalid ({e}); {EXPECTED_IMAGE}"
                ))
            })?;
            let type_guid = guid_string(&p.partition_type_guid);
            let facts = PartitionFacts {
                number,
                type_name: partition_type_name(&type_guid).map_or_else(|| type_guid.clone(), str::to_string),
                type_guid,
                guid: guid_string(&p.unique_partition_guid),
                start_lba: p.starting_lba,
                end_lba: p.ending_lba,
                offset: p.starting_lba.saturating_mul(ss),
                size: sectors.saturating_mul(ss),
                name: p.partition_name.as_str().to_string(),
            };
            if let Some(fs) = self.probe(&facts)? {
                filesystems.push(fs);
            }
            partitions.push(facts);
        }
        Ok(Layout {
            sector_size: ss,
            disk_guid: guid_string(&gpt.header.disk_guid),
            partitions,
            filesystems,
        })
    }

    /// Look for an ext or FAT filesystem at the start of a partition.
    fn probe(&self, part: &PartitionFacts) -> Result<Option<FilesystemFacts>> {
        // Enough for the FAT boot sector and the ext superblock at 1024.
        let mut head = vec![0u8; 2048.min(part.size) as usize];
        if part.offset.saturating_add(head.len() as u64) > self.len {
            return Ok(None); // the partition lies past the end of a truncated image
        }
        self.file
            .read_exact_at(&mut head, part.offset)
            .with_context(|| format!("reading partition {} of {}", part.number, self.source.display()))?;
        Ok(probe_ext(&head)
            .or_else(|| probe_fat(&head))
            .map(|(fs_type, version, label, uuid)| FilesystemFacts {
                partition: part.number,
                fs_type,
                version,
                label,
                uuid,
            }))
    }
}

/// Read as many bytes as are there, up to `buf.len()`.
fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// A GUID as text from its on-disk (mixed-endian) bytes, lower case.
fn guid_string(b: &[u8; 16]) -> String {
    format!(
        "{:02x}{:02x}{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}",
        b[3], b[2], b[1], b[0], b[5], b[4], b[7], b[6], b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]
    )
}

/// The usual name of a GPT partition type GUID.
fn partition_type_name(guid: &str) -> Option<&'static str> {
    const TYPES: [(&str, &str); 9] = [
        ("21686148-6449-6e6f-744e-656564454649", "BIOS boot"),
        ("c12a7328-f81f-11d2-ba4b-00a0c93ec93b", "EFI System"),
        ("0fc63daf-8483-4772-8e79-3d69d8477de4", "Linux filesystem"),
        ("4f68bce3-e8cd-4db1-96e7-fbcaf984b709", "Linux root (x86-64)"),
        ("b921b045-1df0-41c3-af44-4c6f280d3fae", "Linux root (ARM-64)"),
        ("bc13c2ff-59e6-4262-a352-b275fd6f7172", "Linux extended boot"),
        ("0657fd6d-a4ab-43c4-84e5-0933c84b4f4f", "Linux swap"),
        ("e6d6d379-f507-44c2-a23c-238f2a3df928", "Linux LVM"),
        ("ebd0a0a2-b9e5-4433-87c0-68b6b72699c7", "Microsoft basic data"),
    ];
    TYPES
        .iter()
        .find(|(g, _)| g.eq_ignore_ascii_case(guid))
        .map(|(_, n)| *n)
}

type Probed = (String, Option<String>, Option<String>, String);

/// An ext2/3/4 superblock at byte 1024 of `head`: (type, None, label, uuid).
fn probe_ext(head: &[u8]) -> Option<Probed> {
    let sb = head.get(1024..1024 + 0x88)?;
    let le32 = |o: usize| u32::from_le_bytes([sb[o], sb[o + 1], sb[o + 2], sb[o + 3]]);
    if u16::from_le_bytes([sb[0x38], sb[0x39]]) != 0xEF53 {
        return None;
    }
    let (compat, incompat, ro_compat) = (le32(0x5C), le32(0x60), le32(0x64));
    // Like blkid: anything beyond what ext3 supports makes it ext4.
    const EXT3_INCOMPAT: u32 = 0x0002 | 0x0004 | 0x0008 | 0x0010; // filetype, recover, journal_dev, meta_bg
    const EXT3_RO_COMPAT: u32 = 0x0001 | 0x0002 | 0x0004; // sparse_super, large_file, btree_dir
    const HAS_JOURNAL: u32 = 0x0004;
    let fs_type = if incompat & !EXT3_INCOMPAT != 0 || ro_compat & !EXT3_RO_COMPAT != 0 {
        "ext4"
    } else if compat & HAS_JOURNAL != 0 {
        "ext3"
    } else {
        "ext2"
    };
    let u = &sb[0x68..0x78];
    let uuid = format!(
        "{}-{}-{}-{}-{}",
        hex::encode(&u[0..4]),
        hex::encode(&u[4..6]),
        hex::encode(&u[6..8]),
        hex::encode(&u[8..10]),
        hex::encode(&u[10..16])
    );
    let label = c_string(&sb[0x78..0x88]);
    Some((fs_type.to_string(), None, label, uuid))
}

/// A FAT boot sector at the start of `head`: ("vfat", FATnn, label, volume id).
fn probe_fat(head: &[u8]) -> Option<Probed> {
    let bs = head.get(..512)?;
    if bs[510..512] != [0x55, 0xAA] || !matches!(bs[0], 0xEB | 0xE9) {
        return None;
    }
    let bytes_per_sector = u16::from_le_bytes([bs[11], bs[12]]);
    if !matches!(bytes_per_sector, 512 | 1024 | 2048 | 4096) || bs[13] == 0 {
        return None;
    }
    // FAT32 has no 16-bit FAT size and keeps its extended BPB further on.
    let fat32 = u16::from_le_bytes([bs[22], bs[23]]) == 0;
    let ext = if fat32 { 64 } else { 36 };
    let fs_name = &bs[ext + 18..ext + 26];
    if !matches!(bs[ext + 2], 0x28 | 0x29) || !fs_name.starts_with(b"FAT") {
        return None;
    }
    let id = u32::from_le_bytes([bs[ext + 3], bs[ext + 4], bs[ext + 5], bs[ext + 6]]);
    let uuid = format!("{:04X}-{:04X}", id >> 16, id & 0xFFFF);
    let label = String::from_utf8_lossy(&bs[ext + 7..ext + 18]).trim_end().to_string();
    let label = (!label.is_empty() && label != "NO NAME").then_some(label);
    let version = if fat32 {
        "FAT32".to_string()
    } else {
        String::from_utf8_lossy(fs_name).trim_end().to_string()
    };
    Some(("vfat".to_string(), Some(version), label, uuid))
}

/// A NUL-padded string; none if empty.
fn c_string(b: &[u8]) -> Option<String> {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    let s = String::from_utf8_lossy(&b[..end]).into_owned();
    (!s.is_empty()).then_some(s)
}

// ---------------------------------------------------------------------------------
// The ext4 root, read in place
// ---------------------------------------------------------------------------------

/// `ext4-view`'s reader over one partition of an image file.
struct PartitionReader {
    file: File,
    offset: u64,
    len: u64,
}

impl Ext4Read for PartitionReader {
    fn read(&mut self, start: u64, dst: &mut [u8]) -> Result<(), Box<dyn std::error::Error + Send + Sync + 'static>> {
        let end = start.checked_add(dst.len() as u64);
        if end.is_none_or(|e| e > self.len) {
            return Err(format!(
                "read of {} bytes at {start} goes past the end of the partition ({} bytes)",
                dst.len(),
                self.len
            )
            .into());
        }
        self.file.read_exact_at(dst, self.offset + start)?;
        Ok(())
    }
}

/// The ext4 root filesystem of an image, opened read-only without mounting.
///
/// Paths are absolute paths inside the image (`/etc/os-release`); symlinks are
/// resolved inside the image, so `/lib/modules` works on merged-/usr systems. A
/// qcow2 image is read through a temporary raw copy that lives as long as this value.
/// Not `Send` (ext4-view shares its cache through `Rc`).
pub struct RootFs {
    fs: Ext4,
    partition: u32,
    disk: Disk,
}

/// The kind of a file in a [`RootFs`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FileKind {
    Regular,
    Directory,
    Symlink,
    CharDevice,
    BlockDevice,
    Fifo,
    Socket,
}

/// Metadata of a file in a [`RootFs`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileMeta {
    pub kind: FileKind,
    /// Permission bits including setuid/setgid/sticky (`mode & 0o7777`).
    pub mode: u16,
    pub uid: u32,
    pub gid: u32,
    /// Size in bytes.
    pub size: u64,
}

impl RootFs {
    /// Open the root filesystem of a raw or qcow2 image: the ext4 partition labelled
    /// `cloudimg-rootfs`, else partition 1 if it is ext, else the first ext partition.
    pub fn open(image: &Path) -> Result<RootFs> {
        let disk = Disk::open(image)?;
        let layout = disk.read_layout()?;
        RootFs::from_layout(disk, &layout)
    }

    fn from_layout(disk: Disk, layout: &Layout) -> Result<RootFs> {
        let shown = disk.source.display().to_string();
        let ext = |f: &&FilesystemFacts| f.fs_type.starts_with("ext");
        let root = layout
            .filesystems
            .iter()
            .filter(ext)
            .find(|f| f.label.as_deref() == Some(ROOTFS_LABEL))
            .or_else(|| layout.filesystems.iter().filter(ext).find(|f| f.partition == 1))
            .or_else(|| layout.filesystems.iter().find(ext))
            .ok_or_else(|| {
                user(format!(
                    "{shown}: no ext4 root filesystem on any GPT partition; {EXPECTED_IMAGE}"
                ))
            })?;
        let part = layout
            .partitions
            .iter()
            .find(|p| p.number == root.partition)
            .expect("every filesystem is on a listed partition");
        let file = disk.file.try_clone().with_context(|| format!("reopening {shown}"))?;
        let len = part.size.min(disk.len.saturating_sub(part.offset));
        let reader = PartitionReader {
            file,
            offset: part.offset,
            len,
        };
        let fs = Ext4::load(Box::new(reader)).map_err(|e| {
            user(format!(
                "{shown}: the ext4 filesystem on partition {} cannot be read ({e}); {EXPECTED_IMAGE}",
                part.number
            ))
        })?;
        Ok(RootFs {
            fs,
            partition: part.number,
            disk,
        })
    }

    #[cfg(test)]
    /// The image this root was opened from, as given.
    pub fn image(&self) -> &Path {
        &self.disk.source
    }

    #[cfg(test)]
    /// Number of the partition holding this filesystem.
    pub fn partition(&self) -> u32 {
        self.partition
    }

    #[cfg(test)]
    /// Filesystem label.
    pub fn label(&self) -> String {
        self.fs.label().display().to_string()
    }

    #[cfg(test)]
    /// Filesystem UUID, lower-case `8-4-4-4-12`.
    pub fn uuid(&self) -> String {
        self.fs.uuid().to_string()
    }

    fn err(&self, what: &str, path: &str, e: Ext4Error) -> anyhow::Error {
        anyhow!(
            "{what} {path} in {} (partition {}): {e}",
            self.disk.source.display(),
            self.partition
        )
    }

    /// Whole contents of a file (following symlinks).
    pub fn read(&self, path: &str) -> Result<Vec<u8>> {
        self.fs.read(path).map_err(|e| self.err("reading", path, e))
    }

    #[cfg(test)]
    /// Whole contents of a file as UTF-8.
    pub fn read_to_string(&self, path: &str) -> Result<String> {
        self.fs.read_to_string(path).map_err(|e| self.err("reading", path, e))
    }

    /// Contents of a file, or none if it does not exist.
    pub fn read_optional(&self, path: &str) -> Result<Option<Vec<u8>>> {
        match self.fs.read(path) {
            Ok(b) => Ok(Some(b)),
            Err(Ext4Error::NotFound | Ext4Error::NotADirectory) => Ok(None),
            Err(e) => Err(self.err("reading", path, e)),
        }
    }

    /// Whether `path` exists (following symlinks; a dangling symlink does not).
    pub fn exists(&self, path: &str) -> Result<bool> {
        match self.fs.exists(path) {
            Ok(b) => Ok(b),
            Err(Ext4Error::NotFound | Ext4Error::NotADirectory) => Ok(false),
            Err(e) => Err(self.err("looking up", path, e)),
        }
    }

    /// Whether `path` is a directory (following symlinks); false if it does not exist.
    pub fn is_dir(&self, path: &str) -> Result<bool> {
        match self.fs.metadata(path) {
            Ok(m) => Ok(m.is_dir()),
            Err(Ext4Error::NotFound | Ext4Error::NotADirectory) => Ok(false),
            Err(e) => Err(self.err("looking up", path, e)),
        }
    }

    /// Names in a directory, sorted, without `.` and `..`.
    pub fn read_dir(&self, path: &str) -> Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in self.fs.read_dir(path).map_err(|e| self.err("listing", path, e))? {
            let entry = entry.map_err(|e| self.err("listing", path, e))?;
            let name = entry.file_name().display().to_string();
            if name != "." && name != ".." {
                names.push(name);
            }
        }
        names.sort();
        Ok(names)
    }

    /// Metadata of `path`, following symlinks.
    pub fn metadata(&self, path: &str) -> Result<FileMeta> {
        self.fs
            .metadata(path)
            .map(file_meta)
            .map_err(|e| self.err("looking up", path, e))
    }

    /// Metadata of `path` itself, not following a final symlink.
    pub fn symlink_metadata(&self, path: &str) -> Result<FileMeta> {
        self.fs
            .symlink_metadata(path)
            .map(file_meta)
            .map_err(|e| self.err("looking up", path, e))
    }

    /// Target of the symlink at `path`, as stored.
    pub fn read_link(&self, path: &str) -> Result<String> {
        let target = self
            .fs
            .read_link(path)
            .map_err(|e| self.err("reading the link", path, e))?;
        Ok(target.display().to_string())
    }
}

fn file_meta(m: ext4_view::Metadata) -> FileMeta {
    let kind = match m.file_type() {
        FileType::Regular => FileKind::Regular,
        FileType::Directory => FileKind::Directory,
        FileType::Symlink => FileKind::Symlink,
        FileType::CharacterDevice => FileKind::CharDevice,
        FileType::BlockDevice => FileKind::BlockDevice,
        FileType::Fifo => FileKind::Fifo,
        FileType::Socket => FileKind::Socket,
    };
    FileMeta {
        kind,
        mode: m.mode(),
        uid: m.uid(),
        gid: m.gid(),
        size: m.len(),
    }
}

// ---------------------------------------------------------------------------------
// Pure helpers
// ---------------------------------------------------------------------------------

/// Parse os-release(5) text: `KEY=value` lines, values optionally in double or
/// single quotes, backslash escapes in double quotes and bare values; comments and
/// blank lines skipped.
pub fn parse_os_release(text: &str) -> BTreeMap<String, String> {
    let mut map = BTreeMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((key, raw)) = line.split_once('=') else {
            continue;
        };
        let key = key.trim();
        if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            continue;
        }
        map.insert(key.to_string(), unquote_shell_value(raw.trim()));
    }
    map
}

/// The value of a shell-style assignment: concatenated bare, "double" and 'single'
/// quoted parts.
fn unquote_shell_value(raw: &str) -> String {
    let mut out = String::new();
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                while let Some(c) = chars.next() {
                    match c {
                        '"' => break,
                        '\\' => match chars.next() {
                            Some(e @ ('"' | '\\' | '$' | '`')) => out.push(e),
                            Some(e) => {
                                out.push('\\');
                                out.push(e);
                            }
                            None => out.push('\\'),
                        },
                        c => out.push(c),
                    }
                }
            }
            '\'' => {
                for c in chars.by_ref() {
                    if c == '\'' {
                        break;
                    }
                    out.push(c);
                }
            }
            '\\' => {
                if let Some(e) = chars.next() {
                    out.push(e);
                }
            }
            c => out.push(c),
        }
    }
    out
}

/// One stanza of `/var/lib/dpkg/status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DpkgPackage {
    /// `Package`.
    pub name: String,
    /// `Version` (empty for packages that were never unpacked).
    pub version: String,
    /// `Architecture` (`amd64`, `all`, ...).
    pub arch: String,
    /// `Status`: `want flag state`, e.g. `install ok installed`, `hold ok installed`.
    pub status: String,
    /// `Source`, if it differs from the name.
    pub source: Option<String>,
    /// Every field of the stanza; continuation lines joined with `\n`.
    pub fields: BTreeMap<String, String>,
}

impl DpkgPackage {
    /// The selection: `install`, `hold`, `deinstall`, `purge` or `unknown`.
    pub fn want(&self) -> &str {
        self.status.split_whitespace().next().unwrap_or("")
    }

    /// The state: `installed`, `config-files`, `half-configured`, ...
    pub fn state(&self) -> &str {
        self.status.split_whitespace().nth(2).unwrap_or("")
    }

    /// Fully installed (`... ok installed`).
    pub fn is_installed(&self) -> bool {
        self.state() == "installed" && self.status.split_whitespace().nth(1) == Some("ok")
    }

    /// On hold (`apt-mark hold`).
    pub fn is_held(&self) -> bool {
        self.want() == "hold"
    }
}

/// Parse dpkg's status file (deb822 stanzas separated by blank lines). Stanzas
/// without a `Package` field are skipped.
pub fn parse_dpkg_status(text: &str) -> Vec<DpkgPackage> {
    let mut packages = Vec::new();
    let mut fields: BTreeMap<String, String> = BTreeMap::new();
    let mut last_key: Option<String> = None;
    let mut finish = |fields: &mut BTreeMap<String, String>| {
        let mut f = std::mem::take(fields);
        let Some(name) = f.remove("Package") else { return };
        let get = |k: &str| f.get(k).cloned().unwrap_or_default();
        packages.push(DpkgPackage {
            version: get("Version"),
            arch: get("Architecture"),
            status: get("Status"),
            source: f
                .get("Source")
                .map(|s| s.split_whitespace().next().unwrap_or("").to_string()),
            name: name.clone(),
            fields: {
                f.insert("Package".into(), name);
                f
            },
        });
    };
    for line in text.lines() {
        if line.trim().is_empty() {
            finish(&mut fields);
            last_key = None;
        } else if line.starts_with([' ', '\t']) {
            if let Some(v) = last_key.as_ref().and_then(|k| fields.get_mut(k)) {
                v.push('\n');
                v.push_str(line.trim());
            }
        } else if let Some((k, v)) = line.split_once(':') {
            let k = k.trim().to_string();
            fields.insert(k.clone(), v.trim().to_string());
            last_key = Some(k);
        }
    }
    finish(&mut fields);
    packages
}

/// Compare two Debian version strings like `dpkg --compare-versions`: epoch
/// numerically, then upstream version, then revision, each with dpkg's rules (digit
/// runs numerically, letters before other characters, `~` before everything,
/// even the end of the string).
pub fn dpkg_version_cmp(a: &str, b: &str) -> Ordering {
    let (ea, ua, ra) = split_version(a);
    let (eb, ub, rb) = split_version(b);
    ea.cmp(&eb)
        .then_with(|| verrevcmp(ua, ub))
        .then_with(|| verrevcmp(ra, rb))
}

/// (epoch, upstream, revision) of a Debian version.
fn split_version(v: &str) -> (u64, &str, &str) {
    let v = v.trim();
    let (epoch, rest) = match v.split_once(':') {
        Some((e, r)) if !e.is_empty() && e.bytes().all(|c| c.is_ascii_digit()) => (e.parse().unwrap_or(u64::MAX), r),
        _ => (0, v),
    };
    match rest.rfind('-') {
        Some(i) => (epoch, &rest[..i], &rest[i + 1..]),
        None => (epoch, rest, ""),
    }
}

/// dpkg's `verrevcmp`.
fn verrevcmp(a: &str, b: &str) -> Ordering {
    fn order(c: Option<u8>) -> i32 {
        match c {
            None => 0,
            Some(c) if c.is_ascii_digit() => 0,
            Some(c) if c.is_ascii_alphabetic() => c as i32,
            Some(b'~') => -1,
            Some(c) => c as i32 + 256,
        }
    }
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let (mut i, mut j) = (0, 0);
    let digit = |s: &[u8], k: usize| s.get(k).is_some_and(u8::is_ascii_digit);
    while i < a.len() || j < b.len() {
        // The non-digit prefix, character by character.
        while (i < a.len() && !digit(a, i)) || (j < b.len() && !digit(b, j)) {
            let (ac, bc) = (order(a.get(i).copied()), order(b.get(j).copied()));
            if ac != bc {
                return ac.cmp(&bc);
            }
            i += 1;
            j += 1;
        }
        // The digit run, numerically.
        while a.get(i) == Some(&b'0') {
            i += 1;
        }
        while b.get(j) == Some(&b'0') {
            j += 1;
        }
        let mut first_diff = Ordering::Equal;
        while digit(a, i) && digit(b, j) {
            if first_diff == Ordering::Equal {
                first_diff = a[i].cmp(&b[j]);
            }
            i += 1;
            j += 1;
        }
        if digit(a, i) {
            return Ordering::Greater;
        }
        if digit(b, j) {
            return Ordering::Less;
        }
        if first_diff != Ordering::Equal {
            return first_diff;
        }
    }
    Ordering::Equal
}

/// The upstream part of a Debian version, without epoch and revision:
/// `1:565.57.01-0ubuntu0.22.04.4` → `565.57.01`, `1.30.0-1.1` → `1.30.0`.
pub fn upstream_version(v: &str) -> &str {
    split_version(v).1
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
                    format!("{} ({} bytes)", human_size(f.virtual_size), f.virtual_size),
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
                human_size(p.size),
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

/// `123.4 MiB`-style size.
fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
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
        partition(&raw);
        mkfs_esp(&raw);
        let last = DISK_SECTORS - 34; // the backup GPT takes the last 33 sectors
        let blocks_4k = (last + 1 - ROOT_START) * SECTOR / 4096;
        Cmd::new(tool("mkfs.ext4", "e2fsprogs"))
            .args(["-q", "-F", "-b", "4096", "-L", "cloudimg-rootfs", "-U", ROOT_UUID])
            .arg("-E")
            .arg(format!("offset={},nodiscard", ROOT_START * SECTOR))
            .arg("-d")
            .arg(&root)
            .arg(&raw)
            .arg(format!("{}k", blocks_4k * 4))
            .run()
            .unwrap();

        let qcow2 = dir.join("disk.qcow2");
        Cmd::new(tool("qemu-img", "qemu-utils"))
            .args(["convert", "-f", "raw", "-O", "qcow2"])
            .arg(&raw)
            .arg(&qcow2)
            .run()
            .unwrap();

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

    fn cmp(a: &str, b: &str) -> Ordering {
        dpkg_version_cmp(a, b)
    }

    #[test]
    fn dpkg_version_ordering() {
        use Ordering::*;
        assert_eq!(cmp("1.0~rc1", "1.0"), Less);
        assert_eq!(cmp("1.0~rc1", "1.0~rc2"), Less);
        assert_eq!(cmp("1.0~~", "1.0~"), Less);
        assert_eq!(cmp("1.0", "1.0+b1"), Less);
        assert_eq!(cmp("1.0a", "1.0+"), Less, "letters sort before other characters");
        assert_eq!(cmp("5.15.0-91", "5.15.0-9"), Greater);
        assert_eq!(cmp("5.15.0-100-generic", "5.15.0-91-generic"), Greater);
        assert_eq!(cmp("1:1.0", "2.0"), Greater, "epoch wins");
        assert_eq!(
            cmp("1:565.57.01-0ubuntu0.22.04.4", "565.57.01-0ubuntu0.22.04.4"),
            Greater
        );
        assert_eq!(cmp("0:1.0", "1.0"), Equal, "a missing epoch is 0");
        assert_eq!(cmp("1.0-0", "1.0"), Equal, "a missing revision is 0");
        assert_eq!(cmp("1.01", "1.1"), Equal, "digit runs compare numerically");
        assert_eq!(cmp("1.30.0-1.1", "1.30.0-1.2"), Less);
        assert_eq!(cmp("1.30.0-1.1", "1.29.9-9"), Greater);
        assert_eq!(cmp("2.8.7-2ubuntu2.2", "2.8.7-2ubuntu2"), Greater);
        assert_eq!(cmp("1.0-1~bpo1", "1.0-1"), Less);
    }

    #[test]
    fn upstream_versions() {
        assert_eq!(upstream_version("1:565.57.01-0ubuntu0.22.04.4"), "565.57.01");
        assert_eq!(upstream_version("1.30.0-1.1"), "1.30.0");
        assert_eq!(upstream_version("565.57.01"), "565.57.01");
        assert_eq!(
            upstream_version("2:1.2-3-4"),
            "1.2-3",
            "the revision is after the last hyphen"
        );
    }

    #[test]
    fn os_release_quoting() {
        let m = parse_os_release(
            "# comment\nA=plain\nB=\"double \\\"q\\\" \\$x\"\nC='single $x'\n\nD=\"\"\nE=es\\ caped\nbad line\n",
        );
        assert_eq!(m["A"], "plain");
        assert_eq!(m["B"], "double \"q\" $x");
        assert_eq!(m["C"], "single $x");
        assert_eq!(m["D"], "");
        assert_eq!(m["E"], "es caped");
        assert_eq!(m.len(), 5);
        let jammy = parse_os_release(test_images::OS_RELEASE);
        assert_eq!(jammy["PRETTY_NAME"], "Ubuntu 22.04.4 LTS");
        assert_eq!(jammy["VERSION_CODENAME"], "jammy");
    }

    #[test]
    fn dpkg_status_parsing() {
        let pkgs = parse_dpkg_status(test_images::DPKG_STATUS);
        assert_eq!(pkgs.len(), 11);
        let base = &pkgs[0];
        assert_eq!(
            (base.name.as_str(), base.version.as_str(), base.arch.as_str()),
            ("base-files", "12ubuntu4.6", "amd64")
        );
        assert!(base.is_installed() && !base.is_held());
        assert!(
            base.fields["Description"].ends_with("\nseveral important miscellaneous files."),
            "{:?}",
            base.fields
        );
        let kubelet = pkgs.iter().find(|p| p.name == "kubelet").unwrap();
        assert!(kubelet.is_installed() && kubelet.is_held());
        assert_eq!(
            kubelet.fields["Depends"],
            "iptables (>= 1.4.21), kubernetes-cni (>= 1.2.0)"
        );
        let nv = pkgs.iter().find(|p| p.name == "nvidia-driver-565-server").unwrap();
        assert_eq!(nv.source.as_deref(), Some("nvidia-graphics-drivers-565-server"));
        let rc = pkgs.iter().find(|p| p.name == "linux-image-5.15.0-88-generic").unwrap();
        assert!(!rc.is_installed());
        assert_eq!(rc.want(), "deinstall");
        assert!(
            parse_dpkg_status("\n\nVersion: 1\n\n").is_empty(),
            "stanzas need a Package"
        );
    }

    #[test]
    fn fat_and_ext_probes_reject_noise() {
        assert!(probe_fat(&[0u8; 2048]).is_none());
        assert!(probe_ext(&[0u8; 2048]).is_none());
        assert!(probe_ext(&[0u8; 100]).is_none());
    }

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
        assert_eq!(f.os_release, parse_os_release(test_images::OS_RELEASE));

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

    #[test]
    fn rootfs_reads_files_in_place() {
        let r = RootFs::open(&images().qcow2).unwrap();
        assert_eq!(r.partition(), 1);
        assert_eq!(r.image(), images().qcow2);
        assert_eq!(r.label(), "cloudimg-rootfs");
        assert_eq!(r.uuid(), test_images::ROOT_UUID);
        assert_eq!(r.read_to_string("/etc/os-release").unwrap(), test_images::OS_RELEASE);
        assert_eq!(r.read("/etc/kiln-secret").unwrap(), b"0123456789");
        assert!(r.exists("/lib/modules/5.15.0-91-generic/modules.dep").unwrap());
        assert!(!r.exists("/lib/modules/6.8.0-1-generic").unwrap());
        assert!(!r.exists("/etc/kiln-secret/x").unwrap());
        assert_eq!(
            r.read_dir("/lib/modules").unwrap(),
            ["5.15.0-100-generic", "5.15.0-91-generic"]
        );
        assert!(r.read_dir("/").unwrap().contains(&"var".to_string()));

        let m = r.metadata("/etc/kiln-secret").unwrap();
        assert_eq!((m.kind, m.mode, m.size), (FileKind::Regular, 0o640, 10));
        assert_eq!(m.uid, unsafe { libc::geteuid() }, "mkfs.ext4 -d keeps the owner");
        assert_eq!(r.metadata("/lib").unwrap().kind, FileKind::Directory);
        assert_eq!(r.symlink_metadata("/lib").unwrap().kind, FileKind::Symlink);
        assert_eq!(r.read_link("/lib").unwrap(), "usr/lib");

        let e = r.read("/etc/nothing").unwrap_err().to_string();
        assert!(e.contains("/etc/nothing") && e.contains("disk.qcow2"), "{e}");
    }
}
