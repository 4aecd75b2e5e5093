//! FAT filesystems in userspace, with `fatfs`: the EFI System Partition and the
//! cloud-init NoCloud seed.
//!
//! The build host may have no vfat driver, so nothing here mounts anything: a FAT volume
//! is a byte range of an image file (a partition's `offset_bytes()`/`size_bytes()` from
//! [`crate::disk::gpt::Layout`], or a whole small file), accessed through
//! [`fscommon::StreamSlice`]. Every function that writes syncs the file before returning.

use anyhow::{Context, Result, bail};
use fatfs::{FatType, FileSystem, FormatVolumeOptions, FsOptions};
use fscommon::StreamSlice;
use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;

use crate::error::user;
use crate::user_bail;

/// FAT sector size kiln formats with (what mkfs.vfat uses on 512-byte-sector disks).
const FAT_SECTOR: u64 = 512;

/// Size of the standalone NoCloud seed image: small enough to be FAT12.
const CIDATA_SIZE: u64 = 2 << 20;

/// The ESP's volume label on Ubuntu cloud images.
pub const ESP_LABEL: &str = "UEFI";

/// The volume label cloud-init's NoCloud datasource looks for.
pub const CIDATA_LABEL: &str = "cidata";

/// A byte range of `file` as a stream fatfs can use.
type Volume<'f> = StreamSlice<&'f File>;

fn slice(file: &File, offset: u64, len: u64) -> Result<Volume<'_>> {
    let end = offset.checked_add(len).context("FAT volume range overflows")?;
    let file_len = file.metadata().context("reading the image size")?.len();
    if end > file_len {
        bail!("FAT volume {offset}..{end} lies beyond the end of the image ({file_len} bytes)");
    }
    StreamSlice::new(file, offset, end).context("seeking to the FAT volume")
}

fn open_fs(file: &File, offset: u64, len: u64) -> Result<FileSystem<Volume<'_>>> {
    FileSystem::new(slice(file, offset, len)?, FsOptions::new())
        .with_context(|| format!("no FAT filesystem at offset {offset} (length {len})"))
}

/// Mount for writing. fatfs formats FAT32 with FSInfo's free-cluster count unset
/// (0xFFFFFFFF), which fsck.vfat reports; asking for the stats counts the free clusters,
/// fatfs keeps the count up to date from then on and writes it back when unmounting.
fn open_fs_rw(file: &File, offset: u64, len: u64) -> Result<FileSystem<Volume<'_>>> {
    let fs = open_fs(file, offset, len)?;
    fs.stats().context("counting free clusters on the FAT volume")?;
    Ok(fs)
}

/// Format `len` bytes of `file` starting at `offset` as FAT32 with 512-byte sectors and
/// the given volume label (at most 11 characters), in both the boot sector and the root
/// directory, like `mkfs.vfat -F 32 -n LABEL`. FAT32 needs at least 65525 clusters: with
/// the 512-byte clusters fatfs picks for volumes up to 260 MiB that is about 33 MiB, so
/// Ubuntu's 106 MiB ESP fits.
pub fn format_fat32(file: &File, offset: u64, len: u64, label: &str) -> Result<()> {
    format(file, offset, len, label, FatType::Fat32)
}

fn format(file: &File, offset: u64, len: u64, label: &str, fat_type: FatType) -> Result<()> {
    let label_bytes = volume_label(label)?;
    let sectors = u32::try_from(len / FAT_SECTOR).context("FAT volume too large")?;
    let options = FormatVolumeOptions::new()
        .fat_type(fat_type)
        .bytes_per_sector(FAT_SECTOR as u16)
        .total_sectors(sectors)
        .volume_id(random_volume_id()?)
        .volume_label(label_bytes);
    fatfs::format_volume(slice(file, offset, len)?, options).with_context(|| {
        format!(
            "formatting {} MiB at offset {offset} as {fat_type:?} (label {label})",
            len >> 20
        )
    })?;
    // fatfs takes the FAT type only as a hint and falls back to what the size allows.
    let fs = open_fs_rw(file, offset, len)?;
    if fs.fat_type() != fat_type {
        let hint = if fat_type == FatType::Fat32 {
            "; FAT32 with 512-byte clusters needs at least 33 MiB"
        } else {
            ""
        };
        bail!(
            "{} MiB at offset {offset} is the wrong size for {fat_type:?} (fatfs made {:?}){hint}",
            len >> 20,
            fs.fat_type()
        );
    }
    fs.unmount().context("unmounting the new FAT volume")?;
    file.sync_all().context("syncing the image")
}

