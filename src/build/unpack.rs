//! Unpacking a root filesystem tarball into an image root.
//!
//! The tarball (Ubuntu's `*-cloudimg-*-root.tar.xz`, or a plain `.tar` from mmdebstrap)
//! is untrusted input. Every entry is written through [`RootDir`], so nothing in it can
//! reach the host: not an absolute or `..` path (refused outright), not a file written
//! under a symlink the archive planted earlier (`etc -> /etc`, then `etc/passwd`: the
//! write resolves inside the root), not a symlink at the destination (replaced, never
//! followed). The `tar` crate's own `unpack` is deliberately not used: it writes through
//! host paths.
//!
//! What is kept, like GNU tar run as root with `--xattrs`: numeric owner and group (never
//! mapped by name), the full mode including setuid/setgid/sticky, mtimes, extended
//! attributes from PAX `SCHILY.xattr.*` records (e.g. `security.capability` on
//! `/usr/bin/ping`), hard links, symlinks, device nodes and FIFOs. Directory modes and
//! mtimes are applied after their contents. When kiln is not root (tests), ownership is
//! left alone, as tar does.

use crate::error::user;
use crate::host::rootdir::{NodeKind, RootDir, set_xattr_fd};
use anyhow::{Context, Result};
use indicatif::ProgressBar;
use nix::sys::stat::Mode;
use nix::sys::time::TimeSpec;
use nix::unistd::{Gid, Uid};
use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Cursor, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use tar::EntryType;

/// Read and copy buffer size: large, since the tarball is ~1 GB uncompressed.
const BUF_SIZE: usize = 1 << 20;

const XZ_MAGIC: &[u8] = &[0xfd, b'7', b'z', b'X', b'Z', 0];
const GZIP_MAGIC: &[u8] = &[0x1f, 0x8b];
const ZSTD_MAGIC: &[u8] = &[0x28, 0xb5, 0x2f, 0xfd];

/// What an unpack wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UnpackStats {
    /// Archive members unpacked (files, directories, links, nodes).
    pub entries: u64,
    /// Bytes of file data written.
    pub bytes: u64,
}

/// Unpack the root filesystem tarball `tarball` (`.tar`, `.tar.xz` or `.tar.gz`, told
/// apart by content) into `root`. `progress`, if given, advances by compressed bytes
/// read; size it to the tarball's length.
///
/// A file that is not a tar archive, an entry that would escape the root, and a
/// truncated or corrupt archive are user errors.
pub fn unpack_tarball(tarball: &Path, root: &RootDir, progress: Option<&ProgressBar>) -> Result<UnpackStats> {
    let file = File::open(tarball).with_context(|| format!("opening {}", tarball.display()))?;
    let input = BufReader::with_capacity(
        BUF_SIZE,
        Counted {
            inner: file,
            progress: progress.cloned(),
        },
    );
    let mut archive = tar::Archive::new(open_stream(tarball, input)?);
    let mut unpacker = Unpacker::new(tarball, root);

    let entries = archive
        .entries()
        .map_err(|e| corrupt(tarball, "reading its first entry", e))?;
    let mut last: Option<String> = None;
    for entry in entries {
        let mut entry = entry.map_err(|e| {
            let at = match &last {
                Some(name) => format!("reading the entry after {name}"),
                None => "reading its first entry".to_string(),
            };
            corrupt(tarball, &at, e)
        })?;
        let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        unpacker.entry(&mut entry, &name)?;
        last = Some(name);
    }
    // Read to the end, so the decompressor checks its trailer and checksum.
    io::copy(&mut archive.into_inner(), &mut io::sink())
        .map_err(|e| corrupt(tarball, "reading past the last entry", e))?;
    let stats = unpacker.finish()?;
    tracing::debug!(
        "unpacked {} entries, {} bytes from {}",
        stats.entries,
        stats.bytes,
        tarball.display()
    );
    Ok(stats)
}

/// Decompress the root tarball `tarball` (.tar.xz or .tar.gz) into the plain tar
/// `dest`, written as `dest.partial` and renamed when the whole stream (trailer and
/// checksum included) decoded. A stream that is not a tar, or is truncated or corrupt,
/// is a user error naming `tarball`; nothing is left at `dest` then.
pub fn decompress_to(tarball: &Path, dest: &Path) -> Result<u64> {
    let file = File::open(tarball).with_context(|| format!("opening {}", tarball.display()))?;
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let pb = crate::host::progress::bytes(len, "decompressing");
    let input = BufReader::with_capacity(
        BUF_SIZE,
        Counted {
            inner: file,
            progress: Some(pb.clone()),
        },
    );
    let mut stream = open_stream(tarball, input)?;
    let partial = dest.with_extension("tar.partial");
    let res = (|| -> Result<u64> {
        let out = File::create(&partial).with_context(|| format!("creating {}", partial.display()))?;
        let mut w = io::BufWriter::with_capacity(BUF_SIZE, out);
        let mut buf = vec![0u8; BUF_SIZE];
        let mut n = 0u64;
        loop {
            let k = match stream.read(&mut buf) {
                Ok(0) => break,
                Ok(k) => k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(corrupt(tarball, "decompressing it", e)),
            };
            w.write_all(&buf[..k])
                .with_context(|| format!("writing {}", partial.display()))?;
            n += k as u64;
        }
        let out = w
            .into_inner()
            .map_err(|e| e.into_error())
            .with_context(|| format!("writing {}", partial.display()))?;
        out.sync_all()
            .with_context(|| format!("syncing {}", partial.display()))?;
        std::fs::rename(&partial, dest)
            .with_context(|| format!("renaming {} to {}", partial.display(), dest.display()))?;
        Ok(n)
    })();
    pb.finish_and_clear();
    if res.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    let n = res?;
    tracing::info!(
        "decompressed {} ({}) into the cache: {}",
        tarball.display(),
        crate::host::progress::human_size(n),
        dest.display()
    );
    Ok(n)
}

