//! GPT partition tables on disk image files, in userspace.
//!
//! kiln never asks the kernel to parse a partition table (the build host may have no GPT
//! support): everything here reads and writes the raw image file with `gptman`, and the
//! resulting [`Layout`] gives byte offsets and sizes from which loop devices are attached
//! elsewhere (`offset` + `sizelimit`).
//!
//! Three operations:
//! - [`read_layout`] (or [`read_layout_from`] on an open file): what partitions a disk
//!   image has;
//! - [`create_cloud_layout`]: a fresh, empty disk partitioned like an Ubuntu cloud image
//!   (for builds from a root tarball);
//! - [`grow`]: enlarge a cloud image to the image definition's `disk_size`, moving the
//!   backup GPT to the new end and growing the root partition, like `growpart` would.
//!
//! GUIDs are kept as the 16 bytes stored on disk (the first three fields little-endian,
//! as GPT stores them); [`guid_to_string`] and [`parse_guid`] convert from and to the
//! usual text form; [`type_name`] names the common partition types.

use anyhow::{Context, Result};
use gptman::{GPT, GPTPartitionEntry};
use serde::{Serialize, Serializer};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

use crate::error::user;
use crate::host::progress::exact_size;
use crate::user_bail;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// Sector size of the disks kiln creates (Ubuntu cloud images use 512 too).
pub const SECTOR_SIZE: u64 = 512;

/// Smallest disk [`create_cloud_layout`] accepts.
pub const MIN_DISK_SIZE: u64 = GIB;

/// Partition type GUIDs, in on-disk byte order.
pub mod types {
    use super::guid;

    /// BIOS boot partition (GRUB's core.img on BIOS machines), sgdisk code EF02.
    pub const BIOS_BOOT: [u8; 16] = guid("21686148-6449-6E6F-744E-656564454649");
    /// EFI System Partition, sgdisk code EF00.
    pub const ESP: [u8; 16] = guid("C12A7328-F81F-11D2-BA4B-00A0C93EC93B");
    /// Linux filesystem data, sgdisk code 8300 (what Ubuntu cloud images use for `/`).
    pub const LINUX_FS: [u8; 16] = guid("0FC63DAF-8483-4772-8E79-3D69D8477DE4");
    /// Linux root (x86-64) from the Discoverable Partitions Specification, sgdisk code 8304.
    pub const LINUX_ROOT_X86_64: [u8; 16] = guid("4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709");
}

/// The usual name of a partition type (as fdisk and sgdisk print it), if it is a common one.
pub fn type_name(type_guid: &[u8; 16]) -> Option<&'static str> {
    const NAMES: [([u8; 16], &str); 9] = [
        (types::BIOS_BOOT, "BIOS boot"),
        (types::ESP, "EFI System"),
        (types::LINUX_FS, "Linux filesystem"),
        (types::LINUX_ROOT_X86_64, "Linux root (x86-64)"),
        (guid("B921B045-1DF0-41C3-AF44-4C6F280D3FAE"), "Linux root (ARM-64)"),
        (guid("BC13C2FF-59E6-4262-A352-B275FD6F7172"), "Linux extended boot"),
        (guid("0657FD6D-A4AB-43C4-84E5-0933C84B4F4F"), "Linux swap"),
        (guid("E6D6D379-F507-44C2-A23C-238F2A3DF928"), "Linux LVM"),
        (guid("EBD0A0A2-B9E5-4433-87C0-68B6B72699C7"), "Microsoft basic data"),
    ];
    NAMES.iter().find(|(g, _)| g == type_guid).map(|(_, n)| *n)
}

/// The label Ubuntu's cloud images give their root filesystem.
pub const ROOT_LABEL: &str = "cloudimg-rootfs";

/// Ubuntu cloud-image partition numbers and sizes.
const BIOS_BOOT_NUMBER: u32 = 14;
const BIOS_BOOT_SIZE: u64 = 4 * MIB;
const ESP_NUMBER: u32 = 15;
const ESP_SIZE: u64 = 106 * MIB;
const ROOT_NUMBER: u32 = 1;
/// The cloud image's first partition starts at LBA 2048 (1 MiB).
const FIRST_PARTITION_OFFSET: u64 = MIB;

/// A disk's partition table, as kiln needs it.
#[derive(Debug, Clone, Serialize)]
pub struct Layout {
    /// Size of the image file in bytes.
    pub disk_size: u64,
    /// Logical sector size the GPT was found with (512 or 4096).
    pub sector_size: u64,
    #[serde(serialize_with = "serialize_guid")]
    pub disk_guid: [u8; 16],
    /// First and last LBA partitions may use, from the GPT header.
    pub first_usable_lba: u64,
    pub last_usable_lba: u64,
    /// Used partitions, by partition number.
    pub partitions: Vec<Part>,
}

/// One used GPT partition entry.
#[derive(Debug, Clone, Serialize)]
pub struct Part {
    /// Partition number (1-based index in the partition entry array).
    pub number: u32,
    #[serde(serialize_with = "serialize_guid")]
    pub type_guid: [u8; 16],
    #[serde(serialize_with = "serialize_guid")]
    pub unique_guid: [u8; 16],
    pub name: String,
    pub first_lba: u64,
    /// Inclusive.
    pub last_lba: u64,
    /// The disk's sector size, so that byte offsets need nothing else.
    pub sector_size: u64,
}

