//! Filesystem probes: which filesystem starts a partition, with its label and UUID, read
//! from its first bytes (the ext superblock at byte 1024, the FAT boot sector), the way
//! `blkid` reports them.

use anyhow::{Context, Result, bail};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// How many bytes from the start of a partition [`probe`] needs: the FAT boot sector and
/// the ext superblock at 1024.
pub const PROBE_LEN: u64 = 2048;

/// A filesystem recognised at the start of a partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probed {
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

/// An ext or FAT filesystem at the start of `head` (the first [`PROBE_LEN`] bytes of a
/// partition, or fewer if the partition is smaller).
pub fn probe(head: &[u8]) -> Option<Probed> {
    probe_ext(head).or_else(|| probe_fat(head))
}

/// An ext2/3/4 superblock at byte 1024 of `head`.
pub fn probe_ext(head: &[u8]) -> Option<Probed> {
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
    Some(Probed {
        fs_type: fs_type.to_string(),
        version: None,
        label: c_string(&sb[0x78..0x88]),
        uuid: uuid_text(&sb[0x68..0x78]),
    })
}

/// A FAT boot sector at the start of `head`: "vfat", FATnn, label, volume id.
pub fn probe_fat(head: &[u8]) -> Option<Probed> {
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
    let label = String::from_utf8_lossy(&bs[ext + 7..ext + 18]).trim_end().to_string();
    let version = if fat32 {
        "FAT32".to_string()
    } else {
        String::from_utf8_lossy(fs_name).trim_end().to_string()
    };
    Some(Probed {
        fs_type: "vfat".to_string(),
        version: Some(version),
        label: (!label.is_empty() && label != "NO NAME").then_some(label),
        uuid: format!("{:04X}-{:04X}", id >> 16, id & 0xFFFF),
    })
}

/// The UUID of the ext2/3/4 filesystem starting at byte `offset` of the file at `path`,
/// as blkid prints it.
pub fn ext_uuid(path: &Path, offset: u64) -> Result<String> {
    let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut head = vec![0u8; PROBE_LEN as usize];
    f.read_exact_at(&mut head, offset)
        .with_context(|| format!("reading {} at {offset}", path.display()))?;
    match probe_ext(&head) {
        Some(p) => Ok(p.uuid),
        None => bail!("no ext4 filesystem at offset {offset} of {}", path.display()),
    }
}

/// A 16-byte UUID as `8-4-4-4-12` lower-case hex.
fn uuid_text(b: &[u8]) -> String {
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// A NUL-padded string; none if empty.
fn c_string(b: &[u8]) -> Option<String> {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    let s = String::from_utf8_lossy(&b[..end]).into_owned();
    (!s.is_empty()).then_some(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fat_and_ext_probes_reject_noise() {
        assert!(probe_fat(&[0u8; 2048]).is_none());
        assert!(probe_ext(&[0u8; 2048]).is_none());
        assert!(probe_ext(&[0u8; 100]).is_none());
        assert!(probe(&[0u8; 2048]).is_none());
    }

    #[test]
    fn uuid_format() {
        let b: Vec<u8> = (0..16).collect();
        assert_eq!(uuid_text(&b), "00010203-0405-0607-0809-0a0b0c0d0e0f");
    }
}