/// The tarball's bytes as read from disk, counted on the progress bar.
struct Counted {
    inner: File,
    progress: Option<ProgressBar>,
}

impl Read for Counted {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Some(p) = &self.progress {
            p.inc(n as u64);
        }
        Ok(n)
    }
}

/// Detect the compression by magic bytes and return the decompressed stream, after
/// checking that it starts with a tar header.
fn open_stream(tarball: &Path, mut input: impl BufRead + 'static) -> Result<Box<dyn Read>> {
    let mut magic = Vec::with_capacity(512);
    (&mut input)
        .take(512)
        .read_to_end(&mut magic)
        .with_context(|| format!("reading {}", tarball.display()))?;
    let input = Cursor::new(magic.clone()).chain(input);
    let (mut stream, compression): (Box<dyn Read>, &str) = if magic.starts_with(XZ_MAGIC) {
        (
            Box::new(xz2::bufread::XzDecoder::new_multi_decoder(input)),
            " (it is xz-compressed, but not a tar inside)",
        )
    } else if magic.starts_with(GZIP_MAGIC) {
        (
            Box::new(flate2::bufread::MultiGzDecoder::new(input)),
            " (it is gzip-compressed, but not a tar inside)",
        )
    } else if magic.starts_with(ZSTD_MAGIC) {
        return Err(user(format!(
            "{} is zstd-compressed, which kiln does not read; decompress it (zstd -d) or use a .tar, .tar.xz or .tar.gz",
            tarball.display()
        )));
    } else {
        (Box::new(input), "")
    };
    let mut head = Vec::with_capacity(512);
    (&mut stream)
        .take(512)
        .read_to_end(&mut head)
        .map_err(|e| corrupt(tarball, "reading its first entry", e))?;
    if head.len() == 512 && head.iter().all(|b| *b == 0) {
        return Err(user(format!("{} is an empty tar archive", tarball.display())));
    }
    // ustar, pax and GNU headers all carry "ustar" at offset 257.
    if head.len() < 512 || &head[257..262] != b"ustar" {
        return Err(user(format!(
            "{} is not a tar archive (.tar, .tar.xz, .tar.gz){compression}",
            tarball.display()
        )));
    }
    Ok(Box::new(Cursor::new(head).chain(stream)))
}

/// A truncated or corrupt archive: the user's input is bad.
fn corrupt(tarball: &Path, at: &str, err: impl std::fmt::Display) -> anyhow::Error {
    user(format!("{} is truncated or corrupt ({at}): {err}", tarball.display()))
}

/// [`corrupt`] while reading an entry's data, under the context that names the entry
/// and the tarball.
fn corrupt_data(err: impl std::fmt::Display) -> anyhow::Error {
    user(format!("the archive is truncated or corrupt: {err}"))
}

/// Metadata of one archive member, from its header and PAX records.
struct Meta {
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: i64,
    xattrs: Vec<(String, Vec<u8>)>,
}

struct Unpacker<'a> {
    tarball: &'a Path,
    root: &'a RootDir,
    buf: Vec<u8>,
    /// Only root can give files away; otherwise ownership is left alone, as tar does.
    same_owner: bool,
    /// Directories whose mode and mtime are applied at the end (after their contents,
    /// so a read-only directory can still be filled and its mtime sticks). Reverse
    /// order applies children before parents.
    dirs: BTreeMap<PathBuf, (u32, i64)>,
    stats: UnpackStats,
    warned_acl: bool,
    warned_libarchive: bool,
}

impl<'a> Unpacker<'a> {
    fn new(tarball: &'a Path, root: &'a RootDir) -> Self {
        Unpacker {
            tarball,
            root,
            buf: vec![0; BUF_SIZE],
            same_owner: nix::unistd::geteuid().is_root(),
            dirs: BTreeMap::new(),
            stats: UnpackStats::default(),
            warned_acl: false,
            warned_libarchive: false,
        }
    }

    fn entry<R: Read>(&mut self, entry: &mut tar::Entry<R>, name: &str) -> Result<()> {
        let kind = entry.header().entry_type();
        if kind.is_pax_global_extensions() || kind.as_byte() == b'V' {
            return Ok(()); // global PAX records and GNU volume labels carry no file
        }
        let path = self.checked_path(&entry.path_bytes(), name, None)?;
        let meta = self.meta(entry, name)?;
        let is_root = path.as_os_str().is_empty();
        if is_root && kind != EntryType::Directory {
            crate::user_bail!(
                "{}: entry {name} names the image root but is not a directory",
                self.tarball.display()
            );
        }
        if kind != EntryType::Directory {
            // Whatever directory was recorded here is being replaced.
            self.dirs.remove(&path);
        }
        let done = match kind {
            EntryType::Directory => self.directory(&path, &meta),
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => self.file(&path, &meta, entry),
            EntryType::Symlink => self.symlink(&path, &meta, entry),
            EntryType::Link => self.hard_link(&path, entry, name),
            EntryType::Char | EntryType::Block | EntryType::Fifo => self.node(&path, &meta, entry, kind),
            other => {
                tracing::warn!(
                    "{}: skipping {name}: unsupported entry type {other:?}",
                    self.tarball.display()
                );
                return Ok(());
            }
        };
        done.with_context(|| format!("unpacking {name} from {}", self.tarball.display()))?;
        self.stats.entries += 1;
        Ok(())
    }

