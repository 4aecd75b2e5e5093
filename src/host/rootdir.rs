//! Confined access to an image's root filesystem from the host.
//!
//! kiln runs as root and writes into an image root that is mounted at some host
//! directory. The image is data, not code kiln trusts: it may contain symlinks such as
//! `/etc/foo -> /etc/shadow` or `etc -> ../../../../etc`. Followed naively from the host,
//! such a link would redirect a write, a chmod or a delete onto the host's own files.
//! [`RootDir`] is the one way kiln's stages touch an image root, and it guarantees that
//! never happens:
//!
//! * **Every path resolution is confined.** Paths are resolved by `openat2(2)` with
//!   `RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS`, relative to an `O_PATH` descriptor on
//!   the root. The kernel treats that descriptor as `/` for the whole walk, atomically:
//!   absolute symlinks and `..` resolve inside the image, exactly as they would for a
//!   process chrooted into it, and `/proc/*/fd`-style magic links are refused.
//! * **The final component is never followed by a change.** Operations that create,
//!   change or remove an entry resolve only its *parent directory* that way, then act on
//!   the last component with the `*at` syscalls and `AT_SYMLINK_NOFOLLOW` / `O_NOFOLLOW`
//!   (or with calls that never follow, like `unlinkat`, `renameat`, `mkdirat`). So a
//!   symlink sitting where a file is written is *replaced* by the new file, as `tar` and
//!   `cp` do, rather than written through. [`RootDir::set_owner`] and
//!   [`RootDir::set_times`] change a symlink itself; [`RootDir::set_mode`] refuses a
//!   symlink and [`RootDir::set_xattr`] skips it. No operation goes through
//!   `/proc/self/fd`.
//! * **Reads follow symlinks, inside the root only.** [`RootDir::read`],
//!   [`RootDir::read_to_string`] and [`RootDir::read_dir`] resolve the whole path in the
//!   root (so `/etc/resolv.conf -> ../run/...` reads the image's file), and only ever
//!   open a regular file or a directory, never a device node or a FIFO.
//! * **Deletion stays on one mount.** [`RootDir::remove_dir_all`] walks with `O_NOFOLLOW`
//!   directory descriptors, never follows a symlink, and refuses to descend into a
//!   different mount (compared by mount id and `st_dev`), so a host directory bind-mounted
//!   into the image (`/dev`, an apt cache) is never emptied through it.
//!
//! Paths given to the API are image paths: `"/etc/fstab"` and `"etc/fstab"` are the same
//! entry. `..` may appear inside a path and resolves within the root; a path may not
//! *end* in `..`. The empty path and `"/"` name the root itself.
//!
//! Not covered: mount points inside the image *are* crossed while resolving a path, so
//! writing to `/proc/...` of an image with the host's /proc mounted reaches the host's
//! /proc; stages write before mounting API filesystems. The guarantee is against symlinks
//! and `..` in the image, not against a concurrent process renaming directories out of
//! the root (kiln never runs one).
//!
//! Requires Linux ≥ 5.6 (`openat2`). `set_mode` uses `fchmodat2` (Linux ≥ 6.6) when
//! present; see [`RootDir::set_mode`] for the fallback.

use anyhow::{Context, Result};
use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{FchmodatFlags, FileStat, Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;
use nix::unistd::{Gid, Uid, UnlinkatFlags};
use std::ffi::{CStr, CString, OsStr, OsString};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// How often `openat2` is retried when it reports `EAGAIN` (a concurrent rename or mount
/// raced with the resolution; the kernel asks the caller to retry).
const OPENAT2_RETRIES: usize = 64;

/// An image root directory on the host, and every filesystem operation kiln performs in
/// it. See the module documentation for the guarantee.
#[derive(Debug)]
pub struct RootDir {
    /// `O_PATH | O_DIRECTORY` descriptor on the root; the anchor of every resolution.
    fd: OwnedFd,
    /// Where the root is on the host, for messages only. Never used to reach a file.
    host: PathBuf,
}

/// The kind of special file [`RootDir::mknod`] creates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeKind {
    Char,
    Block,
    Fifo,
}

/// What kind of entry a path names (not following a final symlink). Mirrors
/// `std::fs::FileType`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileType {
    File,
    Dir,
    Symlink,
    CharDevice,
    BlockDevice,
    Fifo,
    Socket,
}

impl FileType {
    pub fn is_file(self) -> bool {
        self == FileType::File
    }

    pub fn is_dir(self) -> bool {
        self == FileType::Dir
    }

    pub fn is_symlink(self) -> bool {
        self == FileType::Symlink
    }
}

/// `lstat(2)` of an entry in the image. Method names mirror `std::fs::Metadata` and
/// `std::os::unix::fs::MetadataExt`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Metadata {
    file_type: FileType,
    mode: u32,
    uid: u32,
    gid: u32,
    len: u64,
    mtime: i64,
    dev: u64,
    ino: u64,
    nlink: u64,
    rdev: u64,
}

impl Metadata {
    pub fn file_type(&self) -> FileType {
        self.file_type
    }

    pub fn is_dir(&self) -> bool {
        self.file_type.is_dir()
    }

    pub fn is_file(&self) -> bool {
        self.file_type.is_file()
    }

    pub fn is_symlink(&self) -> bool {
        self.file_type.is_symlink()
    }

    /// The whole `st_mode`, file type bits included (as `MetadataExt::mode`); the
    /// permission bits are `mode() & 0o7777`.
    pub fn mode(&self) -> u32 {
        self.mode
    }

    pub fn uid(&self) -> u32 {
        self.uid
    }

    pub fn gid(&self) -> u32 {
        self.gid
    }

    /// Size in bytes (of a symlink: the length of its target).
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    #[cfg(test)]
    /// Modification time, seconds since the epoch.
    pub fn mtime(&self) -> i64 {
        self.mtime
    }

    #[cfg(test)]
    pub fn ino(&self) -> u64 {
        self.ino
    }

    #[cfg(test)]
    pub fn nlink(&self) -> u64 {
        self.nlink
    }

    #[cfg(test)]
    /// Device number of a character or block device node.
    pub fn rdev(&self) -> u64 {
        self.rdev
    }
}

/// A resolved parent directory plus the final component, which is never followed.
/// For the root itself, `dir` is the root and `name` is `"."`.
struct Entry {
    dir: OwnedFd,
    name: CString,
}

impl Entry {
    fn is_root(&self) -> bool {
        self.name.as_bytes() == b"."
    }
}

