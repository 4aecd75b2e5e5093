//! Sparse-file I/O: copy only the data extents of a file, leaving holes as holes.

use anyhow::{Context, Result};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::io::AsRawFd;
use std::path::Path;

/// A piece of a regular file, as reported by SEEK_DATA/SEEK_HOLE.
#[derive(Debug, PartialEq)]
pub enum Extent {
    Data { start: u64, len: u64 },
    Hole { len: u64 },
}

/// The data and hole extents of the first `size` bytes of a file, in order, found with
/// `lseek(SEEK_DATA)` / `lseek(SEEK_HOLE)`. Where the filesystem does not support
/// `SEEK_DATA` (`EINVAL`/`EOPNOTSUPP`), the rest of the file is one data extent. After an
/// error the iteration ends.
pub struct Extents<'a> {
    file: &'a File,
    pos: u64,
    size: u64,
    /// False once SEEK_DATA turned out to be unsupported: the rest is read as data.
    walk: bool,
}

impl<'a> Extents<'a> {
    /// The extents of the first `size` bytes of `file`.
    pub fn new(file: &'a File, size: u64) -> Self {
        Extents {
            file,
            pos: 0,
            size,
            walk: true,
        }
    }

    /// One data extent over the first `size` bytes, as if the filesystem could not tell
    /// holes (tests of the fallback).
    pub fn all_data(file: &'a File, size: u64) -> Self {
        Extents {
            walk: false,
            ..Extents::new(file, size)
        }
    }

    fn next_extent(&mut self) -> io::Result<Option<Extent>> {
        let start = self.pos;
        if start >= self.size {
            return Ok(None);
        }
        if self.walk {
            match self.seek(libc::SEEK_DATA, start) {
                Ok(data) if data > start => {
                    // A hole up to the next data (or to the end, if the file grew).
                    self.pos = data.min(self.size);
                    return Ok(Some(Extent::Hole { len: self.pos - start }));
                }
                Ok(_) => {
                    // Data from `start` to the next hole. There is always a hole at end
                    // of file, so this is at most `size` unless the file grew; if it
                    // shrank below `start`, read to `size` and let the read report it.
                    let hole = self
                        .seek(libc::SEEK_HOLE, start)
                        .map_err(|e| lseek_error("SEEK_HOLE", start, e))?;
                    self.pos = if hole > start { hole.min(self.size) } else { self.size };
                    return Ok(Some(Extent::Data {
                        start,
                        len: self.pos - start,
                    }));
                }
                // No data at or after `start`: the rest of the file is a hole.
                Err(e) if e.raw_os_error() == Some(libc::ENXIO) => {
                    self.pos = self.size;
                    return Ok(Some(Extent::Hole { len: self.size - start }));
                }
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EOPNOTSUPP)) => {
                    tracing::debug!("SEEK_DATA unsupported ({e}); reading the whole file");
                    self.walk = false;
                }
                Err(e) => return Err(lseek_error("SEEK_DATA", start, e)),
            }
        }
        self.pos = self.size;
        Ok(Some(Extent::Data {
            start,
            len: self.size - start,
        }))
    }

    fn seek(&self, whence: libc::c_int, offset: u64) -> io::Result<u64> {
        let off = libc::off_t::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: lseek on a descriptor the borrowed File keeps open; it only moves the
        // file offset, which nothing else uses (data is read with pread).
        let r = unsafe { libc::lseek(self.file.as_raw_fd(), off, whence) };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(r as u64)
        }
    }
}

impl Iterator for Extents<'_> {
    type Item = io::Result<Extent>;

    fn next(&mut self) -> Option<Self::Item> {
        match self.next_extent() {
            Ok(e) => e.map(Ok),
            Err(e) => {
                self.pos = self.size;
                Some(Err(e))
            }
        }
    }
}

fn lseek_error(whence: &str, offset: u64, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("lseek({whence}) at offset {offset}: {e}"))
}

/// The data extents `(offset, len)` of `f` (see [`Extents`]).
pub fn data_extents(f: &File) -> io::Result<Vec<(u64, u64)>> {
    let len = f.metadata()?.len();
    Extents::new(f, len)
        .filter_map(|e| match e {
            Ok(Extent::Data { start, len }) => Some(Ok((start, len))),
            Ok(Extent::Hole { .. }) => None,
            Err(e) => Some(Err(e)),
        })
        .collect()
}