    /// The entry's path (or a hard link's target) as an image path relative to the
    /// root; empty for the root itself (`./`). A leading `/` is dropped, as GNU tar
    /// does; any `..` component is refused (a root tarball has no use for one, and it
    /// is how archives aim outside the directory they are unpacked in).
    fn checked_path(&self, raw: &[u8], name: &str, link_of: Option<&str>) -> Result<PathBuf> {
        let mut path = PathBuf::new();
        for comp in raw.split(|b| *b == b'/') {
            match comp {
                b"" | b"." => {}
                b".." => {
                    let what = match link_of {
                        Some(entry) => format!("hard link {entry} -> {name}"),
                        None => format!("entry {name}"),
                    };
                    crate::user_bail!(
                        "{}: refusing {what}: a `..` component could point outside the image root",
                        self.tarball.display()
                    );
                }
                c => path.push(OsStr::from_bytes(c)),
            }
        }
        Ok(path)
    }

    fn meta<R: Read>(&mut self, entry: &mut tar::Entry<R>, name: &str) -> Result<Meta> {
        let bad = |e: io::Error| corrupt(self.tarball, &format!("reading the header of {name}"), e);
        let header = entry.header();
        let id = |v: u64, what: &str| {
            u32::try_from(v).map_err(|_| {
                corrupt(
                    self.tarball,
                    &format!("reading the header of {name}"),
                    format!("{what} {v} out of range"),
                )
            })
        };
        let mode = header.mode().map_err(bad)? & 0o7777;
        let uid = id(header.uid().map_err(bad)?, "uid")?;
        let gid = id(header.gid().map_err(bad)?, "gid")?;
        let mut mtime = i64::try_from(header.mtime().map_err(bad)?).unwrap_or(i64::MAX);
        let mut xattrs = Vec::new();
        let (mut acl, mut libarchive) = (false, false);
        if let Some(records) = entry.pax_extensions().map_err(bad)? {
            for record in records {
                let record = record.map_err(bad)?;
                let Ok(key) = record.key() else { continue };
                if let Some(attr) = key.strip_prefix("SCHILY.xattr.") {
                    xattrs.push((attr.to_string(), record.value_bytes().to_vec()));
                } else if key == "mtime" {
                    // "1700000000.123456789": whole seconds are what kiln keeps.
                    let v = record.value().unwrap_or("");
                    if let Ok(t) = v.split('.').next().unwrap_or("").parse::<i64>() {
                        mtime = t;
                    }
                } else if key.starts_with("SCHILY.acl.") {
                    acl = true;
                } else if key.starts_with("LIBARCHIVE.xattr.") {
                    libarchive = true;
                }
            }
        }
        if acl && !self.warned_acl {
            self.warned_acl = true;
            tracing::warn!(
                "{} has POSIX ACLs (first on {name}); kiln does not restore them",
                self.tarball.display()
            );
        }
        if libarchive && xattrs.is_empty() && !self.warned_libarchive {
            self.warned_libarchive = true;
            tracing::warn!(
                "{} stores xattrs only as LIBARCHIVE.xattr records (first on {name}); kiln restores SCHILY.xattr records only",
                self.tarball.display()
            );
        }
        Ok(Meta {
            mode,
            uid,
            gid,
            mtime,
            xattrs,
        })
    }

    /// Run `op`; if it failed because a parent directory is missing, create the parents
    /// (mode 0755, as tar does for directories the archive does not list) and retry.
    fn with_parents<T>(&self, path: &Path, op: impl Fn() -> Result<T>) -> Result<T> {
        match op() {
            Err(e) if is_not_found(&e) => {
                let parent = path.parent().unwrap_or(Path::new(""));
                if parent.as_os_str().is_empty() {
                    return Err(e);
                }
                self.root.create_dir_all(parent, 0o755)?;
                op()
            }
            other => other,
        }
    }

    fn directory(&mut self, path: &Path, meta: &Meta) -> Result<()> {
        let root = self.root;
        if !path.as_os_str().is_empty() {
            // Created owner-only for now; the real mode comes in `finish`.
            match root.lstat(path)? {
                Some(m) if m.is_dir() => {}
                Some(_) => {
                    // A file or symlink is in the way: replace it, as GNU tar does.
                    root.remove_file(path)?;
                    root.create_dir(path, 0o700)?;
                }
                None => self.with_parents(path, || root.create_dir(path, 0o700))?,
            }
        }
        if self.same_owner {
            root.set_owner(path, meta.uid, meta.gid)?;
        }
        for (name, value) in &meta.xattrs {
            root.set_xattr(path, name, value)?;
        }
        self.dirs.insert(path.to_path_buf(), (meta.mode, meta.mtime));
        Ok(())
    }

