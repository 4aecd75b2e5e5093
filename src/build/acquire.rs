//! Acquire the base: verify its checksum, tell what it is from its magic bytes (never
//! its name), and turn a disk image into a validated raw disk in the cache.
//!
//! Everything here happens before kiln writes anything to the output directory, so a bad
//! base (not an image, truncated qcow2, checksum mismatch, no GPT, no ext4 root) fails
//! with nothing written.

use crate::disk::read_up_to;
use crate::error::user;
use crate::host::cmd::Cmd;
use crate::user_bail;
use anyhow::{Context, Result};
use std::io::Read;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Xz,
    Gzip,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BaseFormat {
    /// A raw disk image (GPT expected).
    Raw,
    Qcow2,
    /// A root filesystem tarball.
    Tar(Compression),
}

/// What the user says the base's SHA-256 must be.
pub enum Expected<'a> {
    None,
    Hex(&'a str),
    /// A SHA256SUMS-style file with a line for the base's file name.
    SumsFile(&'a Path),
}

const XZ_MAGIC: &[u8] = &[0xfd, b'7', b'z', b'X', b'Z', 0];
const GZ_MAGIC: &[u8] = &[0x1f, 0x8b];

/// Identify the base from its first bytes.
pub fn detect_format(path: &Path) -> Result<BaseFormat> {
    let mut f = std::fs::File::open(path).map_err(|e| {
        user(format!(
            "cannot open base {}: {e}; pass a cloud image (raw/qcow2) or a root tarball",
            path.display()
        ))
    })?;
    if f.metadata()?.is_dir() {
        user_bail!(
            "base {} is a directory; pass a cloud image (raw/qcow2) or a root tarball",
            path.display()
        );
    }
    let mut head = vec![0u8; 1024];
    let n = read_up_to(&mut f, &mut head).with_context(|| format!("reading {}", path.display()))?;
    head.truncate(n);
    if crate::disk::qcow2::is_qcow2(&head) {
        return Ok(BaseFormat::Qcow2);
    }
    if head.starts_with(XZ_MAGIC) {
        return tar_inside(path, Compression::Xz);
    }
    if head.starts_with(GZ_MAGIC) {
        return tar_inside(path, Compression::Gzip);
    }
    if is_tar_header(&head) {
        return Ok(BaseFormat::Tar(Compression::None));
    }
    if head.len() >= 520 && &head[512..520] == b"EFI PART" {
        return Ok(BaseFormat::Raw);
    }
    if head.len() >= 512 && head[510] == 0x55 && head[511] == 0xaa {
        user_bail!(
            "base {} has an MBR but no GPT partition table: kiln expects a GPT disk such as an Ubuntu cloud image",
            path.display()
        );
    }
    user_bail!(
        "base {} is not a disk image or root tarball (no qcow2, GPT, tar, xz or gzip signature); \
         pass an Ubuntu cloud image (.img/.qcow2/.raw) or a root tarball (.tar, .tar.xz, .tar.gz)",
        path.display()
    )
}

fn is_tar_header(b: &[u8]) -> bool {
    b.len() >= 512 && &b[257..262] == b"ustar"
}

/// A compressed file must hold a tar archive: decompress its first block to check.
fn tar_inside(path: &Path, c: Compression) -> Result<BaseFormat> {
    let f = std::fs::File::open(path)?;
    let mut r: Box<dyn Read> = match c {
        Compression::Xz => Box::new(xz2::read::XzDecoder::new(f)),
        Compression::Gzip => Box::new(flate2::read::GzDecoder::new(f)),
        Compression::None => Box::new(f),
    };
    let mut head = [0u8; 512];
    let n = read_up_to(&mut r, &mut head)
        .map_err(|e| user(format!("base {} is a damaged {c:?} stream: {e}", path.display())))?;
    if n < 512 || !is_tar_header(&head) {
        user_bail!(
            "base {} is {c:?}-compressed but holds no tar archive; kiln takes root tarballs (.tar, .tar.xz, .tar.gz)",
            path.display()
        );
    }
    Ok(BaseFormat::Tar(c))
}

/// Verify the base against the expected SHA-256. Returns the base's sha256 (computed
/// anyway, it keys the cache).
pub fn verify_sha256(path: &Path, expected: &Expected) -> Result<String> {
    let want = match expected {
        Expected::None => None,
        Expected::Hex(h) => Some(normalize_hex(h, "--base-sha256")?),
        Expected::SumsFile(f) => Some(sum_from_file(f, path)?),
    };
    let got = crate::disk::checksum::hex(&crate::disk::checksum::sha256_file(path, None)?);
    if let Some(want) = want {
        if want != got {
            user_bail!(
                "checksum mismatch for base {}:\n  expected {want}\n  actual   {got}\n\
                 the download is corrupt or the sum is for another file; fetch it again or fix the sum",
                path.display()
            );
        }
        tracing::info!("base {} matches its sha256 {got}", path.display());
    }
    Ok(got)
}

fn normalize_hex(h: &str, what: &str) -> Result<String> {
    let h = h.trim().to_ascii_lowercase();
    if h.len() != 64 || !h.chars().all(|c| c.is_ascii_hexdigit()) {
        user_bail!("{what}: `{h}` is not a SHA-256 (64 hex digits)");
    }
    Ok(h)
}

/// Find the line for `base`'s file name in a `sha256sum` style file (also accepting
/// the `*name` binary marker).
fn sum_from_file(sums: &Path, base: &Path) -> Result<String> {
    let text = std::fs::read_to_string(sums)
        .map_err(|e| user(format!("cannot read --base-sha256sums {}: {e}", sums.display())))?;
    let name = base
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    for line in text.lines() {
        let mut parts = line.splitn(2, char::is_whitespace);
        let (Some(sum), Some(file)) = (parts.next(), parts.next()) else {
            continue;
        };
        let file = file.trim_start().trim_start_matches('*');
        if file == name || Path::new(file).file_name().is_some_and(|f| f.to_string_lossy() == name) {
            return normalize_hex(sum, &format!("{} line for {name}", sums.display()));
        }
    }
    user_bail!(
        "{} has no line for {name}; add one or pass --base-sha256",
        sums.display()
    )
}

/// Validate a qcow2 and convert it to a sparse raw file at `dest`.
pub fn qcow2_to_raw(src: &Path, dest: &Path) -> Result<()> {
    // `qemu-img check` reads every L1/L2 table and refcount block: a truncated or
    // damaged qcow2 fails here with nothing converted.
    if let Err(e) = Cmd::new("qemu-img").args(["check", "-q", "-f", "qcow2"]).arg(src).run() {
        return Err(user(format!(
            "base {} is a damaged or truncated qcow2 (qemu-img check failed); download it again",
            src.display()
        )))
        .context(format!("{e:#}"));
    }
    let tmp = dest.with_extension("raw.converting");
    Cmd::new("qemu-img")
        .args(["convert", "-f", "qcow2", "-O", "raw", "-S", "4k"])
        .arg(src)
        .arg(&tmp)
        .run()
        .map_err(|e| user(format!("converting qcow2 base {} failed: {e:#}", src.display())))?;
    std::fs::rename(&tmp, dest).with_context(|| format!("renaming {}", tmp.display()))?;
    Ok(())
}

/// Check that a raw disk has a GPT and an ext4 root partition that fits `target_size`.
pub fn validate_disk(path: &Path, shown_as: &Path, target_size: u64) -> Result<crate::disk::gpt::Layout> {
    let layout =
        crate::disk::gpt::read_layout(path).map_err(|e| user(format!("base {}: {e:#}", shown_as.display())))?;
    let Some(root) = layout.root() else {
        user_bail!(
            "base {} has no Linux filesystem partition to use as the root",
            shown_as.display()
        );
    };
    let mut sb = [0u8; 2];
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::open(path)?;
        f.read_exact_at(&mut sb, root.offset_bytes() + 1024 + 0x38)
            .with_context(|| format!("reading the root superblock of {}", shown_as.display()))?;
    }
    if u16::from_le_bytes(sb) != 0xEF53 {
        user_bail!(
            "base {}: partition {} holds no ext4 filesystem; kiln needs an ext4 root such as Ubuntu's cloudimg-rootfs",
            shown_as.display(),
            root.number
        );
    }
    if layout.disk_size > target_size {
        user_bail!(
            "base {} is {} bytes, larger than the target disk size of {} bytes; raise disk_size in the image definition",
            shown_as.display(),
            layout.disk_size,
            target_size
        );
    }
    Ok(layout)
}