/// Write `files` (path inside the volume, contents) into the FAT volume at
/// `offset..offset+len`, creating parent directories and replacing existing files.
/// Paths use `/` and are case-insensitive, as FAT is: "EFI/BOOT/BOOTX64.EFI".
pub fn write_files(file: &File, offset: u64, len: u64, files: &[(&str, &[u8])]) -> Result<()> {
    let fs = open_fs_rw(file, offset, len)?;
    {
        let root = fs.root_dir();
        for (path, data) in files {
            let path = path.trim_matches('/');
            if path.is_empty() {
                bail!("empty path for a file on the FAT volume");
            }
            if let Some((dirs, _)) = path.rsplit_once('/') {
                let mut dir = root.clone();
                for name in dirs.split('/').filter(|n| !n.is_empty()) {
                    dir = dir
                        .create_dir(name)
                        .with_context(|| format!("creating directory {name} for {path} on the FAT volume"))?;
                }
            }
            let mut f = root
                .create_file(path)
                .with_context(|| format!("creating {path} on the FAT volume"))?;
            f.truncate()
                .with_context(|| format!("truncating {path} on the FAT volume"))?;
            f.write_all(data)
                .with_context(|| format!("writing {path} on the FAT volume"))?;
            f.flush().with_context(|| format!("writing {path} on the FAT volume"))?;
        }
    }
    fs.unmount().context("unmounting the FAT volume")?;
    dot_entries::repair(&mut slice(file, offset, len)?).context("repairing new FAT directories")?;
    file.sync_all().context("syncing the image")
}

/// Read one file from the FAT volume at `offset..offset+len`.
pub fn read_file(file: &File, offset: u64, len: u64, path: &str) -> Result<Vec<u8>> {
    let fs = open_fs(file, offset, len)?;
    let mut data = Vec::new();
    fs.root_dir()
        .open_file(path.trim_matches('/'))
        .and_then(|mut f| f.read_to_end(&mut data))
        .with_context(|| format!("reading {path} from the FAT volume"))?;
    Ok(data)
}

/// The volume label of the FAT volume at `offset..offset+len`: the root directory's
/// label entry if there is one (what blkid and Linux report), else the boot sector's.
pub fn label(file: &File, offset: u64, len: u64) -> Result<String> {
    let fs = open_fs(file, offset, len)?;
    let from_root = fs
        .read_volume_label_from_root_dir()
        .context("reading the FAT volume label")?;
    Ok(from_root.unwrap_or_else(|| fs.volume_label()))
}

/// Create `path` as a standalone 2 MiB FAT12 image labelled "cidata" holding `files`
/// (`user-data`, `meta-data`, `network-config`): a cloud-init NoCloud seed to attach to
/// QEMU as a second drive.
pub fn make_cidata(path: &Path, files: &[(&str, &[u8])]) -> Result<()> {
    let file = crate::disk::sparse::create_sized(path, CIDATA_SIZE)?;
    let ctx = || format!("writing the cloud-init seed {}", path.display());
    format(&file, 0, CIDATA_SIZE, CIDATA_LABEL, FatType::Fat12).with_context(ctx)?;
    write_files(&file, 0, CIDATA_SIZE, files).with_context(ctx)
}

/// A FAT volume label: up to 11 printable ASCII characters that FAT allows in short
/// names, padded with spaces. Case is kept (cloud-init accepts "cidata" and "CIDATA").
fn volume_label(label: &str) -> Result<[u8; 11]> {
    const FORBIDDEN: &[u8] = b"\"*+,./:;<=>?[\\]|";
    let bytes = label.as_bytes();
    if bytes.is_empty() || bytes.len() > 11 {
        user_bail!("FAT volume label {label:?} must be 1 to 11 characters");
    }
    if bytes
        .iter()
        .any(|&b| !(0x20..0x7F).contains(&b) || FORBIDDEN.contains(&b))
        || bytes[0] == b' '
    {
        return Err(user(format!(
            "FAT volume label {label:?} may only hold ASCII letters, digits, spaces (not first) and !#$%&'()-@^_`{{}}~"
        )));
    }
    let mut out = [b' '; 11];
    out[..bytes.len()].copy_from_slice(bytes);
    Ok(out)
}

fn random_volume_id() -> Result<u32> {
    let mut b = [0u8; 4];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .context("reading /dev/urandom")?;
    Ok(u32::from_le_bytes(b))
}