    fn file<R: Read>(&mut self, path: &Path, meta: &Meta, entry: &mut tar::Entry<R>) -> Result<()> {
        let root = self.root;
        let mut file = self.with_parents(path, || root.create_file(path, 0o600))?;
        let size = entry.size();
        let mut written = 0u64;
        loop {
            let n = match entry.read(&mut self.buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(corrupt_data(e)),
            };
            file.write_all(&self.buf[..n])
                .with_context(|| format!("writing {}", root.describe(path)))?;
            written += n as u64;
        }
        if written != size {
            return Err(corrupt_data(format!(
                "it ends after {written} of the entry's {size} bytes"
            )));
        }
        self.stats.bytes += written;
        // On the open descriptor: no path is resolved again. Owner before mode (chown
        // clears setuid/setgid), xattrs after both (chown drops security.capability),
        // mtime last (writes change it).
        let at = |what: &str| format!("{what} {}", root.describe(path));
        if self.same_owner {
            nix::unistd::fchown(&file, Some(Uid::from_raw(meta.uid)), Some(Gid::from_raw(meta.gid)))
                .map_err(io::Error::from)
                .with_context(|| at("changing owner of"))?;
        }
        nix::sys::stat::fchmod(&file, Mode::from_bits_truncate(meta.mode))
            .map_err(io::Error::from)
            .with_context(|| at("changing mode of"))?;
        for (attr, value) in &meta.xattrs {
            set_xattr_fd(&file, attr, value).with_context(|| at(&format!("setting xattr {attr} on")))?;
        }
        let t = TimeSpec::new(meta.mtime, 0);
        nix::sys::stat::futimens(&file, &t, &t)
            .map_err(io::Error::from)
            .with_context(|| at("setting times of"))?;
        Ok(())
    }

    fn symlink<R: Read>(&mut self, path: &Path, meta: &Meta, entry: &mut tar::Entry<R>) -> Result<()> {
        let root = self.root;
        let target = entry
            .link_name_bytes()
            .ok_or_else(|| corrupt_data("a symlink without a target"))?
            .into_owned();
        // The target is stored verbatim, even if absolute or full of `..`: it is only
        // data here. Every later resolution of it, by kiln through RootDir or by the
        // image itself inside its chroot, is confined to the root (RESOLVE_IN_ROOT).
        let target = Path::new(OsStr::from_bytes(&target));
        self.with_parents(path, || root.symlink(target, path))?;
        if self.same_owner {
            root.set_owner(path, meta.uid, meta.gid)?;
        }
        root.set_times(path, meta.mtime)
    }

    fn hard_link<R: Read>(&mut self, path: &Path, entry: &mut tar::Entry<R>, name: &str) -> Result<()> {
        let root = self.root;
        let raw = entry
            .link_name_bytes()
            .ok_or_else(|| corrupt_data("a hard link without a target"))?
            .into_owned();
        let target = self.checked_path(&raw, &String::from_utf8_lossy(&raw), Some(name))?;
        if target.as_os_str().is_empty() {
            crate::user_bail!("{}: hard link {name} points at the image root", self.tarball.display());
        }
        // A hard link shares the inode, and so the metadata, of its target.
        self.with_parents(path, || root.hard_link(&target, path))
    }

    fn node<R: Read>(&mut self, path: &Path, meta: &Meta, entry: &mut tar::Entry<R>, kind: EntryType) -> Result<()> {
        let root = self.root;
        let header = entry.header();
        let dev = |h: &tar::Header| -> io::Result<u64> {
            let major = h.device_major()?.unwrap_or(0);
            let minor = h.device_minor()?.unwrap_or(0);
            Ok(nix::sys::stat::makedev(major.into(), minor.into()))
        };
        let (kind, dev) = match kind {
            EntryType::Char => (NodeKind::Char, dev(header)?),
            EntryType::Block => (NodeKind::Block, dev(header)?),
            _ => (NodeKind::Fifo, 0),
        };
        self.with_parents(path, || root.mknod(path, kind, meta.mode, dev))?;
        if self.same_owner {
            // chown clears setuid/setgid only on regular files; the mode from mknod stays.
            root.set_owner(path, meta.uid, meta.gid)?;
        }
        for (name, value) in &meta.xattrs {
            root.set_xattr(path, name, value)?; // skipped on device nodes
        }
        root.set_times(path, meta.mtime)
    }

    /// Apply directory modes and mtimes, deepest first.
    fn finish(self) -> Result<UnpackStats> {
        for (path, (mode, mtime)) in self.dirs.iter().rev() {
            self.root.set_mode(path, *mode)?;
            self.root.set_times(path, *mtime)?;
        }
        Ok(self.stats)
    }
}