/// Where a base's raw form is cached, keyed by the base's sha256.
pub fn cached_raw(cache_dir: &Path, sha256: &str) -> PathBuf {
    cache_dir.join("bases").join(format!("{sha256}.raw"))
}

/// Where the decompressed form of a compressed root tarball with this sha256 is cached.
pub fn cached_tar(cache_dir: &Path, sha256: &str) -> PathBuf {
    cache_dir.join("bases").join(format!("{sha256}.tar"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, data: &[u8]) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, data).unwrap();
        p
    }

    fn tar_bytes() -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(3);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, "etc/hostname", &b"abc"[..]).unwrap();
        b.into_inner().unwrap()
    }

    #[test]
    fn detects_by_magic_not_name() {
        let d = tempfile::tempdir().unwrap();
        let t = tar_bytes();
        let p = write(d.path(), "image.qcow2", &t);
        assert_eq!(detect_format(&p).unwrap(), BaseFormat::Tar(Compression::None));
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &t).unwrap();
        let p = write(d.path(), "x.img", &gz.finish().unwrap());
        assert_eq!(detect_format(&p).unwrap(), BaseFormat::Tar(Compression::Gzip));
        let mut xz = xz2::write::XzEncoder::new(Vec::new(), 1);
        std::io::Write::write_all(&mut xz, &t).unwrap();
        let p = write(d.path(), "x.tar.gz", &xz.finish().unwrap());
        assert_eq!(detect_format(&p).unwrap(), BaseFormat::Tar(Compression::Xz));
        let mut q = b"QFI\xfb".to_vec();
        q.resize(1024, 0);
        let p = write(d.path(), "x.tar", &q);
        assert_eq!(detect_format(&p).unwrap(), BaseFormat::Qcow2);
    }

    #[test]
    fn rejects_non_images_as_user_errors() {
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), "notes.txt", b"hello world, not an image\n");
        let e = detect_format(&p).unwrap_err();
        assert_eq!(crate::error::exit_code(&e), 2);
        assert!(e.to_string().contains("not a disk image or root tarball"), "{e}");
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &[1u8; 4096]).unwrap();
        let p = write(d.path(), "x.tar.gz", &gz.finish().unwrap());
        assert!(
            detect_format(&p)
                .unwrap_err()
                .to_string()
                .contains("holds no tar archive")
        );
        let mut mbr = vec![0u8; 1024];
        mbr[510] = 0x55;
        mbr[511] = 0xaa;
        let p = write(d.path(), "mbr.img", &mbr);
        assert!(detect_format(&p).unwrap_err().to_string().contains("no GPT"));
        let e = detect_format(&d.path().join("missing.img")).unwrap_err();
        assert_eq!(crate::error::exit_code(&e), 2);
    }

    #[test]
    fn checksum_mismatch_prints_both_sums() {
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), "base.tar", b"abc");
        let good = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(verify_sha256(&p, &Expected::Hex(good)).unwrap(), good);
        let bad = "00".repeat(32);
        let e = verify_sha256(&p, &Expected::Hex(&bad)).unwrap_err().to_string();
        assert!(e.contains(&bad) && e.contains(good), "{e}");
        let sums = write(
            d.path(),
            "SHA256SUMS",
            format!("{bad} *other.img\n{good} *base.tar\n").as_bytes(),
        );
        assert_eq!(verify_sha256(&p, &Expected::SumsFile(&sums)).unwrap(), good);
        let sums = write(d.path(), "S2", format!("{good}  other.img\n").as_bytes());
        assert!(
            verify_sha256(&p, &Expected::SumsFile(&sums))
                .unwrap_err()
                .to_string()
                .contains("no line for base.tar")
        );
        assert!(verify_sha256(&p, &Expected::Hex("xyz")).is_err());
    }
}