/// Repair of the "." and ".." entries that fatfs 0.3.6 writes when it creates a directory
/// (rafalh/rust-fatfs#117, fixed upstream after 0.3.6):
///
/// - it gives both a long-name (LFN) entry, so a new directory starts
///   `LFN(.) . LFN(..) ..` instead of `. ..`: fsck.vfat wants "." and ".." in the first two
///   slots and "repairs" the directory by renaming and deleting them;
/// - on FAT32, ".." of a directory in the root points to the root's cluster, where the
///   FAT specification says 0.
///
/// [`repair`] walks the directory tree with a minimal FAT reader and rewrites such
/// directories to `. .. <deleted> <deleted>`; directories already valid are not written.
mod dot_entries {
    use anyhow::{Result, bail};
    use std::collections::HashSet;
    use std::io::{Read, Seek, SeekFrom, Write};

    const ENTRY: usize = 32;
    const ATTR_LFN: u8 = 0x0F;
    const ATTR_VOLUME: u8 = 0x08;
    const ATTR_DIR: u8 = 0x10;
    const DOT: &[u8; 11] = b".          ";
    const DOTDOT: &[u8; 11] = b"..         ";
    const DELETED: u8 = 0xE5;

    /// Where things are, from the boot sector (BPB).
    struct Geometry {
        cluster_size: u64,
        fat_offset: u64,
        /// Bits per FAT entry: 12, 16 or 32.
        fat_bits: u8,
        data_offset: u64,
        clusters: u32,
        /// FAT12/16: byte range of the fixed root directory; FAT32: `None`.
        fixed_root: Option<(u64, u64)>,
        root_cluster: u32,
    }

    pub fn repair<V: Read + Write + Seek>(vol: &mut V) -> Result<()> {
        let g = Geometry::read(vol)?;
        let root = match g.fixed_root {
            Some((offset, len)) => read_at(vol, offset, len)?,
            None => g.read_chain(vol, g.root_cluster)?,
        };
        let mut seen = HashSet::new();
        let mut todo: Vec<(u32, Vec<u8>, bool)> = vec![(g.root_cluster, root, true)];
        while let Some((_, entries, is_root)) = todo.pop() {
            for e in entries.chunks_exact(ENTRY) {
                match e[0] {
                    0 => break,
                    DELETED => continue,
                    _ => {}
                }
                let attr = e[11];
                if attr == ATTR_LFN || attr & ATTR_VOLUME != 0 || attr & ATTR_DIR == 0 {
                    continue;
                }
                if &e[..11] == DOT || &e[..11] == DOTDOT {
                    continue;
                }
                let cluster = g.entry_cluster(e);
                if cluster < 2 || !seen.insert(cluster) {
                    continue;
                }
                let dir = g.read_chain(vol, cluster)?;
                if let Some(fixed) = g.fixed_first_entries(&dir, is_root) {
                    vol.seek(SeekFrom::Start(g.cluster_offset(cluster)))?;
                    vol.write_all(&fixed)?;
                }
                todo.push((cluster, dir, false));
            }
        }
        vol.flush()?;
        Ok(())
    }