/// What a partition is for, from its type GUID.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum PartKind {
    BiosBoot,
    Esp,
    /// Linux filesystem data, or the discoverable x86-64 root type.
    LinuxFs,
    Other,
}

impl Part {
    /// Byte offset of the partition's first sector on the disk.
    pub fn offset_bytes(&self) -> u64 {
        self.first_lba.saturating_mul(self.sector_size)
    }

    /// Size of the partition in bytes.
    pub fn size_bytes(&self) -> u64 {
        (self.last_lba + 1 - self.first_lba).saturating_mul(self.sector_size)
    }

    pub fn kind(&self) -> PartKind {
        match self.type_guid {
            types::BIOS_BOOT => PartKind::BiosBoot,
            types::ESP => PartKind::Esp,
            types::LINUX_FS | types::LINUX_ROOT_X86_64 => PartKind::LinuxFs,
            _ => PartKind::Other,
        }
    }
}

impl Layout {
    /// The root filesystem's partition: partition 1 if it is a Linux filesystem partition
    /// (as in Ubuntu cloud images), else the largest Linux filesystem partition.
    pub fn root(&self) -> Option<&Part> {
        let linux = || self.partitions.iter().filter(|p| p.kind() == PartKind::LinuxFs);
        linux()
            .find(|p| p.number == ROOT_NUMBER)
            .or_else(|| linux().max_by_key(|p| p.size_bytes()))
    }

    /// The EFI System Partition (the lowest-numbered one if there are several).
    pub fn esp(&self) -> Option<&Part> {
        self.partitions.iter().find(|p| p.kind() == PartKind::Esp)
    }

    /// The BIOS boot partition, if the disk has one.
    pub fn bios_boot(&self) -> Option<&Part> {
        self.partitions.iter().find(|p| p.kind() == PartKind::BiosBoot)
    }

    /// The partition with this number.
    pub fn part(&self, number: u32) -> Option<&Part> {
        self.partitions.iter().find(|p| p.number == number)
    }

    fn from_gpt(gpt: &GPT, disk_size: u64) -> Layout {
        let partitions = gpt
            .iter()
            .filter(|(_, e)| e.is_used())
            .map(|(number, e)| Part {
                number,
                type_guid: e.partition_type_guid,
                unique_guid: e.unique_partition_guid,
                name: e.partition_name.as_str().to_string(),
                first_lba: e.starting_lba,
                last_lba: e.ending_lba,
                sector_size: gpt.sector_size,
            })
            .collect();
        Layout {
            disk_size,
            sector_size: gpt.sector_size,
            disk_guid: gpt.header.disk_guid,
            first_usable_lba: gpt.header.first_usable_lba,
            last_usable_lba: gpt.header.last_usable_lba,
            partitions,
        }
    }
}

/// What a build takes, for the message about a disk without a GPT.
const BUILD_EXPECTS: &str = "kiln expects a GPT disk such as an Ubuntu cloud image (raw or qcow2) or a root tarball";

/// Read the partition table of a disk image file.
///
/// A file without a GPT (an MBR-only disk, a qcow2 file not yet converted, anything else)
/// or with a damaged one is a user error.
pub fn read_layout(path: &Path) -> Result<Layout> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    read_layout_from(&file, path, BUILD_EXPECTS)
}

/// [`read_layout`] of an open disk image file; `path` names it in messages, and a user
/// error about a missing table ends with `expected` (what the caller takes instead).
pub fn read_layout_from(file: &File, path: &Path, expected: &str) -> Result<Layout> {
    let mut reader = file;
    let gpt = read_gpt(&mut reader, path, expected)?;
    let size = file_len(file, path)?;
    Ok(Layout::from_gpt(&gpt, size))
}

/// Create (or truncate) `path` as a sparse disk image of `size` bytes, rounded up to a
/// whole MiB, partitioned like an Ubuntu cloud image:
///
/// | # | type | start | size |
/// |---|------|-------|------|
/// | 14 | BIOS boot | LBA 2048 | 4 MiB |
/// | 15 | EFI System | right after | 106 MiB |
/// | 1 | Linux filesystem | next MiB boundary | to the last usable LBA |
///
/// with a protective MBR (no boot code) and random disk and partition GUIDs. The
/// partitions are left unformatted.
pub fn create_cloud_layout(path: &Path, size: u64) -> Result<Layout> {
    create_cloud_layout_with(path, size, None)
}

