//! Disk formats: GPT (fresh cloud layout, grow), FAT in userspace (the ESP, the
//! cloud-init seed), filesystem probes (ext and FAT superblocks), the qcow2 header,
//! sparse files, and the hole-skipping checksum. Nothing here knows about images or
//! build stages.

pub mod checksum;
pub mod fat;
pub mod gpt;
pub mod probe;
pub mod qcow2;
pub mod sparse;

use std::io::Read;

/// Read as many bytes as are there, up to `buf.len()` (a short file or stream is not an
/// error); returns how many were read.
pub fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}