impl RootDir {
    /// Open the image root at `host` (a host path, e.g. the loop mount point).
    ///
    /// Probes `openat2` right away, so a kernel without it fails here, clearly.
    pub fn open(host: impl AsRef<Path>) -> Result<RootDir> {
        let host = host.as_ref();
        let what = || format!("opening image root {}", host.display());
        let fd = nix::fcntl::open(
            host,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(io::Error::from)
        .with_context(what)?;
        let root = RootDir {
            fd,
            host: host.to_path_buf(),
        };
        root.resolve(&[], dir_path_flags()).with_context(what)?;
        Ok(root)
    }

    #[cfg(test)]
    /// Where the root is on the host (for messages).
    pub fn host_path(&self) -> &Path {
        &self.host
    }

    /// `"/etc/fstab in image root /tmp/x/root"`, for messages about `path`.
    pub fn describe(&self, path: impl AsRef<Path>) -> String {
        format!("{} in image root {}", show(path.as_ref()), self.host.display())
    }

    fn ctx(&self, action: &str, path: &Path) -> String {
        format!("{action} {}", self.describe(path))
    }

    // ---- directories -------------------------------------------------------------

    /// `mkdir -p`: create `path` and any missing parents with permission bits `mode`
    /// (exactly, regardless of the umask). Existing components, including symlinks that
    /// resolve (inside the root) to directories, are left as they are.
    pub fn create_dir_all(&self, path: impl AsRef<Path>, mode: u32) -> Result<()> {
        let path = path.as_ref();
        self.create_dir_all_inner(path, mode)
            .with_context(|| self.ctx("creating directory", path))
    }

    fn create_dir_all_inner(&self, path: &Path, mode: u32) -> io::Result<()> {
        let comps = components(path);
        // Fast path: it already resolves, inside the root, to a directory.
        match self.resolve(&comps, dir_path_flags()) {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            other => return other.map(drop),
        }
        for i in 0..comps.len() {
            if comps[i] == ".." {
                continue; // resolved by the kernel, inside the root, as part of the prefix
            }
            let prefix = &comps[..=i];
            match self.resolve(prefix, dir_path_flags()) {
                Ok(_) => continue,
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => return Err(e),
            }
            let dir = self.resolve(&comps[..i], dir_path_flags())?;
            let name = c_name(comps[i])?;
            match nix::sys::stat::mkdirat(&dir, name.as_c_str(), Mode::from_bits_truncate(mode & 0o7777)) {
                Ok(()) => chmod_at(&dir, &name, mode)?,
                Err(Errno::EEXIST) => {
                    // Something is there but did not resolve to a directory: a file, or a
                    // symlink that dangles inside the root.
                    if self.resolve(prefix, dir_path_flags()).is_err() {
                        return Err(io::Error::other(format!(
                            "{} exists and is not a directory (or a symlink to one inside the image)",
                            show(&join(prefix))
                        )));
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// `mkdir`: create directory `path` with permission bits `mode` (exactly, regardless
    /// of the umask). Succeeds without changes if `path` already is a directory; fails if
    /// it is anything else, including a symlink to a directory.
    pub fn create_dir(&self, path: impl AsRef<Path>, mode: u32) -> Result<()> {
        let path = path.as_ref();
        self.create_dir_inner(path, mode)
            .with_context(|| self.ctx("creating directory", path))
    }

    fn create_dir_inner(&self, path: &Path, mode: u32) -> io::Result<()> {
        let e = self.entry(path)?;
        if e.is_root() {
            return Ok(());
        }
        match nix::sys::stat::mkdirat(&e.dir, e.name.as_c_str(), Mode::from_bits_truncate(mode & 0o7777)) {
            Ok(()) => chmod_at(&e.dir, &e.name, mode),
            Err(Errno::EEXIST) => {
                let st = lstat_at(&e.dir, &e.name)?;
                if kind_of(st.st_mode) == FileType::Dir {
                    Ok(())
                } else {
                    Err(io::Error::other("it exists and is not a directory"))
                }
            }
            Err(err) => Err(err.into()),
        }
    }

    /// Names in directory `path` (without `.` and `..`), sorted. The directory is
    /// resolved in the root, following symlinks there. A name that is not UTF-8 is an
    /// error (Ubuntu images have none); [`RootDir::read_dir_os`] takes any name.
    pub fn read_dir(&self, path: impl AsRef<Path>) -> Result<Vec<String>> {
        let path = path.as_ref();
        self.read_dir_os(path)?
            .into_iter()
            .map(|n| {
                n.into_string().map_err(|n| {
                    anyhow::anyhow!(
                        "{} contains a name that is not UTF-8: {}",
                        self.describe(path),
                        n.to_string_lossy()
                    )
                })
            })
            .collect()
    }

    /// [`RootDir::read_dir`], for any name.
    pub fn read_dir_os(&self, path: impl AsRef<Path>) -> Result<Vec<OsString>> {
        let path = path.as_ref();
        (|| {
            let fd = self.resolve(&components(path), OFlag::O_RDONLY | OFlag::O_DIRECTORY)?;
            let mut names = list_names(fd)?;
            names.sort();
            Ok::<_, io::Error>(names)
        })()
        .with_context(|| self.ctx("listing", path))
    }

    // ---- regular files -------------------------------------------------------------

    /// Atomically replace (or create) `path` with `contents` and permission bits `mode`:
    /// write a temporary file in the same directory, then `renameat` it over the final
    /// name. Whatever was at `path` (file, symlink, node) is replaced, never followed; a
    /// directory there is an error. Not fsynced; see [`RootDir::write_file_synced`].
    pub fn write_file(&self, path: impl AsRef<Path>, contents: &[u8], mode: u32) -> Result<()> {
        let path = path.as_ref();
        self.write_atomic(path, contents, mode, false)
            .with_context(|| self.ctx("writing", path))
    }

    #[cfg(test)]
    /// [`RootDir::write_file`], and fsync the file and its directory before returning.
    pub fn write_file_synced(&self, path: impl AsRef<Path>, contents: &[u8], mode: u32) -> Result<()> {
        let path = path.as_ref();
        self.write_atomic(path, contents, mode, true)
            .with_context(|| self.ctx("writing", path))
    }

    fn write_atomic(&self, path: &Path, contents: &[u8], mode: u32, sync: bool) -> io::Result<()> {
        let e = self.named_entry(path)?;
        let tmp = temp_name();
        let fd = nix::fcntl::openat(
            &e.dir,
            tmp.as_c_str(),
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o600),
        )?;
        let mut file = File::from(fd);
        let written = (|| {
            file.write_all(contents)?;
            nix::sys::stat::fchmod(&file, Mode::from_bits_truncate(mode & 0o7777))?;
            if sync {
                file.sync_all()?;
            }
            nix::fcntl::renameat(&e.dir, tmp.as_c_str(), &e.dir, e.name.as_c_str())?;
            Ok::<_, io::Error>(())
        })();
        if let Err(err) = written {
            let _ = nix::unistd::unlinkat(&e.dir, tmp.as_c_str(), UnlinkatFlags::NoRemoveDir);
            return Err(err);
        }
        if sync {
            let dir = nix::fcntl::openat(
                &e.dir,
                c".",
                OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
                Mode::empty(),
            )?;
            File::from(dir).sync_all()?;
        }
        Ok(())
    }

    /// Create `path` for streaming writes, with permission bits `mode` (exactly). An
    /// existing non-directory entry at `path` (file, symlink, node) is unlinked first and
    /// never followed; the new file is opened `O_CREAT | O_EXCL | O_NOFOLLOW`.
    ///
    /// Note that writing clears setuid/setgid bits unless the writer has `CAP_FSETID`;
    /// for such modes, call [`RootDir::set_mode`] (or `fchmod`) after writing.
    pub fn create_file(&self, path: impl AsRef<Path>, mode: u32) -> Result<File> {
        let path = path.as_ref();
        (|| {
            let e = self.named_entry(path)?;
            clear_slot(&e)?;
            let fd = nix::fcntl::openat(
                &e.dir,
                e.name.as_c_str(),
                OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                Mode::from_bits_truncate(mode & 0o7777),
            )?;
            nix::sys::stat::fchmod(&fd, Mode::from_bits_truncate(mode & 0o7777))?;
            Ok::<_, io::Error>(File::from(fd))
        })()
        .with_context(|| self.ctx("creating", path))
    }

    /// Contents of regular file `path` (resolved in the root, following symlinks there).
    pub fn read(&self, path: impl AsRef<Path>) -> Result<Vec<u8>> {
        let path = path.as_ref();
        (|| {
            let mut buf = Vec::new();
            self.open_regular(path)?.read_to_end(&mut buf)?;
            Ok::<_, io::Error>(buf)
        })()
        .with_context(|| self.ctx("reading", path))
    }

    /// Contents of regular file `path` as UTF-8 (see [`RootDir::read`]).
    pub fn read_to_string(&self, path: impl AsRef<Path>) -> Result<String> {
        let path = path.as_ref();
        (|| {
            let mut buf = String::new();
            self.open_regular(path)?.read_to_string(&mut buf)?;
            Ok::<_, io::Error>(buf)
        })()
        .with_context(|| self.ctx("reading", path))
    }

    /// Open regular file `path` for streaming reads (see [`RootDir::read`]).
    pub fn open_file(&self, path: impl AsRef<Path>) -> Result<File> {
        let path = path.as_ref();
        self.open_regular(path).with_context(|| self.ctx("opening", path))
    }

    /// Open a regular file for reading. Checks the type through an `O_PATH` descriptor
    /// first, so a device node or FIFO is never opened (opening one has side effects or
    /// blocks), then checks the opened file is the same inode.
    fn open_regular(&self, path: &Path) -> io::Result<File> {
        let comps = components(path);
        let probe = nix::sys::stat::fstat(&self.resolve(&comps, OFlag::O_PATH)?)?;
        if kind_of(probe.st_mode) != FileType::File {
            return Err(io::Error::other("not a regular file"));
        }
        let fd = self.resolve(&comps, OFlag::O_RDONLY | OFlag::O_NOCTTY | OFlag::O_NONBLOCK)?;
        same_inode(&fd, &probe)?;
        Ok(File::from(fd))
    }

    /// Truncate regular file `path` to zero length. A symlink or anything but a regular
    /// file at `path` is refused, never followed.
    pub fn truncate(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        (|| {
            let e = self.named_entry(path)?;
            let st = lstat_at(&e.dir, &e.name)?;
            match kind_of(st.st_mode) {
                FileType::File => {}
                FileType::Symlink => return Err(io::Error::other("it is a symbolic link; refusing to follow it")),
                _ => return Err(io::Error::other("not a regular file")),
            }
            let fd = open_nofollow(&e, OFlag::O_WRONLY)?;
            same_inode(&fd, &st)?;
            nix::unistd::ftruncate(&fd, 0)?;
            Ok::<_, io::Error>(())
        })()
        .with_context(|| self.ctx("truncating", path))
    }

    // ---- metadata ------------------------------------------------------------------

    /// Whether anything (even a dangling symlink) exists at `path`. A missing parent
    /// directory means `false`.
    pub fn exists(&self, path: impl AsRef<Path>) -> Result<bool> {
        Ok(self.lstat(path)?.is_some())
    }

    /// Whether `path` is a directory (resolved in the root, following symlinks there);
    /// false if nothing, or something else, is there.
    pub fn is_dir(&self, path: impl AsRef<Path>) -> Result<bool> {
        let path = path.as_ref();
        match self.resolve(&components(path), OFlag::O_PATH | OFlag::O_DIRECTORY) {
            Ok(_) => Ok(true),
            Err(err) if is_absent(&err) => Ok(false),
            Err(err) => Err(err).with_context(|| self.ctx("inspecting", path)),
        }
    }

    /// `lstat` of `path`: the entry itself, not what a symlink there points to.
    pub fn symlink_metadata(&self, path: impl AsRef<Path>) -> Result<Metadata> {
        let path = path.as_ref();
        self.lstat(path)?
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))
            .with_context(|| self.ctx("inspecting", path))
    }

    /// [`RootDir::symlink_metadata`], or `None` if nothing is at `path`.
    pub fn lstat(&self, path: impl AsRef<Path>) -> Result<Option<Metadata>> {
        let path = path.as_ref();
        self.lstat_inner(path)
            .map(|st| st.map(|st| metadata(&st)))
            .with_context(|| self.ctx("inspecting", path))
    }

    fn lstat_inner(&self, path: &Path) -> io::Result<Option<FileStat>> {
        let e = match self.entry(path) {
            Ok(e) => e,
            Err(err) if is_absent(&err) => return Ok(None),
            Err(err) => return Err(err),
        };
        match lstat_at(&e.dir, &e.name) {
            Ok(st) => Ok(Some(st)),
            Err(err) if is_absent(&err) => Ok(None),
            Err(err) => Err(err),
        }
    }

    /// Target of symlink `path`, verbatim.
    pub fn read_link(&self, path: impl AsRef<Path>) -> Result<PathBuf> {
        let path = path.as_ref();
        (|| {
            let e = self.named_entry(path)?;
            Ok::<_, io::Error>(PathBuf::from(nix::fcntl::readlinkat(&e.dir, e.name.as_c_str())?))
        })()
        .with_context(|| self.ctx("reading symlink", path))
    }

    /// Change owner and group of `path` (`fchownat` with `AT_SYMLINK_NOFOLLOW`: a symlink
    /// itself is changed, never its target). Like `chown(2)`, this clears the setuid and
    /// setgid bits of a regular file, so set the mode afterwards.
    pub fn set_owner(&self, path: impl AsRef<Path>, uid: u32, gid: u32) -> Result<()> {
        let path = path.as_ref();
        (|| {
            let e = self.entry(path)?;
            nix::unistd::fchownat(
                &e.dir,
                e.name.as_c_str(),
                Some(Uid::from_raw(uid)),
                Some(Gid::from_raw(gid)),
                AtFlags::AT_SYMLINK_NOFOLLOW,
            )?;
            Ok::<_, io::Error>(())
        })()
        .with_context(|| self.ctx("changing owner of", path))
    }

    /// Set the permission bits of `path` to `mode & 0o7777` (setuid, setgid and sticky
    /// included). A symlink at `path` is refused (symlink modes mean nothing on Linux, and
    /// the caller surely meant a file): it is never followed.
    ///
    /// Uses `fchmodat2(AT_SYMLINK_NOFOLLOW)` (Linux ≥ 6.6). On older kernels a regular
    /// file, directory or FIFO is changed through a descriptor opened `O_NOFOLLOW`; a
    /// device node or socket (which cannot be opened without side effects) with
    /// `fchmodat` right after checking it is not a symlink, which would follow only if a
    /// concurrent process swapped the entry for a symlink in between.
    pub fn set_mode(&self, path: impl AsRef<Path>, mode: u32) -> Result<()> {
        let path = path.as_ref();
        (|| {
            let e = self.entry(path)?;
            chmod_at(&e.dir, &e.name, mode)
        })()
        .with_context(|| self.ctx("changing mode of", path))
    }

    /// Set the modification (and access) time of `path` to `mtime` seconds since the
    /// epoch, without following a symlink there.
    pub fn set_times(&self, path: impl AsRef<Path>, mtime: i64) -> Result<()> {
        let path = path.as_ref();
        (|| {
            let e = self.entry(path)?;
            let t = TimeSpec::new(mtime, 0);
            nix::sys::stat::utimensat(&e.dir, e.name.as_c_str(), &t, &t, UtimensatFlags::NoFollowSymlink)?;
            Ok::<_, io::Error>(())
        })()
        .with_context(|| self.ctx("setting times of", path))
    }

    /// Set extended attribute `name` (e.g. `security.capability`) on `path`, through a
    /// descriptor opened `O_NOFOLLOW`. Symlinks, device nodes and sockets are skipped
    /// (they cannot be opened safely, and Linux keeps no xattrs kiln needs on them);
    /// returns whether the attribute was set.
    pub fn set_xattr(&self, path: impl AsRef<Path>, name: &str, value: &[u8]) -> Result<bool> {
        let path = path.as_ref();
        (|| {
            let e = self.entry(path)?;
            let st = lstat_at(&e.dir, &e.name)?;
            match kind_of(st.st_mode) {
                FileType::File | FileType::Dir | FileType::Fifo => {}
                kind => {
                    tracing::debug!("not setting xattr {name} on {} ({kind:?})", self.describe(path));
                    return Ok(false);
                }
            }
            let fd = open_nofollow(&e, OFlag::O_RDONLY)?;
            same_inode(&fd, &st)?;
            set_xattr_fd(&fd, name, value)?;
            Ok::<_, io::Error>(true)
        })()
        .with_context(|| self.ctx(&format!("setting xattr {name} on"), path))
    }

    // ---- links and nodes -----------------------------------------------------------

    /// Create symlink `link` with `target` stored verbatim (it is only ever resolved
    /// inside the root by kiln, and inside the chroot by the image). An existing
    /// non-directory entry at `link` is replaced.
    pub fn symlink(&self, target: impl AsRef<Path>, link: impl AsRef<Path>) -> Result<()> {
        let (target, link) = (target.as_ref(), link.as_ref());
        (|| {
            let e = self.named_entry(link)?;
            clear_slot(&e)?;
            nix::unistd::symlinkat(target, &e.dir, e.name.as_c_str())?;
            Ok::<_, io::Error>(())
        })()
        .with_context(|| self.ctx(&format!("creating symlink -> {}:", target.display()), link))
    }

    /// Create hard link `new` to the entry `existing` (both resolved in the root; neither
    /// final component is followed, so linking a symlink links the symlink). An existing
    /// non-directory entry at `new` is replaced.
    /// Rename `from` to `to` within the image (`renameat`, never following a symlink in
    /// the last component of either; `to` must not exist).
    pub fn rename(&self, from: impl AsRef<Path>, to: impl AsRef<Path>) -> Result<()> {
        let (from, to) = (from.as_ref(), to.as_ref());
        (|| {
            let old = self.named_entry(from)?;
            let new = self.named_entry(to)?;
            if lstat_at(&new.dir, &new.name).is_ok() {
                return Err(io::Error::new(io::ErrorKind::AlreadyExists, "the target exists"));
            }
            nix::fcntl::renameat(&old.dir, old.name.as_c_str(), &new.dir, new.name.as_c_str())?;
            Ok::<_, io::Error>(())
        })()
        .with_context(|| format!("renaming {} to {}", self.describe(from), self.describe(to)))
    }

    pub fn hard_link(&self, existing: impl AsRef<Path>, new: impl AsRef<Path>) -> Result<()> {
        let (existing, new) = (existing.as_ref(), new.as_ref());
        (|| {
            let old = self.named_entry(existing)?;
            let new = self.named_entry(new)?;
            let st = lstat_at(&old.dir, &old.name)?;
            if let Ok(cur) = lstat_at(&new.dir, &new.name)
                && (cur.st_dev, cur.st_ino) == (st.st_dev, st.st_ino)
            {
                return Ok(()); // already that link (unlinking it first would lose the inode)
            }
            clear_slot(&new)?;
            nix::unistd::linkat(
                &old.dir,
                old.name.as_c_str(),
                &new.dir,
                new.name.as_c_str(),
                AtFlags::empty(),
            )?;
            Ok::<_, io::Error>(())
        })()
        .with_context(|| self.ctx(&format!("creating hard link to {}:", show(existing)), new))
    }

    /// Create a device node or FIFO at `path` with permission bits `mode` (exactly) and
    /// device number `dev` (ignored for FIFOs). An existing non-directory entry is
    /// replaced. Device nodes need `CAP_MKNOD`.
    pub fn mknod(&self, path: impl AsRef<Path>, kind: NodeKind, mode: u32, dev: u64) -> Result<()> {
        let path = path.as_ref();
        (|| {
            let e = self.named_entry(path)?;
            clear_slot(&e)?;
            let (sflag, dev) = match kind {
                NodeKind::Char => (SFlag::S_IFCHR, dev),
                NodeKind::Block => (SFlag::S_IFBLK, dev),
                NodeKind::Fifo => (SFlag::S_IFIFO, 0),
            };
            nix::sys::stat::mknodat(
                &e.dir,
                e.name.as_c_str(),
                sflag,
                Mode::from_bits_truncate(mode & 0o7777),
                dev,
            )?;
            chmod_at(&e.dir, &e.name, mode)
        })()
        .with_context(|| self.ctx("creating node", path))
    }

    // ---- removal -------------------------------------------------------------------

    /// Remove the non-directory entry at `path` (`unlinkat`, which never follows: a
    /// symlink is removed, not its target). Like `std::fs::remove_file`, an error if
    /// nothing is there (`io::ErrorKind::NotFound` in the chain).
    pub fn remove_file(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        (|| {
            let e = self.named_entry(path)?;
            match nix::unistd::unlinkat(&e.dir, e.name.as_c_str(), UnlinkatFlags::NoRemoveDir) {
                Ok(()) => Ok(()),
                Err(Errno::EISDIR) => Err(io::Error::other("it is a directory")),
                Err(err) => Err(err.into()),
            }
        })()
        .with_context(|| self.ctx("removing", path))
    }

    /// `rm -r` of `path`: a directory with everything below it, or a single entry of any
    /// other kind (a symlink is removed, never followed). Like `std::fs::remove_dir_all`,
    /// an error if nothing is there. Refuses to remove the root itself, and stops with an
    /// error at a mount point instead of deleting anything on another mount.
    pub fn remove_dir_all(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        self.remove_dir_all_inner(path)
            .with_context(|| self.ctx("removing", path))
    }

    fn remove_dir_all_inner(&self, path: &Path) -> io::Result<()> {
        let e = self.entry(path)?;
        if e.is_root() {
            return Err(io::Error::other("refusing to remove the image root itself"));
        }
        let st = lstat_at(&e.dir, &e.name)?;
        if kind_of(st.st_mode) != FileType::Dir {
            nix::unistd::unlinkat(&e.dir, e.name.as_c_str(), UnlinkatFlags::NoRemoveDir)?;
            return Ok(());
        }
        let shown = PathBuf::from(show(path));
        let dir = open_nofollow(&e, OFlag::O_RDONLY | OFlag::O_DIRECTORY)?;
        let mount = MountKey::of(&dir)?;
        if mount != MountKey::of(&e.dir)? {
            return Err(mount_point_error(&shown));
        }
        remove_tree(&dir, mount, &shown)?;
        drop(dir);
        nix::unistd::unlinkat(&e.dir, e.name.as_c_str(), UnlinkatFlags::RemoveDir)?;
        Ok(())
    }

    // ---- resolution ----------------------------------------------------------------

    /// The host path of directory `path` resolved inside the root, for use as a mount
    /// point: mount(2) follows symlinks on the host, so a mount target must never be
    /// built by joining an image path onto the root (`/var/cache/apt/archives -> /etc`
    /// would mount over the host's /etc). The directory is created if missing.
    pub fn mount_point(&self, path: impl AsRef<Path>) -> Result<PathBuf> {
        let path = path.as_ref();
        self.create_dir_all(path, 0o755)?;
        (|| {
            let fd = self.resolve(&components(path), dir_path_flags())?;
            let real = std::fs::read_link(format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&fd)))?;
            let root = std::fs::read_link(format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&self.fd)))?;
            if !real.starts_with(&root) {
                return Err(io::Error::other(format!(
                    "resolves to {} outside the image root",
                    real.display()
                )));
            }
            Ok::<_, io::Error>(real)
        })()
        .with_context(|| self.ctx("resolving mount point", path))
    }

    /// `openat2(root, comps, flags)` with `RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS`. The
    /// one place a multi-component path is resolved.
    fn resolve(&self, comps: &[&OsStr], flags: OFlag) -> io::Result<OwnedFd> {
        let rel = if comps.is_empty() {
            PathBuf::from(".")
        } else {
            join(comps)
        };
        let how = OpenHow::new()
            .flags(flags | OFlag::O_CLOEXEC)
            .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
        for _ in 0..OPENAT2_RETRIES {
            match nix::fcntl::openat2(&self.fd, rel.as_path(), how) {
                Err(Errno::EAGAIN) => continue,
                Err(Errno::ENOSYS) => {
                    return Err(io::Error::new(
                        io::ErrorKind::Unsupported,
                        "openat2(2) is not available: kiln needs Linux ≥ 5.6",
                    ));
                }
                other => return other.map_err(io::Error::from),
            }
        }
        Err(io::Error::other(
            "path resolution kept racing with concurrent renames (EAGAIN)",
        ))
    }

    /// Resolve the parent of `path` in the root; keep the final component unresolved.
    fn entry(&self, path: &Path) -> io::Result<Entry> {
        let comps = components(path);
        let Some((last, parent)) = comps.split_last() else {
            return Ok(Entry {
                dir: self.fd.try_clone()?,
                name: c".".into(),
            });
        };
        if *last == ".." {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "the path ends in `..`"));
        }
        let name = c_name(last)?;
        Ok(Entry {
            dir: self.resolve(parent, dir_path_flags())?,
            name,
        })
    }

    /// [`RootDir::entry`] for operations that need a name below the root.
    fn named_entry(&self, path: &Path) -> io::Result<Entry> {
        let e = self.entry(path)?;
        if e.is_root() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "this needs a path below the image root",
            ));
        }
        Ok(e)
    }
}

