//! Opening a disk image for reading, without mounting anything and without root: a raw
//! file as it is, a qcow2 through a sparse raw conversion; its GPT (read by
//! [`crate::disk::gpt`]) and the filesystem at the start of each partition (probed by
//! [`crate::disk::probe`]); and its ext4 root filesystem, read in place with `ext4-view`
//! over the image file at the partition's byte offset ([`RootFs`]).

use crate::disk::gpt::{self, Layout, Part};
use crate::disk::{probe, qcow2, read_up_to};
use crate::error::user;
use crate::host::cmd::Cmd;
use anyhow::{Context, Result, anyhow};
use ext4_view::{Ext4, Ext4Error, Ext4Read, FileType};
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use tempfile::TempDir;

/// What every `user` error about the input says was expected.
const EXPECTED_IMAGE: &str =
    "expected a raw or qcow2 GPT disk image like Ubuntu's cloud image, with an ext4 root filesystem";

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

impl PartitionFacts {
    /// The facts of a GPT entry; GUIDs in lower case, as blkid prints them.
    pub fn of(p: &Part) -> PartitionFacts {
        let type_guid = gpt::guid_to_string(&p.type_guid).to_ascii_lowercase();
        PartitionFacts {
            number: p.number,
            type_name: gpt::type_name(&p.type_guid).map_or_else(|| type_guid.clone(), str::to_string),
            type_guid,
            guid: gpt::guid_to_string(&p.unique_guid).to_ascii_lowercase(),
            start_lba: p.first_lba,
            end_lba: p.last_lba,
            offset: p.offset_bytes(),
            size: p.size_bytes(),
            name: p.name.clone(),
        }
    }
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

/// A disk image opened as raw bytes (the file itself, or the sparse raw conversion of a
/// qcow2, kept alive by `_tmp`), with its partition table and the filesystems found on
/// it.
pub struct DiskImage {
    /// The path the user gave, for messages.
    source: PathBuf,
    format: ImageFormat,
    file: File,
    layout: Layout,
    filesystems: Vec<FilesystemFacts>,
    _tmp: Option<TempDir>,
}

impl DiskImage {
    /// Open a raw or qcow2 image, read its GPT and probe each partition for a
    /// filesystem. Anything that is not such an image is a `user` error.
    pub fn open(path: &Path) -> Result<DiskImage> {
        let (format, file, tmp) = open_raw(path)?;
        let layout = gpt::read_layout_from(&file, path, EXPECTED_IMAGE)?;
        let mut image = DiskImage {
            source: path.to_path_buf(),
            format,
            file,
            layout,
            filesystems: Vec::new(),
            _tmp: tmp,
        };
        for part in &image.layout.partitions {
            if let Some(fs) = image.probe(part)? {
                image.filesystems.push(fs);
            }
        }
        Ok(image)
    }

    /// The image as given.
    pub fn source(&self) -> &Path {
        &self.source
    }

    pub fn format(&self) -> ImageFormat {
        self.format
    }

    /// Size of the disk in bytes (for qcow2, the virtual size).
    pub fn size(&self) -> u64 {
        self.layout.disk_size
    }

    /// The partition table.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Recognised filesystems, in partition table order.
    pub fn filesystems(&self) -> &[FilesystemFacts] {
        &self.filesystems
    }

    /// Look for an ext or FAT filesystem at the start of a partition.
    fn probe(&self, part: &Part) -> Result<Option<FilesystemFacts>> {
        let (offset, size) = (part.offset_bytes(), part.size_bytes());
        let mut head = vec![0u8; probe::PROBE_LEN.min(size) as usize];
        if offset.saturating_add(head.len() as u64) > self.size() {
            return Ok(None); // the partition lies past the end of a truncated image
        }
        self.file
            .read_exact_at(&mut head, offset)
            .with_context(|| format!("reading partition {} of {}", part.number, self.source.display()))?;
        Ok(probe::probe(&head).map(|p| FilesystemFacts {
            partition: part.number,
            fs_type: p.fs_type,
            version: p.version,
            label: p.label,
            uuid: p.uuid,
        }))
    }