    fn read_at<V: Read + Seek>(vol: &mut V, offset: u64, len: u64) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; len as usize];
        vol.seek(SeekFrom::Start(offset))?;
        vol.read_exact(&mut buf)?;
        Ok(buf)
    }

    fn u16_at(b: &[u8], o: usize) -> u64 {
        u64::from(u16::from_le_bytes([b[o], b[o + 1]]))
    }

    fn u32_at(b: &[u8], o: usize) -> u64 {
        u64::from(u32::from_le_bytes(b[o..o + 4].try_into().unwrap()))
    }

    impl Geometry {
        fn read<V: Read + Seek>(vol: &mut V) -> Result<Geometry> {
            let b = read_at(vol, 0, 512)?;
            let sector = u16_at(&b, 11);
            let per_cluster = u64::from(b[13]);
            let reserved = u16_at(&b, 14);
            let fats = u64::from(b[16]);
            let root_entries = u16_at(&b, 17);
            let total = match u16_at(&b, 19) {
                0 => u32_at(&b, 32),
                n => n,
            };
            let fat_sectors = match u16_at(&b, 22) {
                0 => u32_at(&b, 36),
                n => n,
            };
            if sector == 0 || per_cluster == 0 || b[510..512] != [0x55, 0xAA] {
                bail!("not a FAT boot sector");
            }
            let root_sectors = (root_entries * ENTRY as u64).div_ceil(sector);
            let data_sector = reserved + fats * fat_sectors + root_sectors;
            let clusters = (total.saturating_sub(data_sector) / per_cluster) as u32;
            let fat_bits = match clusters {
                0..4085 => 12,
                4085..65525 => 16,
                _ => 32,
            };
            let fixed_root =
                (fat_bits != 32).then(|| ((reserved + fats * fat_sectors) * sector, root_sectors * sector));
            Ok(Geometry {
                cluster_size: per_cluster * sector,
                fat_offset: reserved * sector,
                fat_bits,
                data_offset: data_sector * sector,
                clusters,
                fixed_root,
                root_cluster: if fat_bits == 32 { u32_at(&b, 44) as u32 } else { 0 },
            })
        }

        fn cluster_offset(&self, cluster: u32) -> u64 {
            self.data_offset + u64::from(cluster - 2) * self.cluster_size
        }

        /// First cluster of a directory entry (the high half only exists on FAT32).
        fn entry_cluster(&self, e: &[u8]) -> u32 {
            let high = if self.fat_bits == 32 { u16_at(e, 20) << 16 } else { 0 };
            (high | u16_at(e, 26)) as u32
        }

        /// The FAT entry of `cluster`: the next cluster, or `None` at the end of a chain.
        fn next<V: Read + Seek>(&self, vol: &mut V, cluster: u32) -> Result<Option<u32>> {
            let c = u64::from(cluster);
            let (offset, len) = match self.fat_bits {
                12 => (c + c / 2, 2),
                16 => (2 * c, 2),
                _ => (4 * c, 4),
            };
            let raw = read_at(vol, self.fat_offset + offset, len)?;
            let value = match self.fat_bits {
                12 if cluster % 2 == 1 => u16_at(&raw, 0) >> 4,
                12 => u16_at(&raw, 0) & 0xFFF,
                16 => u16_at(&raw, 0),
                _ => u32_at(&raw, 0) & 0x0FFF_FFFF,
            } as u32;
            Ok((2..self.clusters + 2).contains(&value).then_some(value))
        }

        /// The contents of a cluster chain (a directory), bounded against FAT loops.
        fn read_chain<V: Read + Seek>(&self, vol: &mut V, first: u32) -> Result<Vec<u8>> {
            let mut data = Vec::new();
            let mut cluster = Some(first);
            let mut steps = 0;
            while let Some(c) = cluster {
                if !(2..self.clusters + 2).contains(&c) || steps > self.clusters {
                    bail!("bad cluster chain starting at {first}");
                }
                data.extend(read_at(vol, self.cluster_offset(c), self.cluster_size)?);
                cluster = self.next(vol, c)?;
                steps += 1;
            }
            Ok(data)
        }

        /// The repaired first entries of a directory made by fatfs, or `None` if it needs
        /// no repair.
        fn fixed_first_entries(&self, dir: &[u8], parent_is_root: bool) -> Option<Vec<u8>> {
            let slot = |i: usize| dir.get(i * ENTRY..(i + 1) * ENTRY);
            let is = |e: &[u8], name: &[u8; 11]| &e[..11] == name && e[11] & ATTR_DIR != 0;
            let (mut dot, mut dotdot, slots) = match (slot(0)?, slot(1)?, slot(2), slot(3)) {
                (l1, d, Some(l2), Some(dd))
                    if l1[11] == ATTR_LFN && is(d, DOT) && l2[11] == ATTR_LFN && is(dd, DOTDOT) =>
                {
                    (d.to_vec(), dd.to_vec(), 4)
                }
                (d, dd, _, _) if is(d, DOT) && is(dd, DOTDOT) => (d.to_vec(), dd.to_vec(), 2),
                _ => return None,
            };
            let dotdot_points_to_root =
                self.fat_bits == 32 && parent_is_root && self.entry_cluster(&dotdot) == self.root_cluster;
            if slots == 2 && !dotdot_points_to_root {
                return None;
            }
            if dotdot_points_to_root {
                dotdot[20..22].fill(0);
                dotdot[26..28].fill(0);
            }
            dot.truncate(ENTRY);
            let mut out = [dot, dotdot].concat();
            for _ in 2..slots {
                let mut deleted = vec![0u8; ENTRY];
                deleted[0] = DELETED;
                out.extend(deleted);
            }
            Some(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::exit_code;
    use std::fs::OpenOptions;
    use std::io::{Seek, SeekFrom};
    use std::process::Command;

    const MIB: u64 = 1 << 20;

    fn run(program: &str, args: &[&str]) -> (i32, String) {
        let out = Command::new(program)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {program} ({e}): apt-get install -y dosfstools util-linux"));
        let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
        (out.status.code().unwrap_or(-1), text)
    }

    /// `fsck.vfat -n -v -l` finds nothing to fix; returns its listing.
    fn assert_fsck_clean(img: &Path) -> String {
        let (code, out) = run("fsck.vfat", &["-n", "-v", "-l", img.to_str().unwrap()]);
        assert_eq!(code, 0, "fsck.vfat -n found problems:\n{out}");
        for bad in [
            "differ",
            "Dirty bit",
            "orrupt",
            "Leaving filesystem unchanged",
            "Free cluster summary",
        ] {
            assert!(!out.contains(bad), "fsck.vfat reports {bad:?}:\n{out}");
        }
        out
    }

    /// blkid's low-level probe of a file, as KEY=value pairs.
    fn blkid(img: &Path) -> String {
        let (code, out) = run("blkid", &["-p", "-o", "export", img.to_str().unwrap()]);
        assert_eq!(code, 0, "blkid:\n{out}");
        out
    }

    fn copy_range(from: &Path, offset: u64, len: u64, to: &Path) {
        let mut src = File::open(from).unwrap();
        src.seek(SeekFrom::Start(offset)).unwrap();
        let mut dst = File::create(to).unwrap();
        let copied = std::io::copy(&mut src.take(len), &mut dst).unwrap();
        assert_eq!(copied, len);
    }

    fn fill(file: &File, offset: u64, len: usize, byte: u8) {
        use std::os::unix::fs::FileExt;
        file.write_all_at(&vec![byte; len], offset).unwrap();
    }

    fn read(file: &File, offset: u64, len: usize) -> Vec<u8> {
        use std::os::unix::fs::FileExt;
        let mut buf = vec![0; len];
        file.read_exact_at(&mut buf, offset).unwrap();
        buf
    }

    #[test]
    fn esp_in_a_partition_of_a_disk() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk.raw");
        let layout = crate::disk::gpt::create_cloud_layout(&img, 1 << 30).unwrap();
        let esp = layout.esp().unwrap();
        let (off, len) = (esp.offset_bytes(), esp.size_bytes());
        let disk = OpenOptions::new().read(true).write(true).open(&img).unwrap();
        // Neighbours that must not be touched: the end of the BIOS boot partition and the
        // start of the root partition.
        fill(&disk, off - 4096, 4096, 0xB1);
        fill(&disk, off + len, 4096, 0xE7);

        format_fat32(&disk, off, len, ESP_LABEL).unwrap();
        let grub_cfg = b"search.fs_uuid 1234 root\nset prefix=($root)'/boot/grub'\nconfigfile $prefix/grub.cfg\n";
        let shim = vec![0x4D; 900_000];
        write_files(
            &disk,
            off,
            len,
            &[
                ("EFI/BOOT/BOOTX64.EFI", &shim),
                ("EFI/ubuntu/grub.cfg", grub_cfg),
                ("/EFI/ubuntu/old.cfg", b"x"),
            ],
        )
        .unwrap();
        // Replacing a file (shorter now) and adding one next to it, paths case-insensitive.
        write_files(
            &disk,
            off,
            len,
            &[("efi/boot/bootx64.efi", b"MZ shim"), ("EFI/BOOT/fbx64.efi", b"fb")],
        )
        .unwrap();

        assert_eq!(read(&disk, off - 4096, 4096), vec![0xB1; 4096], "wrote before the ESP");
        assert_eq!(read(&disk, off + len, 4096), vec![0xE7; 4096], "wrote past the ESP");
        assert_eq!(read_file(&disk, off, len, "EFI/BOOT/BOOTX64.EFI").unwrap(), b"MZ shim");
        assert_eq!(read_file(&disk, off, len, "EFI/ubuntu/grub.cfg").unwrap(), grub_cfg);
        assert_eq!(read_file(&disk, off, len, "EFI/BOOT/fbx64.efi").unwrap(), b"fb");
        assert_eq!(label(&disk, off, len).unwrap(), "UEFI");
        assert!(read_file(&disk, off, len, "EFI/nope").is_err());

        // Checked by dosfstools and blkid on the extracted partition.
        let part = dir.path().join("esp.img");
        copy_range(&img, off, len, &part);
        let listing = assert_fsck_clean(&part);
        for path in [
            "/EFI/BOOT/BOOTX64.EFI",
            "/EFI/ubuntu/grub.cfg",
            "/EFI/ubuntu/old.cfg",
            "/EFI/BOOT/fbx64.efi",
        ] {
            assert!(listing.contains(path), "{path} not in fsck listing:\n{listing}");
        }
        assert!(listing.contains("32 bit entries"), "not FAT32:\n{listing}");
        let probe = blkid(&part);
        for want in ["TYPE=vfat", "LABEL=UEFI", "VERSION=FAT32"] {
            assert!(probe.lines().any(|l| l == want), "{want} missing from blkid:\n{probe}");
        }
        let (code, out) = run("fatlabel", &[part.to_str().unwrap()]);
        assert_eq!((code, out.trim()), (0, "UEFI"));
        // The disk's table is intact.
        assert_eq!(
            format!("{:?}", crate::disk::gpt::read_layout(&img).unwrap()),
            format!("{layout:?}")
        );
    }

    #[test]
    fn fat32_needs_room_and_a_valid_label() {
        let dir = tempfile::tempdir().unwrap();
        let f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("v"))
            .unwrap();
        f.set_len(200 * MIB).unwrap();
        let err = format_fat32(&f, 120 * MIB, 8 * MIB, "UEFI").unwrap_err();
        assert!(
            format!("{err:#}").contains("wrong size for Fat32"),
            "8 MiB cannot be FAT32: {err:#}"
        );
        assert!(
            format_fat32(&f, 190 * MIB, 20 * MIB, "UEFI").is_err(),
            "range past the end"
        );
        for bad in ["", "TWELVE_CHARS", "A/B", "é"] {
            let err = format_fat32(&f, 0, 106 * MIB, bad).unwrap_err();
            assert_eq!(exit_code(&err), 2, "{bad:?}: {err:#}");
        }
        assert!(label(&f, 0, 106 * MIB).is_err(), "nothing was formatted");
        format_fat32(&f, 0, 106 * MIB, "UEFI").unwrap();
        assert!(write_files(&f, 0, 106 * MIB, &[("", b"x")]).is_err());
    }

    #[test]
    fn cidata_seed() {
        let dir = tempfile::tempdir().unwrap();
        let seed = dir.path().join("seed.img");
        let user_data = b"#cloud-config\npassword: kiln\nchpasswd: { expire: false }\n";
        let files: &[(&str, &[u8])] = &[
            ("user-data", user_data),
            ("meta-data", b"instance-id: kiln-boottest\nlocal-hostname: node\n"),
            ("network-config", b"version: 2\nethernets: {}\n"),
        ];
        make_cidata(&seed, files).unwrap();
        assert_eq!(std::fs::metadata(&seed).unwrap().len(), CIDATA_SIZE);
        let listing = assert_fsck_clean(&seed);
        for (name, _) in files {
            assert!(
                listing.contains(&format!("/{name}")),
                "{name} not in fsck listing:\n{listing}"
            );
        }
        let probe = blkid(&seed);
        for want in ["TYPE=vfat", "LABEL=cidata"] {
            assert!(probe.lines().any(|l| l == want), "{want} missing from blkid:\n{probe}");
        }
        let f = File::open(&seed).unwrap();
        assert_eq!(label(&f, 0, CIDATA_SIZE).unwrap(), "cidata");
        assert_eq!(read_file(&f, 0, CIDATA_SIZE, "user-data").unwrap(), user_data);
        // Directories on FAT12 too (two levels, so ".." points to a subdirectory).
        let f = File::options().read(true).write(true).open(&seed).unwrap();
        write_files(
            &f,
            0,
            CIDATA_SIZE,
            &[("scripts/per-boot/hello.sh", b"#!/bin/sh\necho hi\n")],
        )
        .unwrap();
        let listing = assert_fsck_clean(&seed);
        assert!(listing.contains("/scripts/per-boot/hello.sh"), "{listing}");
        assert_eq!(
            read_file(&f, 0, CIDATA_SIZE, "SCRIPTS/per-boot/hello.sh").unwrap(),
            b"#!/bin/sh\necho hi\n"
        );
        // Making it again replaces it.
        make_cidata(&seed, &files[..1]).unwrap();
        assert!(read_file(&File::open(&seed).unwrap(), 0, CIDATA_SIZE, "meta-data").is_err());
    }
}