/// Create (or truncate) `path` as a sparse file of `size` bytes, open for read and write.
pub fn create_sized(path: &Path, size: u64) -> Result<File> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.set_len(size)
        .with_context(|| format!("setting the size of {} to {size} bytes", path.display()))?;
    Ok(f)
}

/// Copy `src` to a new `dst` of the same length, writing only the data extents
/// (copy_file_range, which the filesystem may turn into a reflink).
pub fn copy_sparse(src: &Path, dst: &Path) -> Result<u64> {
    let s = File::open(src).with_context(|| format!("opening {}", src.display()))?;
    let len = s.metadata()?.len();
    let d = create(dst)?;
    d.set_len(len).with_context(|| format!("sizing {}", dst.display()))?;
    let mut copied = 0u64;
    for (off, n) in data_extents(&s).with_context(|| format!("finding data in {}", src.display()))? {
        let mut done = 0u64;
        while done < n {
            let mut off_in = (off + done) as i64;
            let mut off_out = off_in;
            let r = unsafe {
                libc::copy_file_range(
                    s.as_raw_fd(),
                    &mut off_in,
                    d.as_raw_fd(),
                    &mut off_out,
                    (n - done).min(1 << 30) as usize,
                    0,
                )
            };
            if r < 0 {
                return Err(std::io::Error::last_os_error())
                    .with_context(|| format!("copying {} to {}", src.display(), dst.display()));
            }
            if r == 0 {
                break;
            }
            done += r as u64;
        }
        copied += done;
    }
    Ok(copied)
}

/// Create (or truncate) the destination of a copy.
fn create(dst: &Path) -> Result<File> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(dst)
        .with_context(|| format!("creating {}", dst.display()))
}

/// Copy `src` to a new `dst`: a reflink (FICLONE: the copy shares the blocks, so it is
/// instant and takes no space) where the filesystem can (btrfs, XFS), else
/// [`copy_sparse`]. Returns the bytes of data copied (0 for a reflink).
pub fn clone_or_copy(src: &Path, dst: &Path) -> Result<u64> {
    // _IOW(0x94, 9, int): linux/fs.h FICLONE.
    const FICLONE: libc::c_ulong = 0x4004_9409;
    let s = File::open(src).with_context(|| format!("opening {}", src.display()))?;
    let d = create(dst)?;
    // SAFETY: an ioctl on two descriptors we own; it only shares their data blocks.
    if unsafe { libc::ioctl(d.as_raw_fd(), FICLONE as _, s.as_raw_fd()) } == 0 {
        return Ok(0);
    }
    drop(d);
    copy_sparse(src, dst)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom, Write};

    #[test]
    fn extents_skip_holes() {
        const M: u64 = 1 << 20;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("e");
        let mut f = File::create(&p).unwrap();
        f.set_len(12 * M).unwrap();
        f.seek(SeekFrom::Start(4 * M)).unwrap();
        f.write_all(&[1u8; 4096]).unwrap();
        drop(f);
        let f = File::open(&p).unwrap();
        let got: Vec<Extent> = Extents::new(&f, 12 * M).map(Result::unwrap).collect();
        let want = [
            Extent::Hole { len: 4 * M },
            Extent::Data {
                start: 4 * M,
                len: 4096,
            },
            Extent::Hole { len: 8 * M - 4096 },
        ];
        assert_eq!(got, want);
        assert_eq!(data_extents(&f).unwrap(), [(4 * M, 4096)]);
        let all: Vec<Extent> = Extents::all_data(&f, 12 * M).map(Result::unwrap).collect();
        assert_eq!(all, [Extent::Data { start: 0, len: 12 * M }]);
    }

    #[test]
    fn copy_keeps_data_and_holes() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        let mut f = File::create(&a).unwrap();
        f.set_len(64 << 20).unwrap();
        f.seek(SeekFrom::Start(8 << 20)).unwrap();
        f.write_all(&[7u8; 1 << 20]).unwrap();
        f.seek(SeekFrom::Start((64 << 20) - 10)).unwrap();
        f.write_all(b"0123456789").unwrap();
        drop(f);
        let b = dir.path().join("b");
        copy_sparse(&a, &b).unwrap();
        assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
        use std::os::unix::fs::MetadataExt;
        let blocks = std::fs::metadata(&b).unwrap().blocks() * 512;
        assert!(blocks < 8 << 20, "copy is not sparse: {blocks} bytes allocated");
    }
}