/// Whether `err` is, at bottom, "no such file or directory".
fn is_not_found(err: &anyhow::Error) -> bool {
    err.chain().any(|c| {
        c.downcast_ref::<io::Error>()
            .is_some_and(|e| e.kind() == io::ErrorKind::NotFound)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::rootdir::testutil::*;
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    use tar::{Builder, Header};

    const T0: u64 = 1_650_000_000;

    fn header(kind: EntryType, mode: u32, size: u64) -> Header {
        let mut h = Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(T0);
        h
    }

    fn add_dir(b: &mut Builder<Vec<u8>>, path: &str, mode: u32) {
        let mut h = header(EntryType::Directory, mode, 0);
        b.append_data(&mut h, path, io::empty()).unwrap();
    }

    fn add_file(b: &mut Builder<Vec<u8>>, path: &str, mode: u32, data: &[u8]) {
        let mut h = header(EntryType::Regular, mode, data.len() as u64);
        b.append_data(&mut h, path, data).unwrap();
    }

    fn add_link(b: &mut Builder<Vec<u8>>, kind: EntryType, path: &str, target: &str) {
        let mut h = header(kind, 0o777, 0);
        b.append_link(&mut h, path, target).unwrap();
    }

    /// An entry whose name is written raw, bypassing the builder's own `..` checks.
    fn add_raw(b: &mut Builder<Vec<u8>>, kind: EntryType, name: &[u8], link: &[u8], data: &[u8]) {
        let mut h = header(kind, 0o644, data.len() as u64);
        h.as_old_mut().name[..name.len()].copy_from_slice(name);
        h.as_old_mut().linkname[..link.len()].copy_from_slice(link);
        h.set_cksum();
        b.append(&h, data).unwrap();
    }

    fn xz(data: &[u8]) -> Vec<u8> {
        let mut e = xz2::write::XzEncoder::new(Vec::new(), 6);
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    /// A tempdir with an empty image root in it.
    fn new_root() -> (tempfile::TempDir, PathBuf, RootDir) {
        let tmp = tempfile::tempdir().unwrap();
        let root_path = tmp.path().join("root");
        std::fs::create_dir(&root_path).unwrap();
        let root = RootDir::open(&root_path).unwrap();
        (tmp, root_path, root)
    }

    fn unpack_bytes(tmp: &Path, name: &str, bytes: &[u8], root: &RootDir) -> Result<UnpackStats> {
        let tarball = tmp.join(name);
        std::fs::write(&tarball, bytes).unwrap();
        unpack_tarball(&tarball, root, None)
    }

    fn user_xattrs_supported(dir: &Path) -> bool {
        let probe = dir.join(".xattr-probe");
        std::fs::write(&probe, b"").unwrap();
        let ok = set_xattr_fd(File::open(&probe).unwrap(), "user.probe", b"1").is_ok();
        std::fs::remove_file(&probe).unwrap();
        ok
    }

    fn get_xattr(p: &Path, name: &str) -> Option<Vec<u8>> {
        let p = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
        let n = std::ffi::CString::new(name).unwrap();
        let mut buf = [0u8; 256];
        // SAFETY: valid C strings and buffer.
        let r = unsafe { libc::lgetxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        (r >= 0).then(|| buf[..r as usize].to_vec())
    }

    /// The shape of an Ubuntu root tarball, in miniature.
    fn sample(with_xattrs: bool) -> Vec<u8> {
        let mut b = Builder::new(Vec::new());
        add_dir(&mut b, "./", 0o755);
        add_dir(&mut b, "./usr/", 0o755);
        add_dir(&mut b, "./usr/bin/", 0o755);
        add_link(&mut b, EntryType::Symlink, "./bin", "usr/bin");
        add_file(&mut b, "./usr/bin/sudo", 0o4755, b"#!sudo\n");
        add_file(&mut b, "./usr/bin/wall", 0o2755, b"#!wall\n");
        if with_xattrs {
            b.append_pax_extensions([("SCHILY.xattr.user.kiln", &b"hello\0bin"[..])])
                .unwrap();
        }
        add_file(&mut b, "./usr/bin/ping", 0o755, b"#!ping\n");
        add_link(&mut b, EntryType::Link, "./usr/bin/ping4", "./usr/bin/ping");
        add_dir(&mut b, "./tmp/", 0o1777);
        add_dir(&mut b, "./ro/", 0o555);
        add_file(&mut b, "./ro/inside", 0o444, b"in a read-only dir\n");
        let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        add_file(&mut b, "./usr/big.bin", 0o644, &big);
        let long = format!("./usr/{}/file", "d".repeat(150));
        add_file(&mut b, &long, 0o600, b"long name\n"); // GNU long name; parent not listed
        b.append_pax_extensions([("mtime", &b"1234567890.5"[..])]).unwrap();
        add_file(&mut b, "./paxtime", 0o644, b"");
        let mut fifo = header(EntryType::Fifo, 0o620, 0);
        b.append_data(&mut fifo, "./run-fifo", io::empty()).unwrap();
        b.into_inner().unwrap()
    }

    fn check_sample(root_path: &Path, stats: UnpackStats, with_xattrs: bool) {
        let meta = |p: &str| std::fs::symlink_metadata(root_path.join(p)).unwrap();
        assert_eq!(stats.entries, 15);
        assert_eq!(stats.bytes, 7 * 3 + 19 + 3_000_000 + 10);
        assert_eq!(meta("").mode() & 0o7777, 0o755);
        assert_eq!(meta("").mtime(), T0 as i64);
        assert_eq!(std::fs::read_link(root_path.join("bin")).unwrap(), Path::new("usr/bin"));
        assert_eq!(meta("usr/bin/sudo").mode() & 0o7777, 0o4755);
        assert_eq!(meta("usr/bin/wall").mode() & 0o7777, 0o2755);
        assert_eq!(meta("usr/bin/sudo").mtime(), T0 as i64);
        assert_eq!(meta("usr/bin/ping").ino(), meta("usr/bin/ping4").ino());
        assert_eq!(meta("usr/bin/ping").nlink(), 2);
        assert_eq!(meta("tmp").mode() & 0o7777, 0o1777);
        assert_eq!(meta("ro").mode() & 0o7777, 0o555);
        assert_eq!(
            meta("ro").mtime(),
            T0 as i64,
            "directory mtime applied after its contents"
        );
        assert_eq!(
            std::fs::read(root_path.join("ro/inside")).unwrap(),
            b"in a read-only dir\n"
        );
        assert_eq!(meta("usr/big.bin").len(), 3_000_000);
        let long = format!("usr/{}/file", "d".repeat(150));
        assert_eq!(std::fs::read(root_path.join(&long)).unwrap(), b"long name\n");
        assert_eq!(meta(&format!("usr/{}", "d".repeat(150))).mode() & 0o7777, 0o755);
        assert_eq!(meta("paxtime").mtime(), 1234567890);
        assert!(meta("run-fifo").file_type().is_fifo());
        assert_eq!(meta("run-fifo").mode() & 0o7777, 0o620);
        if with_xattrs {
            assert_eq!(
                get_xattr(&root_path.join("usr/bin/ping"), "user.kiln").unwrap(),
                b"hello\0bin"
            );
            assert_eq!(
                get_xattr(&root_path.join("usr/bin/ping4"), "user.kiln").unwrap(),
                b"hello\0bin"
            );
            assert_eq!(get_xattr(&root_path.join("usr/bin/sudo"), "user.kiln"), None);
        }
    }

    #[test]
    fn plain_xz_and_gzip() {
        let probe = tempfile::tempdir().unwrap();
        let with_xattrs = user_xattrs_supported(probe.path());
        if !with_xattrs {
            eprintln!("user xattrs unsupported here: not checking them");
        }
        let tar = sample(with_xattrs);
        for (name, bytes) in [
            ("root.tar", tar.clone()),
            ("root.tar.xz", xz(&tar)),
            ("root.tgz", gzip(&tar)),
        ] {
            let (tmp, root_path, root) = new_root();
            let stats = unpack_bytes(tmp.path(), name, &bytes, &root).unwrap_or_else(|e| panic!("{name}: {e:#}"));
            check_sample(&root_path, stats, with_xattrs);
        }
    }

    #[test]
    fn decompress_to_cache_gives_the_plain_tar_and_leaves_nothing_on_corruption() {
        let tmp = tempfile::tempdir().unwrap();
        let tar = sample(false);
        for (name, bytes) in [("root.tar.xz", xz(&tar)), ("root.tar.gz", gzip(&tar))] {
            let src = tmp.path().join(name);
            std::fs::write(&src, &bytes).unwrap();
            let dest = tmp.path().join(format!("{name}.cached.tar"));
            assert_eq!(decompress_to(&src, &dest).unwrap(), tar.len() as u64);
            assert_eq!(std::fs::read(&dest).unwrap(), tar, "{name}");
            // Truncated: a user error naming the tarball; no cache entry, no partial.
            std::fs::write(&src, &bytes[..bytes.len() - 40]).unwrap();
            let dest = tmp.path().join(format!("{name}.truncated.tar"));
            let e = decompress_to(&src, &dest).unwrap_err();
            assert_eq!(crate::error::exit_code(&e), 2, "{e:#}");
            assert!(format!("{e:#}").contains("truncated or corrupt"), "{e:#}");
            assert!(format!("{e:#}").contains(name), "{e:#}");
            assert!(!dest.exists() && !dest.with_extension("tar.partial").exists());
        }
        // Not a tar inside: refused before anything is written.
        let src = tmp.path().join("notatar.tar.xz");
        std::fs::write(&src, xz(&[7u8; 4096])).unwrap();
        let dest = tmp.path().join("notatar.tar");
        let e = decompress_to(&src, &dest).unwrap_err();
        assert!(format!("{e:#}").contains("not a tar archive"), "{e:#}");
        assert!(!dest.exists());
    }

    #[test]
    fn progress_counts_compressed_bytes() {
        let (tmp, _root_path, root) = new_root();
        let bytes = xz(&sample(false));
        let tarball = tmp.path().join("root.tar.xz");
        std::fs::write(&tarball, &bytes).unwrap();
        let pb = ProgressBar::hidden();
        unpack_tarball(&tarball, &root, Some(&pb)).unwrap();
        assert_eq!(pb.position(), bytes.len() as u64);
    }

    #[test]
    fn symlink_to_host_then_file_below_it_lands_inside_root() {
        let (tmp, root_path, root) = new_root();
        let (canary, _secret) = make_canary(tmp.path());
        let canary = canary.canonicalize().unwrap();
        let before = snapshot(&canary);
        let canary_str = canary.to_str().unwrap();

        // The canary's path exists inside the image: the file lands there.
        let mut b = Builder::new(Vec::new());
        add_dir(&mut b, &format!("{}/", &canary_str[1..]), 0o755);
        add_link(&mut b, EntryType::Symlink, "etc", canary_str);
        add_link(
            &mut b,
            EntryType::Symlink,
            "up",
            &format!("{}{canary_str}", "../".repeat(10)),
        );
        add_file(&mut b, "etc/shadow", 0o600, b"owned\n");
        add_file(&mut b, "up/new", 0o600, b"new\n");
        add_link(&mut b, EntryType::Link, "etc/hard", "up/new");
        add_link(&mut b, EntryType::Symlink, "etc/shadow", "/replaced");
        let bytes = b.into_inner().unwrap();
        unpack_bytes(tmp.path(), "a.tar", &bytes, &root).unwrap();
        let inside = root_path.join(canary.strip_prefix("/").unwrap());
        assert_eq!(
            std::fs::read_link(inside.join("shadow")).unwrap(),
            Path::new("/replaced")
        );
        assert_eq!(std::fs::read(inside.join("new")).unwrap(), b"new\n");
        assert_eq!(std::fs::read(inside.join("hard")).unwrap(), b"new\n");
        assert_eq!(snapshot(&canary), before);

        // Not there: the unpack fails, and still nothing reaches the host.
        let (tmp2, _root2, root2) = new_root();
        let mut b = Builder::new(Vec::new());
        add_link(&mut b, EntryType::Symlink, "etc", canary_str);
        add_file(&mut b, "etc/shadow", 0o600, b"owned\n");
        let bytes = b.into_inner().unwrap();
        let err = unpack_bytes(tmp2.path(), "b.tar", &bytes, &root2).unwrap_err();
        assert!(format!("{err:#}").contains("unpacking etc/shadow from"), "{err:#}");
        assert_eq!(snapshot(&canary), before);
    }

    #[test]
    fn dotdot_entries_are_refused() {
        let cases: [(&str, EntryType, &[u8], &[u8]); 5] = [
            ("parent", EntryType::Regular, b"../escape", b""),
            ("absolute", EntryType::Regular, b"/../escape", b""),
            ("nested", EntryType::Regular, b"./a/../../escape", b""),
            ("dir", EntryType::Directory, b"../escape/", b""),
            ("hard link", EntryType::Link, b"a", b"../escape"),
        ];
        for (what, kind, name, link) in cases {
            let (tmp, root_path, root) = new_root();
            std::fs::write(tmp.path().join("escape"), b"host file\n").unwrap();
            let mut b = Builder::new(Vec::new());
            add_dir(&mut b, "a/", 0o755);
            add_raw(
                &mut b,
                kind,
                name,
                link,
                if kind == EntryType::Regular { b"pwned\n" } else { b"" },
            );
            let bytes = b.into_inner().unwrap();
            let err = unpack_bytes(tmp.path(), "x.tar", &bytes, &root).unwrap_err();
            let msg = format!("{err:#}");
            assert_eq!(crate::error::exit_code(&err), 2, "{what}: {msg}");
            assert!(msg.contains("refusing") && msg.contains("escape"), "{what}: {msg}");
            assert_eq!(
                std::fs::read(tmp.path().join("escape")).unwrap(),
                b"host file\n",
                "{what}"
            );
            assert_eq!(
                std::fs::read_dir(&root_path).unwrap().count(),
                1,
                "{what}: only a/ was unpacked"
            );
        }
    }

    #[test]
    fn truncated_archives_are_clear_errors() {
        let mut b = Builder::new(Vec::new());
        add_dir(&mut b, "./", 0o755);
        let noise: Vec<u8> = (0..2_000_000u64)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        add_file(&mut b, "./big.bin", 0o644, &noise);
        let tar = b.into_inner().unwrap();

        let compressed = xz(&tar);
        let (tmp, _root_path, root) = new_root();
        let err = unpack_bytes(tmp.path(), "cut.tar.xz", &compressed[..compressed.len() / 2], &root).unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.starts_with("unpacking big.bin from ")
                && msg.contains("cut.tar.xz: the archive is truncated or corrupt"),
            "{msg}"
        );
        assert_eq!(crate::error::exit_code(&err), 2);

        let (tmp, _root_path, root) = new_root();
        let err = unpack_bytes(tmp.path(), "cut.tar", &tar[..tar.len() / 2], &root).unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains("cut.tar: the archive is truncated or corrupt: it ends after"),
            "{msg}"
        );
        assert_eq!(crate::error::exit_code(&err), 2);

        // Cut inside the second header.
        let (tmp, _root_path, root) = new_root();
        let err = unpack_bytes(tmp.path(), "cut2.tar", &tar[..512 + 100], &root).unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains("cut2.tar is truncated or corrupt (reading the entry after ./)"),
            "{msg}"
        );

        // Corrupt in the middle of the xz stream.
        let mut bad = compressed.clone();
        let mid = bad.len() / 2;
        bad[mid] ^= 0xff;
        let (tmp, _root_path, root) = new_root();
        let err = unpack_bytes(tmp.path(), "bad.tar.xz", &bad, &root).unwrap_err();
        assert!(
            format!("{err:#}").contains("bad.tar.xz: the archive is truncated or corrupt"),
            "{err:#}"
        );
    }

    #[test]
    fn non_tar_files_are_user_errors() {
        let (tmp, _root_path, root) = new_root();
        for (name, bytes) in [
            ("notes.txt", b"just some text\n".repeat(100)),
            ("empty", Vec::new()),
            ("text.xz", xz(&b"not a tar\n".repeat(100))),
            ("text.gz", gzip(b"not a tar either\n")),
        ] {
            let err = unpack_bytes(tmp.path(), name, &bytes, &root).unwrap_err();
            let msg = format!("{err:#}");
            assert!(
                msg.contains(&format!("{name} is not a tar archive (.tar, .tar.xz, .tar.gz)")),
                "{msg}"
            );
            assert_eq!(crate::error::exit_code(&err), 2);
        }
        let err = unpack_bytes(tmp.path(), "x.tar.zst", &[0x28, 0xb5, 0x2f, 0xfd, 0, 0], &root).unwrap_err();
        assert!(format!("{err:#}").contains("zstd"), "{err:#}");
        let err = unpack_tarball(&tmp.path().join("missing.tar"), &root, None).unwrap_err();
        assert!(format!("{err:#}").contains("missing.tar"), "{err:#}");
        assert_eq!(std::fs::read_dir(root.host_path()).unwrap().count(), 0);
    }

    #[test]
    fn replaces_what_is_in_the_way() {
        let (tmp, root_path, root) = new_root();
        let mut b = Builder::new(Vec::new());
        add_file(&mut b, "x", 0o644, b"file\n");
        add_link(&mut b, EntryType::Symlink, "x", "target"); // file -> symlink
        add_file(&mut b, "y", 0o644, b"y\n");
        add_dir(&mut b, "y/", 0o750); // file -> directory
        add_file(&mut b, "y/z", 0o644, b"z\n");
        add_dir(&mut b, "d/", 0o755);
        add_file(&mut b, "d", 0o644, b"d\n"); // a directory in the way of a file: error
        let bytes = b.into_inner().unwrap();
        let err = unpack_bytes(tmp.path(), "w.tar", &bytes, &root).unwrap_err();
        assert!(format!("{err:#}").contains("unpacking d from"), "{err:#}");
        assert_eq!(std::fs::read_link(root_path.join("x")).unwrap(), Path::new("target"));
        assert_eq!(std::fs::read(root_path.join("y/z")).unwrap(), b"z\n");
    }

    #[test]
    fn owners_devices_and_capabilities_as_root() {
        require_root("ownership, device nodes, security.* xattrs");
        // VFS_CAP_REVISION_2 | VFS_CAP_FLAGS_EFFECTIVE, permitted = CAP_NET_RAW (13).
        let mut cap = Vec::new();
        for word in [0x0200_0001u32, 1 << 13, 0, 0, 0] {
            cap.extend_from_slice(&word.to_le_bytes());
        }
        let mut b = Builder::new(Vec::new());
        let mut h = header(EntryType::Directory, 0o755, 0);
        h.set_uid(0);
        b.append_data(&mut h, "./", io::empty()).unwrap();
        let mut h = header(EntryType::Directory, 0o2775, 0);
        h.set_uid(4242);
        h.set_gid(4343);
        h.set_username("root").unwrap(); // names are never used to map ids
        h.set_groupname("root").unwrap();
        b.append_data(&mut h, "./home/", io::empty()).unwrap();
        let mut h = header(EntryType::Regular, 0o6755, 5);
        h.set_uid(4242);
        h.set_gid(4343);
        h.set_username("nosuchuser").unwrap();
        b.append_data(&mut h, "./home/suid", &b"suid\n"[..]).unwrap();
        b.append_pax_extensions([("SCHILY.xattr.security.capability", &cap[..])])
            .unwrap();
        add_file(&mut b, "./ping", 0o755, b"ping\n");
        let mut h = header(EntryType::Char, 0o666, 0);
        h.set_device_major(1).unwrap();
        h.set_device_minor(3).unwrap();
        b.append_data(&mut h, "./dev/null", io::empty()).unwrap();
        let mut h = header(EntryType::Block, 0o660, 0);
        h.set_device_major(7).unwrap();
        h.set_device_minor(0).unwrap();
        h.set_gid(6);
        b.append_data(&mut h, "./dev/loop0", io::empty()).unwrap();
        let mut h = header(EntryType::Symlink, 0o777, 0);
        h.set_uid(4242);
        b.append_link(&mut h, "./home/link", "/etc/shadow").unwrap();
        let bytes = b.into_inner().unwrap();

        let (tmp, root_path, root) = new_root();
        unpack_bytes(tmp.path(), "r.tar", &bytes, &root).unwrap();
        let meta = |p: &str| std::fs::symlink_metadata(root_path.join(p)).unwrap();
        let home = meta("home");
        assert_eq!((home.uid(), home.gid(), home.mode() & 0o7777), (4242, 4343, 0o2775));
        let suid = meta("home/suid");
        assert_eq!((suid.uid(), suid.gid(), suid.mode() & 0o7777), (4242, 4343, 0o6755));
        assert_eq!(get_xattr(&root_path.join("ping"), "security.capability").unwrap(), cap);
        let null = meta("dev/null");
        assert!(null.file_type().is_char_device());
        assert_eq!(
            (null.rdev(), null.mode() & 0o7777),
            (nix::sys::stat::makedev(1, 3), 0o666)
        );
        let loop0 = meta("dev/loop0");
        assert!(loop0.file_type().is_block_device());
        assert_eq!(
            (loop0.rdev(), loop0.gid(), loop0.mode() & 0o7777),
            (nix::sys::stat::makedev(7, 0), 6, 0o660)
        );
        assert_eq!(meta("home/link").uid(), 4242);
    }
}