    /// The root filesystem: the ext partition labelled `cloudimg-rootfs`, else partition
    /// 1 if it is ext, else the first ext partition.
    pub fn into_root(self) -> Result<RootFs> {
        let shown = self.source.display().to_string();
        let ext = |f: &&FilesystemFacts| f.fs_type.starts_with("ext");
        let root = self
            .filesystems
            .iter()
            .filter(ext)
            .find(|f| f.label.as_deref() == Some(gpt::ROOT_LABEL))
            .or_else(|| self.filesystems.iter().filter(ext).find(|f| f.partition == 1))
            .or_else(|| self.filesystems.iter().find(ext))
            .ok_or_else(|| {
                user(format!(
                    "{shown}: no ext4 root filesystem on any GPT partition; {EXPECTED_IMAGE}"
                ))
            })?;
        let part = self
            .layout
            .partitions
            .iter()
            .find(|p| p.number == root.partition)
            .expect("every filesystem is on a listed partition");
        let file = self.file.try_clone().with_context(|| format!("reopening {shown}"))?;
        let len = part.size_bytes().min(self.size().saturating_sub(part.offset_bytes()));
        let reader = PartitionReader {
            file,
            offset: part.offset_bytes(),
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
            disk: self,
        })
    }
}

/// The image file as raw bytes: (its format, the raw file, the temporary directory
/// holding a qcow2's raw conversion).
fn open_raw(path: &Path) -> Result<(ImageFormat, File, Option<TempDir>)> {
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
    if qcow2::is_qcow2(&magic[..got]) {
        let (file, tmp) = convert_qcow2(path, &magic[..got])?;
        return Ok((ImageFormat::Qcow2, file, Some(tmp)));
    }
    Ok((ImageFormat::Raw, file, None))
}

/// Convert a qcow2 to a sparse raw in a temporary directory and open that.
///
/// The kernel kiln runs on has no nbd module, so `qemu-nbd` cannot expose the qcow2 as a
/// block device; `qemu-img convert` writes a raw file instead, skipping zero runs, so the
/// copy only takes the space of the data.
fn convert_qcow2(path: &Path, header: &[u8]) -> Result<(File, TempDir)> {
    let shown = path.display();
    if !matches!(qcow2::version(header), Some(2 | 3)) {
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
    Ok((file, tmp))
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
    disk: DiskImage,
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
    /// Open the root filesystem of a raw or qcow2 image (see [`DiskImage::into_root`]).
    pub fn open(image: &Path) -> Result<RootFs> {
        DiskImage::open(image)?.into_root()
    }

    /// The disk image this root was opened from.
    pub fn disk(&self) -> &DiskImage {
        &self.disk
    }

    /// Number of the partition holding this filesystem.
    pub fn partition(&self) -> u32 {
        self.partition
    }

    /// Filesystem label.
    pub fn label(&self) -> String {
        self.fs.label().display().to_string()
    }

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

    /// Every file and directory below `/` (not `/` itself), sorted by path, with its
    /// own metadata (a symlink is not followed). Paths are absolute.
    pub fn walk(&self) -> Result<Vec<(String, FileMeta)>> {
        let mut out = Vec::new();
        let mut dirs = vec![ext4_view::PathBuf::new("/")];
        while let Some(dir) = dirs.pop() {
            let shown = dir.display().to_string();
            for entry in self.fs.read_dir(&dir).map_err(|e| self.err("listing", &shown, e))? {
                let entry = entry.map_err(|e| self.err("listing", &shown, e))?;
                let name = entry.file_name();
                if name.as_ref() == b"." || name.as_ref() == b".." {
                    continue;
                }
                let path = entry.path();
                let meta = entry
                    .metadata()
                    .map_err(|e| self.err("looking up", &path.display().to_string(), e))?;
                let meta = file_meta(meta);
                out.push((path.display().to_string(), meta));
                if meta.kind == FileKind::Directory {
                    dirs.push(path);
                }
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// SHA-256 of a regular file's contents (following symlinks), read block by block;
    /// `progress` is advanced by the bytes read.
    pub fn sha256(&self, path: &str, progress: Option<&indicatif::ProgressBar>) -> Result<[u8; 32]> {
        use sha2::{Digest, Sha256};
        let mut file = self.fs.open(path).map_err(|e| self.err("opening", path, e))?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = file.read_bytes(&mut buf).map_err(|e| self.err("reading", path, e))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            if let Some(p) = progress {
                p.inc(n as u64);
            }
        }
        Ok(hasher.finalize().into())
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::inspect::test_images::{self, images};

    #[test]
    fn rootfs_reads_files_in_place() {
        let r = RootFs::open(&images().qcow2).unwrap();
        assert_eq!(r.partition(), 1);
        assert_eq!(r.disk().source(), images().qcow2);
        assert_eq!(r.disk().format(), ImageFormat::Qcow2);
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
