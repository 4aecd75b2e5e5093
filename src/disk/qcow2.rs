//! The qcow2 header: enough to recognise a qcow2 file and read its version (kiln converts
//! qcow2 to raw with `qemu-img` rather than reading it itself).

/// The first bytes of a qcow2 image.
pub const MAGIC: &[u8; 4] = b"QFI\xfb";

/// Whether `head` (the first bytes of a file) starts like a qcow2 image.
pub fn is_qcow2(head: &[u8]) -> bool {
    head.starts_with(MAGIC)
}

/// The header's version (2 or 3 for images `qemu-img` writes), if `head` holds it.
pub fn version(head: &[u8]) -> Option<u32> {
    head.get(4..8).map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_fields() {
        let h = b"QFI\xfb\0\0\0\x03";
        assert!(is_qcow2(h));
        assert_eq!(version(h), Some(3));
        assert!(!is_qcow2(b"QFI"));
        assert_eq!(version(b"QFI\xfb"), None);
    }
}