/// [`create_cloud_layout`] with the disk and partition GUIDs derived from `seed` (the
/// same seed gives the same GUIDs: reproducible builds) instead of random ones.
pub fn create_cloud_layout_with(path: &Path, size: u64, seed: Option<&[u8]>) -> Result<Layout> {
    let guid = |what: &str| -> Result<[u8; 16]> {
        match seed {
            Some(s) => Ok(derived_guid(s, what)),
            None => random_guid(),
        }
    };
    if size < MIN_DISK_SIZE {
        user_bail!(
            "disk size {} is too small for {}: kiln needs at least {}; raise disk_size in the image definition",
            exact_size(size),
            path.display(),
            exact_size(MIN_DISK_SIZE)
        );
    }
    let size = size.div_ceil(MIB) * MIB;
    let ss = SECTOR_SIZE;
    let mut file = crate::disk::sparse::create_sized(path, size)?;

    let ctx = || format!("writing a GPT to {}", path.display());
    let mut gpt = GPT::new_from(&mut file, ss, guid("disk")?).with_context(ctx)?;
    let bios_first = FIRST_PARTITION_OFFSET / ss;
    let bios_last = bios_first + BIOS_BOOT_SIZE / ss - 1;
    let esp_first = bios_last + 1;
    let esp_last = esp_first + ESP_SIZE / ss - 1;
    let root_first = (esp_last + 1).next_multiple_of(MIB / ss);
    let root_last = gpt.header.last_usable_lba;
    for (number, type_guid, first, last) in [
        (BIOS_BOOT_NUMBER, types::BIOS_BOOT, bios_first, bios_last),
        (ESP_NUMBER, types::ESP, esp_first, esp_last),
        (ROOT_NUMBER, types::LINUX_FS, root_first, root_last),
    ] {
        gpt[number] = GPTPartitionEntry {
            partition_type_guid: type_guid,
            unique_partition_guid: guid(&format!("partition {number}"))?,
            starting_lba: first,
            ending_lba: last,
            attribute_bits: 0,
            partition_name: "".into(),
        };
    }
    gpt.write_into(&mut file).with_context(ctx)?;
    GPT::write_protective_mbr_into(&mut file, ss).with_context(ctx)?;
    sync(&file, path)?;
    sync_parent_dir(path)?;
    Ok(Layout::from_gpt(&gpt, size))
}

/// Grow the disk image at `path` to `target` bytes (rounded up to a whole MiB).
///
/// The file is extended sparsely, the backup GPT moves to the new end, the root partition
/// ([`Layout::root`]) grows to the new last usable LBA, and the protective MBR's size is
/// updated in place: the first 440 bytes (GRUB's boot code on cloud images) and the disk
/// signature are never written. The root filesystem itself is not resized here.
///
/// A disk already of `target` size is still fixed up (backup GPT at the end, root filling
/// the disk). Errors for the user: a disk larger than `target`, no root partition, or a
/// root partition that is not the last partition on the disk.
pub fn grow(path: &Path, target: u64) -> Result<Layout> {
    let target = target.div_ceil(MIB) * MIB;
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    let mut gpt = read_gpt(&mut file, path, BUILD_EXPECTS)?;
    let ss = gpt.sector_size;
    let size = file_len(&file, path)?;
    if size > target {
        user_bail!(
            "{} is {}, larger than the requested disk size {}: a disk cannot shrink; raise disk_size in the image definition to at least {}",
            path.display(),
            exact_size(size),
            exact_size(target),
            exact_size(size)
        );
    }
    let layout = Layout::from_gpt(&gpt, size);
    let root = layout.root().ok_or_else(|| {
        user(format!(
            "{} has no Linux filesystem partition to grow (partitions: {})",
            path.display(),
            describe_parts(&layout)
        ))
    })?;
    if let Some(after) = layout.partitions.iter().find(|p| p.first_lba > root.last_lba) {
        user_bail!(
            "{}: partition {} ({:?}) lies after the root partition {}, so the root cannot grow into the new space; \
             kiln can only grow a root partition that is the last one on the disk",
            path.display(),
            after.number,
            after.kind(),
            root.number
        );
    }
    let root_number = root.number;
    let root_old_last = root.last_lba;

    // A table read from the backup copy (damaged primary) is written back as a primary.
    if gpt.is_backup() {
        gpt.header.backup_lba = gpt.header.primary_lba;
        gpt.header.primary_lba = 1;
        gpt.header.partition_entry_lba = 2;
    }
    let old_backup_lba = gpt.header.backup_lba;

    if target > size {
        file.set_len(target)
            .with_context(|| format!("extending {} to {target} bytes", path.display()))?;
    }
    let ctx = || format!("writing the GPT of {}", path.display());
    gpt.header.update_from(&mut file, ss).with_context(ctx)?;
    gpt[root_number].ending_lba = gpt.header.last_usable_lba;

    // The old backup header and array now lie inside the grown root partition: wipe them
    // so that nothing ever mistakes them for a partition table.
    if old_backup_lba < gpt.header.backup_lba && old_backup_lba < size / ss {
        let array_sectors = gpt_array_sectors(&gpt);
        let first = old_backup_lba.saturating_sub(array_sectors).max(root_old_last + 1);
        wipe_old_backup(&mut file, ss, first, old_backup_lba)
            .with_context(|| format!("erasing the old backup GPT of {}", path.display()))?;
    }

    gpt.write_into(&mut file).with_context(ctx)?;
    update_protective_mbr(&mut file, ss)
        .with_context(|| format!("updating the protective MBR of {}", path.display()))?;
    sync(&file, path)?;
    let size = file_len(&file, path)?;
    Ok(Layout::from_gpt(&gpt, size))
}