/// Lets a stage `fchdir` to the root (e.g. before `chroot(".")`). Resolving paths by
/// hand through this descriptor bypasses every guarantee above.
impl AsFd for RootDir {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Set extended attribute `name` on an open file (e.g. one from [`RootDir::create_file`]).
pub fn set_xattr_fd(fd: impl AsFd, name: &str, value: &[u8]) -> io::Result<()> {
    let name =
        CString::new(name).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "xattr name contains NUL"))?;
    // SAFETY: valid descriptor, NUL-terminated name, and a pointer/length pair for value.
    let r = unsafe {
        libc::fsetxattr(
            fd.as_fd().as_raw_fd(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

// ---- helpers -----------------------------------------------------------------------

fn dir_path_flags() -> OFlag {
    OFlag::O_PATH | OFlag::O_DIRECTORY
}

/// Split an image path into components: `/` and `.` dropped, `..` kept (the kernel
/// resolves it inside the root), empty for the root itself.
fn components(path: &Path) -> Vec<&OsStr> {
    path.components()
        .filter_map(|c| match c {
            Component::Normal(s) => Some(s),
            Component::ParentDir => Some(OsStr::new("..")),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => None,
        })
        .collect()
}

fn join(comps: &[&OsStr]) -> PathBuf {
    comps.iter().collect()
}

/// An image path as shown in messages: absolute, normalised (`etc/./x/` → `/etc/x`).
fn show(path: &Path) -> String {
    format!("/{}", join(&components(path)).display())
}

fn c_name(name: &OsStr) -> io::Result<CString> {
    CString::new(name.as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "the path contains a NUL byte"))
}

/// A fresh name for a temporary file next to its destination.
fn temp_name() -> CString {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    CString::new(format!(".kiln-tmp.{}.{n}", std::process::id())).expect("no NUL in temp name")
}

/// ENOENT or ENOTDIR: nothing is at the path.
fn is_absent(err: &io::Error) -> bool {
    matches!(err.raw_os_error(), Some(libc::ENOENT) | Some(libc::ENOTDIR))
}

fn lstat_at(dir: &OwnedFd, name: &CStr) -> io::Result<FileStat> {
    Ok(nix::sys::stat::fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW)?)
}

/// Open the final component of `e` with `O_NOFOLLOW` (and `O_NONBLOCK | O_NOCTTY`, so a
/// FIFO does not block and a terminal does not become ours).
fn open_nofollow(e: &Entry, flags: OFlag) -> io::Result<OwnedFd> {
    Ok(nix::fcntl::openat(
        &e.dir,
        e.name.as_c_str(),
        flags | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_NOCTTY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?)
}

/// Fail unless `fd` is the inode `expected` described (the entry was not swapped between
/// inspecting it and opening it).
fn same_inode(fd: &OwnedFd, expected: &FileStat) -> io::Result<()> {
    let st = nix::sys::stat::fstat(fd)?;
    if (st.st_dev, st.st_ino) == (expected.st_dev, expected.st_ino) {
        Ok(())
    } else {
        Err(io::Error::other("the entry changed while being opened; refusing"))
    }
}

/// Unlink whatever non-directory entry is at `e`, so something new can be created there.
fn clear_slot(e: &Entry) -> io::Result<()> {
    match nix::unistd::unlinkat(&e.dir, e.name.as_c_str(), UnlinkatFlags::NoRemoveDir) {
        Ok(()) | Err(Errno::ENOENT) => Ok(()),
        Err(Errno::EISDIR) => Err(io::Error::other("a directory is in the way")),
        Err(err) => Err(err.into()),
    }
}

fn symlink_mode_error() -> io::Error {
    io::Error::other("it is a symbolic link; refusing to follow it")
}

/// chmod of the final component `name` in `dir`, never following a symlink there.
fn chmod_at(dir: &OwnedFd, name: &CStr, mode: u32) -> io::Result<()> {
    let mode = mode & 0o7777;
    // SAFETY: valid descriptor and NUL-terminated name; plain integer arguments.
    let r = unsafe {
        libc::syscall(
            libc::SYS_fchmodat2,
            dir.as_raw_fd(),
            name.as_ptr(),
            mode as libc::c_uint,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if r == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::ENOSYS) => chmod_at_fallback(dir, name, mode),
        Some(libc::EOPNOTSUPP) if lstat_at(dir, name).is_ok_and(|st| kind_of(st.st_mode) == FileType::Symlink) => {
            Err(symlink_mode_error())
        }
        _ => Err(err),
    }
}

/// chmod for kernels without `fchmodat2` (see [`RootDir::set_mode`]).
fn chmod_at_fallback(dir: &OwnedFd, name: &CStr, mode: u32) -> io::Result<()> {
    let st = lstat_at(dir, name)?;
    let perm = Mode::from_bits_truncate(mode);
    match kind_of(st.st_mode) {
        FileType::Symlink => Err(symlink_mode_error()),
        FileType::File | FileType::Dir | FileType::Fifo => {
            let fd = nix::fcntl::openat(
                dir,
                name,
                OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_NOCTTY | OFlag::O_CLOEXEC,
                Mode::empty(),
            )?;
            same_inode(&fd, &st)?;
            Ok(nix::sys::stat::fchmod(&fd, perm)?)
        }
        // Opening a device node runs its driver; there is no other pre-6.6 way to chmod
        // it without following. It was just checked not to be a symlink.
        FileType::CharDevice | FileType::BlockDevice | FileType::Socket => {
            Ok(nix::sys::stat::fchmodat(dir, name, perm, FchmodatFlags::FollowSymlink)?)
        }
    }
}

fn kind_of(st_mode: u32) -> FileType {
    match st_mode & libc::S_IFMT {
        libc::S_IFDIR => FileType::Dir,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        libc::S_IFIFO => FileType::Fifo,
        libc::S_IFSOCK => FileType::Socket,
        _ => FileType::File,
    }
}

fn metadata(st: &FileStat) -> Metadata {
    Metadata {
        file_type: kind_of(st.st_mode),
        mode: st.st_mode,
        uid: st.st_uid,
        gid: st.st_gid,
        len: st.st_size as u64,
        mtime: st.st_mtime,
        dev: st.st_dev,
        ino: st.st_ino,
        #[allow(clippy::unnecessary_cast)] // u32 on some architectures
        nlink: st.st_nlink as u64,
        rdev: st.st_rdev,
    }
}

/// Names in the directory open at `fd` (which must not be `O_PATH`), without `.`/`..`.
fn list_names(fd: OwnedFd) -> io::Result<Vec<OsString>> {
    struct Dir(*mut libc::DIR);
    impl Drop for Dir {
        fn drop(&mut self) {
            // SAFETY: a stream from fdopendir, closed exactly once (this closes the fd).
            unsafe { libc::closedir(self.0) };
        }
    }
    let raw = fd.into_raw_fd();
    // SAFETY: `raw` is an open directory descriptor we own; on success the stream owns it.
    let dirp = unsafe { libc::fdopendir(raw) };
    if dirp.is_null() {
        let err = io::Error::last_os_error();
        // SAFETY: fdopendir failed, so we still own `raw`.
        drop(unsafe { OwnedFd::from_raw_fd(raw) });
        return Err(err);
    }
    let dir = Dir(dirp);
    let mut names = Vec::new();
    loop {
        Errno::clear();
        // SAFETY: a valid stream; the returned entry is read before the next call.
        let ent = unsafe { libc::readdir(dir.0) };
        if ent.is_null() {
            return match Errno::last_raw() {
                0 => Ok(names),
                e => Err(io::Error::from_raw_os_error(e)),
            };
        }
        // SAFETY: d_name is a NUL-terminated array inside the entry.
        let name = unsafe { CStr::from_ptr((*ent).d_name.as_ptr()) }.to_bytes();
        if name != b"." && name != b".." {
            names.push(OsStr::from_bytes(name).to_os_string());
        }
    }
}

/// Which mount an open file is on: `st_dev` plus, where statx reports it, the mount id
/// (a bind mount of a directory from the same filesystem has the same `st_dev`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct MountKey {
    dev: u64,
    mnt_id: Option<u64>,
}

impl MountKey {
    fn of(fd: &OwnedFd) -> io::Result<MountKey> {
        let dev = nix::sys::stat::fstat(fd)?.st_dev;
        let mut stx = std::mem::MaybeUninit::<libc::statx>::zeroed();
        // SAFETY: valid descriptor, empty path with AT_EMPTY_PATH, and a buffer of the
        // right type for the kernel to fill.
        let r = unsafe {
            libc::statx(
                fd.as_raw_fd(),
                c"".as_ptr(),
                libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
                libc::STATX_MNT_ID,
                stx.as_mut_ptr(),
            )
        };
        let mnt_id = if r == 0 {
            // SAFETY: statx succeeded and filled the buffer (which started zeroed).
            let stx = unsafe { stx.assume_init() };
            (stx.stx_mask & libc::STATX_MNT_ID != 0).then_some(stx.stx_mnt_id)
        } else {
            None
        };
        Ok(MountKey { dev, mnt_id })
    }
}

fn mount_point_error(path: &Path) -> io::Error {
    io::Error::other(format!(
        "{} is a mount point; refusing to delete anything on another mount",
        path.display()
    ))
}

/// Remove everything inside the directory open at `dir` (on mount `mount`). `at` is its
/// image path, for messages.
fn remove_tree(dir: &OwnedFd, mount: MountKey, at: &Path) -> io::Result<()> {
    let located = |p: &Path, err: io::Error| io::Error::new(err.kind(), format!("{}: {err}", p.display()));
    for name in list_names(dir.try_clone()?)? {
        let child = at.join(&name);
        let cname = c_name(&name)?;
        let st = match lstat_at(dir, &cname) {
            Ok(st) => st,
            Err(err) if err.raw_os_error() == Some(libc::ENOENT) => continue,
            Err(err) => return Err(located(&child, err)),
        };
        if kind_of(st.st_mode) == FileType::Dir {
            let fd = nix::fcntl::openat(
                dir,
                cname.as_c_str(),
                OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| located(&child, e.into()))?;
            if MountKey::of(&fd)? != mount {
                return Err(mount_point_error(&child));
            }
            remove_tree(&fd, mount, &child)?;
            drop(fd);
            nix::unistd::unlinkat(dir, cname.as_c_str(), UnlinkatFlags::RemoveDir)
                .map_err(|e| located(&child, e.into()))?;
        } else {
            nix::unistd::unlinkat(dir, cname.as_c_str(), UnlinkatFlags::NoRemoveDir)
                .map_err(|e| located(&child, e.into()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod testutil {
    //! Helpers shared by the tests of modules that write through [`RootDir`].

    use std::os::unix::fs::MetadataExt;
    use std::path::{Path, PathBuf};

    pub fn is_root() -> bool {
        nix::unistd::geteuid().is_root()
    }

    /// Fail (never skip) a test that needs root: run the tests as root (`sudo ci/test.sh`).
    pub fn require_root(what: &str) {
        assert!(
            is_root(),
            "this test needs root ({what}); run the tests as root, e.g. `sudo ci/test.sh`"
        );
    }

    /// Everything observable about a host directory tree: per entry its relative path,
    /// mode, owner, mtime (ns), link count, and content or symlink target.
    pub type Snapshot = Vec<(PathBuf, u32, u32, u32, i64, i64, u64, Vec<u8>)>;

    pub fn snapshot(dir: &Path) -> Snapshot {
        let mut out = Vec::new();
        walk(dir, dir, &mut out);
        out.sort();
        out
    }

    fn walk(base: &Path, p: &Path, out: &mut Snapshot) {
        let m = std::fs::symlink_metadata(p).unwrap();
        let data = if m.file_type().is_symlink() {
            std::fs::read_link(p).unwrap().into_os_string().into_encoded_bytes()
        } else if m.is_file() {
            std::fs::read(p).unwrap()
        } else {
            Vec::new()
        };
        let rel = p.strip_prefix(base).unwrap().to_path_buf();
        out.push((
            rel,
            m.mode(),
            m.uid(),
            m.gid(),
            m.mtime(),
            m.mtime_nsec(),
            m.nlink(),
            data,
        ));
        if m.is_dir() {
            for e in std::fs::read_dir(p).unwrap() {
                walk(base, &e.unwrap().path(), out);
            }
        }
    }

    /// A host "canary" directory outside any image root, with a secret file, all with
    /// old timestamps so any write shows. Returns (canary dir, its secret file).
    pub fn make_canary(tmp: &Path) -> (PathBuf, PathBuf) {
        let canary = tmp.join("canary");
        std::fs::create_dir(&canary).unwrap();
        let secret = canary.join("shadow");
        std::fs::write(&secret, b"SECRET\n").unwrap();
        std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o640)).unwrap();
        let old = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000_000);
        for p in [&secret, &canary] {
            std::fs::File::open(p).unwrap().set_modified(old).unwrap();
        }
        (canary, secret)
    }
}

#[cfg(test)]
mod tests {
    use super::testutil::*;
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    struct Fixture {
        _tmp: tempfile::TempDir,
        tmp: PathBuf,
        root_path: PathBuf,
        root: RootDir,
        canary: PathBuf,
        secret: PathBuf,
    }

    /// A root at tmp/root and a canary at tmp/canary, with escape symlinks in the root:
    /// `etc -> <canary>` (absolute), `rel -> ../../../../../../../../..<canary>`, and
    /// `shadow_link -> <canary>/shadow` (a final-component link to a host file).
    fn fixture() -> Fixture {
        let tmpdir = tempfile::tempdir().unwrap();
        let tmp = tmpdir.path().canonicalize().unwrap();
        let (canary, secret) = make_canary(&tmp);
        let root_path = tmp.join("root");
        std::fs::create_dir(&root_path).unwrap();
        std::os::unix::fs::symlink(&canary, root_path.join("etc")).unwrap();
        let up = "../".repeat(12);
        std::os::unix::fs::symlink(format!("{up}{}", canary.display()), root_path.join("rel")).unwrap();
        std::os::unix::fs::symlink(&secret, root_path.join("shadow_link")).unwrap();
        // Sanity: from the host, these really do lead to the canary.
        assert_eq!(std::fs::read(root_path.join("etc/shadow")).unwrap(), b"SECRET\n");
        assert_eq!(std::fs::read(root_path.join("rel/shadow")).unwrap(), b"SECRET\n");
        let root = RootDir::open(&root_path).unwrap();
        Fixture {
            _tmp: tmpdir,
            tmp,
            root_path,
            root,
            canary,
            secret,
        }
    }

    /// Image paths that would reach the canary if resolved on the host.
    fn escape_paths(f: &Fixture) -> Vec<String> {
        let canary = f.canary.display();
        vec![
            "etc/shadow".into(),
            "/etc/shadow".into(),
            "rel/shadow".into(),
            "shadow_link".into(),
            format!("../../../../../../../..{canary}/shadow"),
            format!("etc/../../../../../../../..{canary}/shadow"),
        ]
    }

    type Op = Box<dyn Fn(&RootDir, &str)>;

    /// Every mutating operation, as (name, op on an image path).
    fn operations(uid: u32) -> Vec<(&'static str, Op)> {
        vec![
            ("write_file", Box::new(|r, p| drop(r.write_file(p, b"pwned\n", 0o666)))),
            (
                "write_file_synced",
                Box::new(|r, p| drop(r.write_file_synced(p, b"pwned\n", 0o666))),
            ),
            (
                "create_file",
                Box::new(|r, p| {
                    if let Ok(mut f) = r.create_file(p, 0o666) {
                        f.write_all(b"pwned\n").unwrap();
                    }
                }),
            ),
            ("truncate", Box::new(|r, p| drop(r.truncate(p)))),
            ("set_mode", Box::new(|r, p| drop(r.set_mode(p, 0o777)))),
            ("set_owner", Box::new(move |r, p| drop(r.set_owner(p, uid, uid)))),
            ("set_times", Box::new(|r, p| drop(r.set_times(p, 42)))),
            (
                "set_xattr",
                Box::new(|r, p| drop(r.set_xattr(p, "user.kiln", b"pwned"))),
            ),
            (
                "create_dir",
                Box::new(|r, p| drop(r.create_dir(format!("{p}.d"), 0o777))),
            ),
            (
                "create_dir_all",
                Box::new(|r, p| drop(r.create_dir_all(format!("{p}.d/sub"), 0o777))),
            ),
            ("symlink", Box::new(|r, p| drop(r.symlink("/pwned", format!("{p}.l"))))),
            ("symlink over", Box::new(|r, p| drop(r.symlink("/pwned", p)))),
            (
                "hard_link from",
                Box::new(|r, p| drop(r.hard_link(p, format!("{p}.h")))),
            ),
            ("hard_link to", Box::new(|r, p| drop(r.hard_link("/victim", p)))),
            (
                "mknod",
                Box::new(|r, p| drop(r.mknod(format!("{p}.fifo"), NodeKind::Fifo, 0o666, 0))),
            ),
            (
                "mknod over",
                Box::new(|r, p| drop(r.mknod(p, NodeKind::Fifo, 0o666, 0))),
            ),
            ("remove_file", Box::new(|r, p| drop(r.remove_file(p)))),
            ("remove_dir_all", Box::new(|r, p| drop(r.remove_dir_all(p)))),
            (
                "remove_dir_all parent",
                Box::new(|r, p| drop(r.remove_dir_all(Path::new(p).parent().unwrap_or(Path::new("x"))))),
            ),
        ]
    }

    /// Put the escape symlinks back as the fixture made them.
    fn reset_links(f: &Fixture) {
        let up = "../".repeat(12);
        for (name, target) in [
            ("etc", f.canary.clone()),
            ("rel", PathBuf::from(format!("{up}{}", f.canary.display()))),
            ("shadow_link", f.secret.clone()),
        ] {
            let link = f.root_path.join(name);
            match std::fs::symlink_metadata(&link) {
                Ok(m) if m.is_dir() => std::fs::remove_dir_all(&link).unwrap(),
                Ok(_) => std::fs::remove_file(&link).unwrap(),
                Err(_) => {}
            }
            std::os::unix::fs::symlink(&target, &link).unwrap();
        }
    }

    #[test]
    fn escapes_never_touch_the_host() {
        let f = fixture();
        std::fs::write(f.root_path.join("victim"), b"in the image\n").unwrap();
        let before = snapshot(&f.canary);
        let mut tmp_before: Vec<_> = std::fs::read_dir(&f.tmp)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        tmp_before.sort();
        let uid = if is_root() {
            4242
        } else {
            nix::unistd::geteuid().as_raw()
        };
        for p in escape_paths(&f) {
            for (name, op) in operations(uid) {
                reset_links(&f);
                op(&f.root, &p);
                assert_eq!(snapshot(&f.canary), before, "canary changed by {name} on {p}");
            }
        }
        let mut tmp_after: Vec<_> = std::fs::read_dir(&f.tmp)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        tmp_after.sort();
        assert_eq!(tmp_after, tmp_before, "something was created next to the root");
        assert!(!Path::new("/pwned").exists());
    }

    #[test]
    fn escape_paths_resolve_inside_the_root() {
        let f = fixture();
        let before = snapshot(&f.canary);
        // Without the canary's path existing inside the root, writes through `etc/` fail.
        let err = f.root.write_file("etc/new", b"x", 0o644).unwrap_err();
        assert!(format!("{err:#}").contains("/etc/new in image root"), "{err:#}");
        assert!(!f.canary.join("new").exists());

        // With it, they land there.
        let inside = f.root_path.join(f.canary.strip_prefix("/").unwrap());
        std::fs::create_dir_all(&inside).unwrap();
        f.root.write_file("etc/new", b"abs\n", 0o644).unwrap();
        assert_eq!(std::fs::read(inside.join("new")).unwrap(), b"abs\n");
        f.root.write_file("rel/new2", b"rel\n", 0o644).unwrap();
        assert_eq!(std::fs::read(inside.join("new2")).unwrap(), b"rel\n");
        f.root
            .write_file(format!("../../../../..{}/new3", f.canary.display()), b"dots\n", 0o644)
            .unwrap();
        assert_eq!(std::fs::read(inside.join("new3")).unwrap(), b"dots\n");
        f.root.create_dir_all("etc/a/b", 0o755).unwrap();
        assert!(inside.join("a/b").is_dir());
        f.root.mknod("etc/fifo", NodeKind::Fifo, 0o600, 0).unwrap();
        assert!(inside.join("fifo").exists());
        assert_eq!(f.root.read_dir("etc").unwrap(), ["a", "fifo", "new", "new2", "new3"]);
        f.root.remove_file("etc/new").unwrap();
        assert!(!inside.join("new").exists());
        f.root.remove_dir_all("etc/a").unwrap();
        assert!(!inside.join("a").exists());
        assert_eq!(snapshot(&f.canary), before);
    }

    #[test]
    fn final_symlink_is_replaced_not_followed() {
        let f = fixture();
        let before = snapshot(&f.canary);
        let link = f.root_path.join("shadow_link");

        // Refused outright.
        let err = f.root.set_mode("shadow_link", 0o777).unwrap_err();
        assert!(format!("{err:#}").contains("symbolic link"), "{err:#}");
        let err = f.root.truncate("shadow_link").unwrap_err();
        assert!(format!("{err:#}").contains("symbolic link"), "{err:#}");
        assert!(!f.root.set_xattr("shadow_link", "user.kiln", b"x").unwrap());

        // Changes the link itself.
        f.root.set_times("shadow_link", 1234).unwrap();
        assert_eq!(std::fs::symlink_metadata(&link).unwrap().mtime(), 1234);
        if is_root() {
            f.root.set_owner("shadow_link", 4242, 4343).unwrap();
            let m = std::fs::symlink_metadata(&link).unwrap();
            assert_eq!((m.uid(), m.gid()), (4242, 4343));
        }
        assert_eq!(snapshot(&f.canary), before);

        // Replaced by a regular file.
        f.root.write_file("shadow_link", b"mine\n", 0o600).unwrap();
        let m = std::fs::symlink_metadata(&link).unwrap();
        assert!(m.is_file());
        assert_eq!(std::fs::read(&link).unwrap(), b"mine\n");
        std::fs::remove_file(&link).unwrap();
        std::os::unix::fs::symlink(&f.secret, &link).unwrap();
        let mut file = f.root.create_file("shadow_link", 0o600).unwrap();
        file.write_all(b"streamed\n").unwrap();
        drop(file);
        assert_eq!(std::fs::read(&link).unwrap(), b"streamed\n");
        assert!(std::fs::symlink_metadata(&link).unwrap().is_file());
        assert_eq!(snapshot(&f.canary), before);

        // A symlink removed is the symlink.
        f.root.remove_dir_all("etc").unwrap();
        assert!(std::fs::symlink_metadata(f.root_path.join("etc")).is_err());
        assert_eq!(snapshot(&f.canary), before);
    }

    #[test]
    fn reads_resolve_inside_the_root() {
        let f = fixture();
        let err = f.root.read_to_string("shadow_link").unwrap_err();
        assert!(!format!("{err:#}").contains("SECRET"));
        assert!(f.root.read("etc/shadow").is_err());
        assert!(f.root.read_dir("etc").is_err());
        let inside = f.root_path.join(f.canary.strip_prefix("/").unwrap());
        std::fs::create_dir_all(&inside).unwrap();
        std::fs::write(inside.join("shadow"), b"inside\n").unwrap();
        assert_eq!(f.root.read_to_string("shadow_link").unwrap(), "inside\n");
        assert_eq!(f.root.read("rel/shadow").unwrap(), b"inside\n");
        assert_eq!(f.root.read_dir("etc").unwrap(), ["shadow"]);
        assert_eq!(f.root.read_link("shadow_link").unwrap(), f.secret);
        // Never opens a FIFO (it would block) or anything else but a regular file.
        f.root.mknod("fifo", NodeKind::Fifo, 0o644, 0).unwrap();
        let err = f.root.read("fifo").unwrap_err();
        assert!(format!("{err:#}").contains("not a regular file"), "{err:#}");
    }

    #[test]
    fn remove_dir_all_never_follows() {
        let f = fixture();
        let before = snapshot(&f.canary);
        let d = f.root_path.join("d/e");
        std::fs::create_dir_all(&d).unwrap();
        std::os::unix::fs::symlink(&f.canary, d.join("to_canary")).unwrap();
        std::os::unix::fs::symlink(&f.secret, d.join("to_secret")).unwrap();
        std::os::unix::fs::symlink("../../../../../../..", d.join("up")).unwrap();
        std::fs::write(d.join("file"), b"x").unwrap();
        f.root.remove_dir_all("/d").unwrap();
        assert!(!f.root_path.join("d").exists());
        let err = f.root.remove_dir_all("/d").unwrap_err();
        assert!(format!("{err:#}").starts_with("removing /d in image root"), "{err:#}");
        f.root.remove_dir_all("/nope/deeper").unwrap_err();
        f.root.remove_dir_all("/rel").unwrap();
        let err = f.root.remove_dir_all("/").unwrap_err();
        assert!(format!("{err:#}").contains("image root itself"), "{err:#}");
        let err = f.root.remove_dir_all("x/..").unwrap_err();
        assert!(format!("{err:#}").contains("ends in `..`"), "{err:#}");
        assert_eq!(snapshot(&f.canary), before);
        assert!(f.root_path.exists());
    }

    #[test]
    fn remove_dir_all_stops_at_mount_points() {
        require_root("bind mounts");
        // In a thread of its own with a private mount namespace, so the bind mount is
        // invisible to the rest of the system and vanishes with the thread.
        std::thread::spawn(|| {
            use nix::mount::{MsFlags, mount};
            crate::host::mounts::enter_private_namespace().unwrap();
            let f = fixture();
            let mnt = f.root_path.join("d/mnt");
            std::fs::create_dir_all(&mnt).unwrap();
            mount(Some(&f.canary), &mnt, None::<&str>, MsFlags::MS_BIND, None::<&str>).unwrap();
            // Same filesystem, so only the mount id tells them apart.
            assert_eq!(
                std::fs::metadata(&mnt).unwrap().dev(),
                std::fs::metadata(&f.root_path).unwrap().dev()
            );
            let before = snapshot(&f.canary);
            let err = f.root.remove_dir_all("d").unwrap_err();
            assert!(format!("{err:#}").contains("/d/mnt is a mount point"), "{err:#}");
            let err = f.root.remove_dir_all("d/mnt").unwrap_err();
            assert!(format!("{err:#}").contains("mount point"), "{err:#}");
            assert_eq!(snapshot(&f.canary), before);
            nix::mount::umount2(&mnt, nix::mount::MntFlags::MNT_DETACH).unwrap();
            f.root.remove_dir_all("d").unwrap();
        })
        .join()
        .unwrap();
    }

    #[test]
    fn files_dirs_and_metadata() {
        let tmp = tempfile::tempdir().unwrap();
        let root = RootDir::open(tmp.path()).unwrap();
        assert_eq!(root.host_path(), tmp.path());
        root.create_dir_all("/usr/lib/x", 0o755).unwrap();
        root.create_dir_all("usr/lib/x", 0o700).unwrap(); // exists: untouched
        assert_eq!(root.symlink_metadata("usr/lib/x").unwrap().mode() & 0o7777, 0o755);
        root.create_dir("tmp", 0o1777).unwrap();
        root.create_dir("tmp", 0o755).unwrap();
        assert_eq!(root.symlink_metadata("/tmp").unwrap().mode(), libc::S_IFDIR | 0o1777);

        root.write_file("/etc/hostname", b"x", 0o644).unwrap_err(); // no /etc yet
        root.create_dir("etc", 0o755).unwrap();
        root.write_file("/etc/hostname", b"node\n", 0o644).unwrap();
        root.write_file_synced("etc/hostname", b"node2\n", 0o600).unwrap();
        assert_eq!(root.read_to_string("/etc/./hostname").unwrap(), "node2\n");
        let m = root.symlink_metadata("etc/hostname").unwrap();
        assert!(m.is_file() && m.mode() & 0o7777 == 0o600 && m.len() == 6);
        assert_eq!(root.read_dir("etc").unwrap(), ["hostname"], "temp file left behind");
        let err = root.write_file("etc", b"x", 0o644).unwrap_err();
        assert!(format!("{err:#}").starts_with("writing /etc in image root"), "{err:#}");
        root.create_dir("etc/hostname", 0o755).unwrap_err();

        let mut f = root.create_file("usr/lib/x/big", 0o4755).unwrap();
        f.write_all(&[7u8; 100_000]).unwrap();
        drop(f);
        root.set_mode("usr/lib/x/big", 0o4755).unwrap();
        let m = root.symlink_metadata("usr/lib/x/big").unwrap();
        assert_eq!((m.mode() & 0o7777, m.len()), (0o4755, 100_000));
        root.truncate("usr/lib/x/big").unwrap();
        assert_eq!(root.symlink_metadata("usr/lib/x/big").unwrap().len(), 0);
        root.set_times("usr/lib/x/big", 1_600_000_000).unwrap();
        assert_eq!(root.symlink_metadata("usr/lib/x/big").unwrap().mtime(), 1_600_000_000);
        root.set_mode("/", 0o750).unwrap();
        assert_eq!(
            std::fs::metadata(tmp.path()).unwrap().permissions().mode() & 0o7777,
            0o750
        );
        root.set_mode("/", 0o755).unwrap();
        root.set_times("", 1_500_000_000).unwrap();
        assert_eq!(std::fs::metadata(tmp.path()).unwrap().mtime(), 1_500_000_000);

        assert!(root.exists("etc/hostname").unwrap());
        assert!(!root.exists("etc/nope").unwrap());
        assert!(!root.exists("nope/nope").unwrap());
        assert!(!root.exists("etc/hostname/below").unwrap());
        assert!(root.lstat("nope").unwrap().is_none());
        let err = root.symlink_metadata("nope").unwrap_err();
        assert!(
            format!("{err:#}").starts_with("inspecting /nope in image root"),
            "{err:#}"
        );
        root.remove_file("etc/hostname").unwrap();
        let err = root.remove_file("etc/hostname").unwrap_err();
        assert!(err.chain().any(|e| {
            e.downcast_ref::<io::Error>()
                .is_some_and(|e| e.kind() == io::ErrorKind::NotFound)
        }));
        root.remove_file("etc").unwrap_err();
        root.read("etc/a\0b").unwrap_err();
    }

    #[test]
    fn links_and_nodes() {
        let tmp = tempfile::tempdir().unwrap();
        let root = RootDir::open(tmp.path()).unwrap();
        root.create_dir_all("usr/bin", 0o755).unwrap();
        root.write_file("usr/bin/a", b"A", 0o755).unwrap();
        root.hard_link("/usr/bin/a", "usr/bin/b").unwrap();
        root.hard_link("usr/bin/a", "usr/bin/b").unwrap(); // already linked: fine
        let (a, b) = (
            root.symlink_metadata("usr/bin/a").unwrap(),
            root.symlink_metadata("usr/bin/b").unwrap(),
        );
        assert_eq!((a.ino(), a.nlink()), (b.ino(), 2));

        root.symlink("usr/bin", "bin").unwrap();
        root.symlink("/../../weird/../target", "lnk").unwrap();
        assert_eq!(root.read_link("lnk").unwrap(), Path::new("/../../weird/../target"));
        root.symlink("other", "lnk").unwrap(); // replaced
        assert_eq!(root.read_link("lnk").unwrap(), Path::new("other"));
        assert!(root.symlink_metadata("bin").unwrap().is_symlink());
        assert_eq!(root.read("bin/a").unwrap(), b"A"); // through the in-root symlink
        root.create_dir_all("bin/sub", 0o755).unwrap(); // mkdir -p follows in-root links
        assert!(tmp.path().join("usr/bin/sub").is_dir());
        root.create_dir("bin", 0o755).unwrap_err(); // create_dir does not
        root.hard_link("bin", "bin2").unwrap(); // links the symlink itself
        assert!(root.symlink_metadata("bin2").unwrap().is_symlink());
        root.symlink("x", "usr").unwrap_err(); // a directory is in the way

        root.mknod("fifo", NodeKind::Fifo, 0o640, 0).unwrap();
        let m = root.symlink_metadata("fifo").unwrap();
        assert_eq!((m.file_type(), m.mode() & 0o7777), (FileType::Fifo, 0o640));
        root.set_mode("fifo", 0o600).unwrap();
        assert_eq!(root.symlink_metadata("fifo").unwrap().mode() & 0o7777, 0o600);
        root.truncate("fifo").unwrap_err();
    }

    #[test]
    fn device_nodes_and_owners_as_root() {
        require_root("device nodes, chown");
        let tmp = tempfile::tempdir().unwrap();
        let root = RootDir::open(tmp.path()).unwrap();
        root.create_dir_all("usr/bin", 0o755).unwrap();
        root.write_file("usr/bin/a", b"a", 0o755).unwrap();
        root.mknod("null", NodeKind::Char, 0o666, nix::sys::stat::makedev(1, 3))
            .unwrap();
        let m = root.symlink_metadata("null").unwrap();
        assert_eq!(
            (m.file_type(), m.mode() & 0o7777, m.rdev()),
            (FileType::CharDevice, 0o666, nix::sys::stat::makedev(1, 3))
        );
        root.set_mode("null", 0o600).unwrap();
        assert!(!root.set_xattr("null", "user.x", b"1").unwrap());
        root.set_owner("usr/bin/a", 123, 456).unwrap();
        let m = root.symlink_metadata("usr/bin/a").unwrap();
        assert_eq!((m.uid(), m.gid()), (123, 456));
    }

    #[test]
    fn xattrs() {
        let tmp = tempfile::tempdir().unwrap();
        let root = RootDir::open(tmp.path()).unwrap();
        root.write_file("f", b"", 0o644).unwrap();
        match root.set_xattr("f", "user.kiln", b"v1") {
            Ok(set) => assert!(set),
            Err(e) if format!("{e:#}").contains("Operation not supported") => {
                eprintln!("skipped: no user xattrs on {}", tmp.path().display());
                return;
            }
            Err(e) => panic!("{e:#}"),
        }
        assert!(root.set_xattr("/", "user.kiln", b"dir").unwrap());
        let get = |p: &Path, name: &str| {
            let p = CString::new(p.as_os_str().as_bytes()).unwrap();
            let n = CString::new(name).unwrap();
            let mut buf = [0u8; 64];
            // SAFETY: valid C strings and buffer.
            let r = unsafe { libc::lgetxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
            assert!(r >= 0, "{}", io::Error::last_os_error());
            buf[..r as usize].to_vec()
        };
        assert_eq!(get(&tmp.path().join("f"), "user.kiln"), b"v1");
        assert_eq!(get(tmp.path(), "user.kiln"), b"dir");
    }

    /// The pre-6.6 chmod path, which this machine's kernel would not otherwise take.
    #[test]
    fn chmod_fallback_never_follows() {
        let f = fixture();
        let before = snapshot(&f.canary);
        let dir = f.root.entry(Path::new("x")).unwrap().dir;
        let err = chmod_at_fallback(&dir, c"shadow_link", 0o777).unwrap_err();
        assert!(err.to_string().contains("symbolic link"), "{err}");
        chmod_at_fallback(&dir, c"etc", 0o777).unwrap_err();
        std::fs::write(f.root_path.join("file"), b"x").unwrap();
        chmod_at_fallback(&dir, c"file", 0o4711).unwrap();
        assert_eq!(
            std::fs::metadata(f.root_path.join("file")).unwrap().mode() & 0o7777,
            0o4711
        );
        std::fs::create_dir(f.root_path.join("dir")).unwrap();
        chmod_at_fallback(&dir, c"dir", 0o1755).unwrap();
        assert_eq!(
            std::fs::metadata(f.root_path.join("dir")).unwrap().mode() & 0o7777,
            0o1755
        );
        f.root.mknod("fifo", NodeKind::Fifo, 0o600, 0).unwrap();
        chmod_at_fallback(&dir, c"fifo", 0o640).unwrap();
        assert_eq!(f.root.symlink_metadata("fifo").unwrap().mode() & 0o7777, 0o640);
        if is_root() {
            f.root
                .mknod("null", NodeKind::Char, 0o600, nix::sys::stat::makedev(1, 3))
                .unwrap();
            chmod_at_fallback(&dir, c"null", 0o666).unwrap();
            assert_eq!(f.root.symlink_metadata("null").unwrap().mode() & 0o7777, 0o666);
        }
        assert_eq!(snapshot(&f.canary), before);
    }

    #[test]
    fn missing_root_is_an_error() {
        let err = RootDir::open("/nonexistent/kiln-root").unwrap_err();
        assert!(
            format!("{err:#}").contains("opening image root /nonexistent/kiln-root"),
            "{err:#}"
        );
    }
}
