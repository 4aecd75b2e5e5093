//! Overlays: `overlays/NAME/` trees copied onto the image root with their modes kept.
//!
//! Copies go through [`RootDir`]: a symlink in the image or in the overlay can never
//! redirect a write onto the host. Symlinks in an overlay are recreated as symlinks;
//! files are owned by root.

use crate::host::rootdir::RootDir;
use anyhow::{Context, Result};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// Copy the overlay tree at `src` onto the image. Returns the number of files written.
pub fn apply(src: &Path, rd: &RootDir) -> Result<usize> {
    let mut n = 0;
    copy_dir(src, src, rd, &mut n).with_context(|| format!("applying overlay {}", src.display()))?;
    tracing::info!("overlay {}: {n} file(s)", src.display());
    Ok(n)
}

fn copy_dir(top: &Path, dir: &Path, rd: &RootDir, n: &mut usize) -> Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)?.collect::<std::io::Result<_>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let p = e.path();
        let rel = p.strip_prefix(top).unwrap();
        let dest = format!("/{}", rel.display());
        let md = std::fs::symlink_metadata(&p)?;
        let mode = md.permissions().mode() & 0o7777;
        if md.file_type().is_symlink() {
            let target = std::fs::read_link(&p)?;
            if rd.exists(&dest)? {
                rd.remove_file(&dest)?;
            }
            rd.symlink(&target, &dest)?;
        } else if md.is_dir() {
            rd.create_dir_all(&dest, mode)?;
            // /bin, /lib, /sbin are symlinks on merged-/usr images: leave those alone.
            if !rd.symlink_metadata(&dest)?.is_symlink() {
                rd.set_mode(&dest, mode)?;
            }
            copy_dir(top, &p, rd, n)?;
        } else if md.is_file() {
            let data = std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?;
            rd.write_file(&dest, &data, mode)?;
            rd.set_owner(&dest, 0, 0)?;
            *n += 1;
        } else {
            anyhow::bail!("{} is neither a file, a directory nor a symlink", p.display());
        }
    }
    Ok(())
}