/// Read a GPT, telling a missing or damaged table (user errors) from I/O failures. A used
/// entry that ends before it starts makes the table damaged.
fn read_gpt(file: &mut (impl Read + Seek), path: &Path, expected: &str) -> Result<GPT> {
    let gpt = match GPT::find_from(file) {
        Ok(gpt) => gpt,
        Err(e) if is_missing_gpt(&e) => {
            return Err(user(format!(
                "{} has no GPT partition table: {expected}",
                path.display()
            )));
        }
        Err(gptman::Error::Io(e)) => {
            return Err(anyhow::Error::new(e).context(format!("reading the partition table of {}", path.display())));
        }
        Err(e) => {
            return Err(user(format!(
                "{} has a damaged GPT partition table: {}",
                path.display(),
                gpt_error(&e)
            )));
        }
    };
    for (number, e) in gpt.iter().filter(|(_, e)| e.is_used()) {
        if let Err(err) = e.size() {
            user_bail!(
                "{} has a damaged GPT partition table: partition {number} is invalid ({})",
                path.display(),
                gpt_error(&err)
            );
        }
    }
    Ok(gpt)
}

/// No GPT signature at all (or a file too short to hold one), at either copy.
fn is_missing_gpt(e: &gptman::Error) -> bool {
    match e {
        gptman::Error::InvalidSignature => true,
        gptman::Error::Io(io) => io.kind() == std::io::ErrorKind::UnexpectedEof,
        gptman::Error::Deserialize(_) => true,
        gptman::Error::ReadError(a, b) => is_missing_gpt(a) && is_missing_gpt(b),
        _ => false,
    }
}

/// gptman's errors keep their cause out of `Display`; spell out the nested ones.
fn gpt_error(e: &gptman::Error) -> String {
    match e {
        gptman::Error::ReadError(a, b) => {
            format!("primary header: {}; backup header: {}", gpt_error(a), gpt_error(b))
        }
        gptman::Error::Io(io) => format!("I/O error: {io}"),
        e => e.to_string(),
    }
}

/// Sectors taken by the partition entry array.
fn gpt_array_sectors(gpt: &GPT) -> u64 {
    let bytes = u64::from(gpt.header.number_of_partition_entries) * u64::from(gpt.header.size_of_partition_entry);
    bytes.div_ceil(gpt.sector_size)
}

/// Zero sectors `first..=header_lba` if `header_lba` holds a GPT header signature.
fn wipe_old_backup(file: &mut File, ss: u64, first: u64, header_lba: u64) -> std::io::Result<()> {
    let mut sig = [0u8; 8];
    file.seek(SeekFrom::Start(header_lba * ss))?;
    file.read_exact(&mut sig)?;
    if &sig != b"EFI PART" || first > header_lba {
        return Ok(());
    }
    let zeros = vec![0u8; ss as usize];
    file.seek(SeekFrom::Start(first * ss))?;
    for _ in first..=header_lba {
        file.write_all(&zeros)?;
    }
    Ok(())
}

/// Set the size of the protective MBR's 0xEE entry to cover the whole disk, writing only
/// that entry's 4-byte size field. Boot code (bytes 0..440) and the disk signature are left
/// alone. A disk without a protective entry gets one (gptman writes from byte 446 on).
fn update_protective_mbr(file: &mut File, ss: u64) -> std::io::Result<()> {
    let sectors = file.seek(SeekFrom::End(0))? / ss;
    let mut mbr = [0u8; 512];
    file.seek(SeekFrom::Start(0))?;
    file.read_exact(&mut mbr)?;
    let entry = (0..4).map(|i| 446 + 16 * i).find(|&o| mbr[o + 4] == 0xEE);
    match entry {
        Some(o) if mbr[510..512] == [0x55, 0xAA] => {
            let start = u64::from(u32::from_le_bytes(mbr[o + 8..o + 12].try_into().unwrap()));
            let len = u32::try_from(sectors.saturating_sub(start)).unwrap_or(u32::MAX);
            file.seek(SeekFrom::Start((o + 12) as u64))?;
            file.write_all(&len.to_le_bytes())
        }
        _ => GPT::write_protective_mbr_into(file, ss).map_err(std::io::Error::other),
    }
}

fn file_len(file: &File, path: &Path) -> Result<u64> {
    Ok(file
        .metadata()
        .with_context(|| format!("reading the size of {}", path.display()))?
        .len())
}

fn sync(file: &File, path: &Path) -> Result<()> {
    file.sync_all().with_context(|| format!("syncing {}", path.display()))
}

/// Make a newly created file's directory entry durable.
fn sync_parent_dir(path: &Path) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing directory {}", dir.display()))
}

