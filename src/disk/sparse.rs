//! Sparse-file I/O: copy only the data extents of a file, leaving holes as holes.

use anyhow::{Context, Result};
use std::fs::{File, OpenOptions};
use std::os::unix::io::AsRawFd;
use std::path::Path;

/// The data extents `(offset, len)` of `f`, found with SEEK_DATA/SEEK_HOLE.
/// Falls back to one extent covering the file where the filesystem can't tell.
pub fn data_extents(f: &File) -> std::io::Result<Vec<(u64, u64)>> {
    let len = f.metadata()?.len();
    let fd = f.as_raw_fd();
    let mut out = Vec::new();
    let mut pos: i64 = 0;
    while (pos as u64) < len {
        let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::ENXIO) => break, // only a hole remains
                Some(libc::EINVAL) if out.is_empty() => return Ok(vec![(0, len)]),
                _ => return Err(e),
            }
        }
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(std::io::Error::last_os_error());
        }
        out.push((data as u64, (hole - data) as u64));
        pos = hole;
    }
    Ok(out)
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
    let d = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(dst)
        .with_context(|| format!("creating {}", dst.display()))?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom, Write};

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