fn describe_parts(layout: &Layout) -> String {
    if layout.partitions.is_empty() {
        return "none".into();
    }
    layout
        .partitions
        .iter()
        .map(|p| format!("{} {}", p.number, guid_to_string(&p.type_guid)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A random (version 4) GUID in on-disk byte order.
pub fn random_guid() -> Result<[u8; 16]> {
    let mut b = [0u8; 16];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .context("reading /dev/urandom")?;
    // In on-disk order the version nibble is the high nibble of byte 7 (time_hi is
    // little-endian); the variant lives in byte 8, which is not swapped.
    b[7] = (b[7] & 0x0F) | 0x40;
    b[8] = (b[8] & 0x3F) | 0x80;
    Ok(b)
}

/// A version-4-shaped GUID derived from `seed` and `what` (sha256), in on-disk order.
pub fn derived_guid(seed: &[u8], what: &str) -> [u8; 16] {
    use sha2::Digest;
    let d = sha2::Sha256::new()
        .chain_update(seed)
        .chain_update(what.as_bytes())
        .finalize();
    let mut b = [0u8; 16];
    b.copy_from_slice(&d[..16]);
    b[7] = (b[7] & 0x0F) | 0x40;
    b[8] = (b[8] & 0x3F) | 0x80;
    b
}

/// Text form ("C12A7328-F81F-11D2-BA4B-00A0C93EC93B") of an on-disk GUID.
pub fn guid_to_string(g: &[u8; 16]) -> String {
    format!(
        "{:02X}{:02X}{:02X}{:02X}-{:02X}{:02X}-{:02X}{:02X}-{:02X}{:02X}-{:02X}{:02X}{:02X}{:02X}{:02X}{:02X}",
        g[3], g[2], g[1], g[0], g[5], g[4], g[7], g[6], g[8], g[9], g[10], g[11], g[12], g[13], g[14], g[15]
    )
}

/// Parse a GUID's text form (any case) into on-disk byte order.
pub fn parse_guid(s: &str) -> Option<[u8; 16]> {
    let bytes = s.as_bytes();
    if bytes.len() != 36 {
        return None;
    }
    let mut hex = [0u8; 32];
    let mut n = 0;
    for (i, &c) in bytes.iter().enumerate() {
        if matches!(i, 8 | 13 | 18 | 23) {
            if c != b'-' {
                return None;
            }
        } else {
            hex[n] = (c as char).to_digit(16)? as u8;
            n += 1;
        }
    }
    let mut be = [0u8; 16];
    for i in 0..16 {
        be[i] = hex[2 * i] << 4 | hex[2 * i + 1];
    }
    Some(to_disk_order(be))
}

/// Swap the first three fields of a big-endian (text order) GUID into GPT's on-disk order
/// (the operation is its own inverse).
const fn to_disk_order(b: [u8; 16]) -> [u8; 16] {
    [
        b[3], b[2], b[1], b[0], b[5], b[4], b[7], b[6], b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15],
    ]
}

/// Compile-time GUID literal, in on-disk byte order. Panics (at compile time) if malformed.
const fn guid(s: &str) -> [u8; 16] {
    const fn nibble(c: u8) -> u8 {
        match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' => c - b'a' + 10,
            b'A'..=b'F' => c - b'A' + 10,
            _ => panic!("bad hex digit in GUID"),
        }
    }
    let s = s.as_bytes();
    assert!(s.len() == 36, "GUID must be 36 characters");
    let mut be = [0u8; 16];
    let (mut i, mut n) = (0, 0);
    while i < 36 {
        if i == 8 || i == 13 || i == 18 || i == 23 {
            assert!(s[i] == b'-', "GUID dash misplaced");
            i += 1;
        } else {
            be[n] = nibble(s[i]) << 4 | nibble(s[i + 1]);
            n += 1;
            i += 2;
        }
    }
    to_disk_order(be)
}

fn serialize_guid<S: Serializer>(g: &[u8; 16], s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(&guid_to_string(g))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::exit_code;
    use std::process::Command;

    const LBA: u64 = 512;

    /// Run a test tool (sgdisk, ...) and return its exit status and stdout.
    fn run(program: &str, args: &[&str]) -> (i32, String) {
        let out = Command::new(program)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {program} ({e}): apt-get install -y gdisk dosfstools"));
        let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
        (out.status.code().unwrap_or(-1), text)
    }

    fn sgdisk(args: &[&str], img: &Path) -> String {
        let mut all = args.to_vec();
        let img = img.to_str().unwrap();
        all.push(img);
        let (code, out) = run("sgdisk", &all);
        assert_eq!(code, 0, "sgdisk {all:?} failed:\n{out}");
        out
    }

    /// `sgdisk -v` finds nothing wrong.
    fn assert_sgdisk_clean(img: &Path) {
        let out = sgdisk(&["-v"], img);
        assert!(
            out.contains("No problems found") && !out.contains("Problem"),
            "sgdisk -v:\n{out}"
        );
    }

    /// `sgdisk -p` rows: (number, start, end, code).
    fn sgdisk_parts(img: &Path) -> Vec<(u32, u64, u64, String)> {
        let out = sgdisk(&["-p"], img);
        let rows = out.lines().skip_while(|l| !l.starts_with("Number")).skip(1);
        let mut parts: Vec<_> = rows
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.len() >= 6).then(|| {
                    (
                        f[0].parse().unwrap(),
                        f[1].parse().unwrap(),
                        f[2].parse().unwrap(),
                        f[5].to_string(),
                    )
                })
            })
            .collect();
        parts.sort();
        parts
    }

    /// A GPT header's (my LBA, alternate LBA, first usable, last usable), read raw.
    fn raw_header(img: &Path, lba: u64) -> (u64, u64, u64, u64) {
        let mut f = File::open(img).unwrap();
        let mut h = [0u8; 92];
        f.seek(SeekFrom::Start(lba * LBA)).unwrap();
        f.read_exact(&mut h).unwrap();
        assert_eq!(&h[..8], b"EFI PART", "no GPT header at LBA {lba}");
        let u = |o: usize| u64::from_le_bytes(h[o..o + 8].try_into().unwrap());
        (u(24), u(32), u(40), u(48))
    }

    fn read_at(img: &Path, offset: u64, len: usize) -> Vec<u8> {
        let mut f = File::open(img).unwrap();
        let mut buf = vec![0u8; len];
        f.seek(SeekFrom::Start(offset)).unwrap();
        f.read_exact(&mut buf).unwrap();
        buf
    }

    fn write_at(img: &Path, offset: u64, data: &[u8]) {
        let mut f = OpenOptions::new().write(true).open(img).unwrap();
        f.seek(SeekFrom::Start(offset)).unwrap();
        f.write_all(data).unwrap();
    }

    fn sparse_file(img: &Path, size: u64) {
        File::create(img).unwrap().set_len(size).unwrap();
    }

    /// The protective MBR's 0xEE entry: (start LBA, size in sectors).
    fn pmbr_entry(img: &Path) -> (u32, u32) {
        let mbr = read_at(img, 0, 512);
        assert_eq!(mbr[510..], [0x55, 0xAA]);
        assert_eq!(mbr[446 + 4], 0xEE, "first MBR entry is not protective");
        let u = |o: usize| u32::from_le_bytes(mbr[o..o + 4].try_into().unwrap());
        (u(446 + 8), u(446 + 12))
    }

    #[test]
    fn guid_text_and_disk_order() {
        // The ESP type as stored on disk.
        let esp = [
            0x28, 0x73, 0x2A, 0xC1, 0x1F, 0xF8, 0xD2, 0x11, 0xBA, 0x4B, 0x00, 0xA0, 0xC9, 0x3E, 0xC9, 0x3B,
        ];
        assert_eq!(types::ESP, esp);
        assert_eq!(guid_to_string(&esp), "C12A7328-F81F-11D2-BA4B-00A0C93EC93B");
        assert_eq!(parse_guid("c12a7328-f81f-11d2-ba4b-00a0c93ec93b"), Some(esp));
        assert_eq!(parse_guid("C12A7328F81F-11D2-BA4B-00A0C93EC93B-"), None);
        let r = random_guid().unwrap();
        assert_eq!(parse_guid(&guid_to_string(&r)), Some(r));
        assert_eq!(&guid_to_string(&r)[14..15], "4", "version 4 GUID");
        assert_ne!(r, random_guid().unwrap());
    }

    #[test]
    fn create_cloud_layout_matches_ubuntu() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk.raw");
        // Not a MiB multiple: rounded up.
        let layout = create_cloud_layout(&img, 3 * GIB - 1000).unwrap();
        let size = std::fs::metadata(&img).unwrap().len();
        assert_eq!(size, 3 * GIB);
        assert_eq!(layout.disk_size, 3 * GIB);
        use std::os::unix::fs::MetadataExt;
        assert!(
            std::fs::metadata(&img).unwrap().blocks() * 512 < MIB,
            "image is not sparse"
        );

        assert_sgdisk_clean(&img);
        let last_usable = 3 * GIB / LBA - 34;
        assert_eq!(
            sgdisk_parts(&img),
            vec![
                (1, 227328, last_usable, "8300".into()),
                (14, 2048, 10239, "EF02".into()),
                (15, 10240, 227327, "EF00".into()),
            ]
        );
        // GUIDs: our on-disk byte order agrees with sgdisk's text.
        let p = sgdisk(&["-p"], &img);
        assert!(
            p.contains(&format!(
                "Disk identifier (GUID): {}",
                guid_to_string(&layout.disk_guid)
            )),
            "{p}"
        );
        for part in &layout.partitions {
            let info = sgdisk(&["-i", &part.number.to_string()], &img);
            assert!(
                info.contains(&format!("Partition GUID code: {}", guid_to_string(&part.type_guid))),
                "{info}"
            );
            assert!(
                info.contains(&format!("Partition unique GUID: {}", guid_to_string(&part.unique_guid))),
                "{info}"
            );
        }
        assert_eq!(pmbr_entry(&img), (1, (3 * GIB / LBA - 1) as u32));

        let root = layout.root().unwrap();
        assert_eq!((root.number, root.first_lba, root.last_lba), (1, 227328, last_usable));
        assert_eq!(root.offset_bytes(), 111 * MIB);
        assert_eq!(root.size_bytes(), (last_usable + 1) * LBA - 111 * MIB);
        let esp = layout.esp().unwrap();
        assert_eq!(
            (esp.number, esp.offset_bytes(), esp.size_bytes()),
            (15, 5 * MIB, 106 * MIB)
        );
        let bios = layout.bios_boot().unwrap();
        assert_eq!(
            (bios.number, bios.offset_bytes(), bios.size_bytes()),
            (14, MIB, 4 * MIB)
        );

        // read_layout sees the same table.
        let again = read_layout(&img).unwrap();
        assert_eq!(format!("{again:?}"), format!("{layout:?}"));
        let json = serde_json::to_value(&again).unwrap();
        assert_eq!(
            json["partitions"][2]["type_guid"],
            "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
        );

        // Re-creating truncates: fresh GUIDs, same geometry.
        let fresh = create_cloud_layout(&img, 3 * GIB).unwrap();
        assert_ne!(fresh.disk_guid, layout.disk_guid);
        assert_sgdisk_clean(&img);
    }

    #[test]
    fn create_too_small_is_user_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = create_cloud_layout(&dir.path().join("d.raw"), 100 * MIB).unwrap_err();
        assert_eq!(exit_code(&err), 2, "{err:#}");
        assert!(err.to_string().contains("raise disk_size"), "{err:#}");
    }

    #[test]
    fn grow_2g_to_5g_keeps_boot_code() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk.raw");
        let before = create_cloud_layout(&img, 2 * GIB).unwrap();
        // GRUB boot code stand-in and a disk signature: neither may change.
        let marker: Vec<u8> = (0..446u32).map(|i| (i * 7 % 251) as u8 + 1).collect();
        write_at(&img, 0, &marker);
        let old_backup = 2 * GIB / LBA - 1;
        assert_eq!(raw_header(&img, 1).1, old_backup);

        let layout = grow(&img, 5 * GIB).unwrap();

        assert_eq!(std::fs::metadata(&img).unwrap().len(), 5 * GIB);
        assert_eq!(layout.disk_size, 5 * GIB);
        assert_sgdisk_clean(&img);
        let last = 5 * GIB / LBA - 1;
        let (my, alternate, _, last_usable) = raw_header(&img, 1);
        assert_eq!((my, alternate, last_usable), (1, last, last - 33));
        let (my, alternate, _, backup_last_usable) = raw_header(&img, last);
        assert_eq!((my, alternate, backup_last_usable), (last, 1, last - 33));
        assert_eq!(read_at(&img, 0, 446), marker, "MBR boot code or disk signature changed");
        assert_eq!(pmbr_entry(&img), (1, last as u32));
        // The old backup header inside the grown root is gone.
        assert_eq!(read_at(&img, old_backup * LBA, 512), vec![0u8; 512]);

        let root = layout.root().unwrap();
        assert_eq!((root.first_lba, root.last_lba), (227328, last - 33));
        assert_eq!(layout.last_usable_lba, last - 33);
        let parts = sgdisk_parts(&img);
        assert_eq!(parts[0], (1, 227328, last - 33, "8300".into()));
        // Everything else is as it was.
        assert_eq!(layout.disk_guid, before.disk_guid);
        for (a, b) in layout.partitions.iter().zip(&before.partitions) {
            assert_eq!(a.unique_guid, b.unique_guid);
            if a.number != 1 {
                assert_eq!((a.first_lba, a.last_lba), (b.first_lba, b.last_lba));
            }
        }
    }

    #[test]
    fn grow_table_made_by_sgdisk() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk.raw");
        sparse_file(&img, 2 * GIB);
        sgdisk(
            &[
                "-n",
                "14:2048:+4M",
                "-t",
                "14:ef02",
                "-n",
                "15::+106M",
                "-t",
                "15:ef00",
                "-n",
                "1::",
                "-t",
                "1:8300",
            ],
            &img,
        );
        let layout = grow(&img, 4 * GIB + 123).unwrap();
        // Rounded up to a MiB.
        assert_eq!(layout.disk_size, 4 * GIB + MIB);
        assert_sgdisk_clean(&img);
        let last_usable = (4 * GIB + MIB) / LBA - 34;
        assert_eq!(sgdisk_parts(&img)[0], (1, 227328, last_usable, "8300".into()));
    }

    #[test]
    fn grow_to_same_size_fills_disk() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk.raw");
        // A root that does not fill the disk...
        sparse_file(&img, 2 * GIB);
        sgdisk(
            &["-n", "15:2048:+106M", "-t", "15:ef00", "-n", "1::+500M", "-t", "1:8300"],
            &img,
        );
        grow(&img, 2 * GIB).unwrap();
        assert_sgdisk_clean(&img);
        assert_eq!(sgdisk_parts(&img)[0].2, 2 * GIB / LBA - 34);

        // ...and a file extended behind the table's back (like `qemu-img resize`): the
        // backup GPT is not at the end until kiln moves it there.
        File::options()
            .write(true)
            .open(&img)
            .unwrap()
            .set_len(3 * GIB)
            .unwrap();
        let layout = grow(&img, 3 * GIB).unwrap();
        assert_sgdisk_clean(&img);
        let last = 3 * GIB / LBA - 1;
        assert_eq!(raw_header(&img, 1).1, last);
        assert_eq!(raw_header(&img, last).0, last);
        assert_eq!(layout.root().unwrap().last_lba, last - 33);
        assert_eq!(pmbr_entry(&img), (1, last as u32));
    }

    #[test]
    fn grow_repairs_damaged_primary_header() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk.raw");
        create_cloud_layout(&img, 2 * GIB).unwrap();
        // Break the primary header's checksum: the table is read from the backup copy.
        let mut byte = read_at(&img, LBA + 60, 1);
        byte[0] ^= 0xFF;
        write_at(&img, LBA + 60, &byte);
        assert_eq!(read_layout(&img).unwrap().partitions.len(), 3);
        let layout = grow(&img, 3 * GIB).unwrap();
        assert_sgdisk_clean(&img);
        assert_eq!(raw_header(&img, 1).1, 3 * GIB / LBA - 1);
        assert_eq!(layout.root().unwrap().last_lba, 3 * GIB / LBA - 34);
    }

    #[test]
    fn grow_smaller_is_user_error() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk.raw");
        create_cloud_layout(&img, 3 * GIB).unwrap();
        let err = grow(&img, 2 * GIB).unwrap_err();
        assert_eq!(exit_code(&err), 2, "{err:#}");
        let msg = err.to_string();
        for want in [
            "disk.raw",
            "3221225472 bytes",
            "2147483648 bytes",
            "raise disk_size in the image definition",
        ] {
            assert!(msg.contains(want), "{want:?} missing from: {msg}");
        }
        assert_eq!(std::fs::metadata(&img).unwrap().len(), 3 * GIB, "file changed");
        assert_sgdisk_clean(&img);
    }

    #[test]
    fn no_gpt_is_user_error() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("zeros.raw");
        sparse_file(&empty, 64 * MIB);
        let tiny = dir.path().join("tiny.raw");
        std::fs::write(&tiny, b"QFI\xfb not really a disk").unwrap();
        // An MBR-only disk: one Linux partition, no GPT.
        let mbr = dir.path().join("mbr.raw");
        sparse_file(&mbr, 64 * MIB);
        let mut sector = [0u8; 512];
        sector[446 + 4] = 0x83;
        sector[446 + 8..446 + 12].copy_from_slice(&2048u32.to_le_bytes());
        sector[446 + 12..446 + 16].copy_from_slice(&(64 * 2048 - 2048u32).to_le_bytes());
        sector[510..].copy_from_slice(&[0x55, 0xAA]);
        write_at(&mbr, 0, &sector);

        for img in [&empty, &tiny, &mbr] {
            for err in [read_layout(img).unwrap_err(), grow(img, 2 * GIB).unwrap_err()] {
                assert_eq!(exit_code(&err), 2, "{err:#}");
                let msg = err.to_string();
                assert!(msg.contains(&img.display().to_string()), "{msg}");
                assert!(
                    msg.contains("has no GPT partition table: kiln expects a GPT disk"),
                    "{msg}"
                );
            }
        }
        assert_eq!(
            std::fs::metadata(&empty).unwrap().len(),
            64 * MIB,
            "grow touched a disk without GPT"
        );

        let err = read_layout(&dir.path().join("missing.raw")).unwrap_err();
        assert_eq!(exit_code(&err), 1);
        assert!(format!("{err:#}").contains("missing.raw"), "{err:#}");
    }

    #[test]
    fn root_not_last_is_user_error() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk.raw");
        sparse_file(&img, 2 * GIB);
        sgdisk(&["-n", "1:2048:+1G", "-t", "1:8300", "-n", "2::", "-t", "2:8200"], &img);
        let err = grow(&img, 3 * GIB).unwrap_err();
        assert_eq!(exit_code(&err), 2, "{err:#}");
        let msg = err.to_string();
        assert!(msg.contains("disk.raw") && msg.contains("partition 2"), "{msg}");
        assert_eq!(std::fs::metadata(&img).unwrap().len(), 2 * GIB, "file changed");

        // No Linux partition at all.
        sgdisk(&["-o", "-n", "1:2048:+100M", "-t", "1:ef00"], &img);
        let err = grow(&img, 3 * GIB).unwrap_err();
        assert_eq!(exit_code(&err), 2, "{err:#}");
        assert!(err.to_string().contains("no Linux filesystem partition"), "{err}");
    }

    #[test]
    fn root_selection() {
        let part = |number, type_guid, first_lba, last_lba| Part {
            number,
            type_guid,
            unique_guid: [number as u8; 16],
            name: String::new(),
            first_lba,
            last_lba,
            sector_size: 512,
        };
        let mut layout = Layout {
            disk_size: 8 * GIB,
            sector_size: 512,
            disk_guid: [0; 16],
            first_usable_lba: 34,
            last_usable_lba: 8 * GIB / 512 - 34,
            partitions: vec![
                part(1, types::ESP, 2048, 4095),
                part(2, types::LINUX_FS, 4096, 8191),
                part(3, types::LINUX_ROOT_X86_64, 8192, 100_000),
                part(4, [7; 16], 100_001, 200_000),
            ],
        };
        assert_eq!(layout.root().unwrap().number, 3, "largest Linux partition");
        assert_eq!(layout.esp().unwrap().number, 1);
        assert!(layout.bios_boot().is_none());
        assert_eq!(layout.part(4).unwrap().kind(), PartKind::Other);
        layout.partitions[0].type_guid = types::LINUX_FS;
        assert_eq!(layout.root().unwrap().number, 1, "partition 1 wins when it is Linux");
    }
}
