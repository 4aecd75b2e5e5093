//! Progress bars for long steps, shown only when stderr is a terminal, the two ways
//! kiln writes a size: [`human_size`] for tables and logs, [`exact_size`] where the exact
//! number of bytes matters (disk sizes), and [`print_stdout`] for a command's output.

use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;

/// Write a command's output (a report, JSON) to stdout; a closed pipe
/// (`kiln inspect IMAGE | head`) is not an error.
pub fn print_stdout(text: &str) -> anyhow::Result<()> {
    use anyhow::Context;
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other.context("writing to stdout"),
    }
}

/// A byte-counting bar of `len` bytes, hidden when stderr is not a terminal.
pub fn bytes(len: u64, msg: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template("{msg:>12} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
            .unwrap()
            .progress_chars("=> "),
    );
    pb.set_message(msg.to_string());
    pb
}

/// A spinner for a step whose size is unknown.
pub fn spinner(msg: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new_spinner();
    pb.set_message(msg.to_string());
    pb.enable_steady_tick(std::time::Duration::from_millis(200));
    pb
}

/// A size in binary units with one decimal, for tables and logs: `512 B`, `3.0 GiB`.
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// A size in GiB with its exact byte count: `20 GiB (21474836480 bytes)`, or with two
/// decimals when it is not a whole number of GiB: `2.50 GiB (2684354560 bytes)`.
pub fn exact_size(bytes: u64) -> String {
    const GIB: u64 = 1 << 30;
    if bytes.is_multiple_of(GIB) {
        format!("{} GiB ({bytes} bytes)", bytes / GIB)
    } else {
        format!("{:.2} GiB ({bytes} bytes)", bytes as f64 / GIB as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_sizes() {
        assert_eq!(human_size(512), "512 B");
        assert_eq!(human_size(3 << 30), "3.0 GiB");
        assert_eq!(human_size(4 << 20), "4.0 MiB");
        assert_eq!(human_size(1536), "1.5 KiB");
    }

    #[test]
    fn exact_sizes() {
        assert_eq!(exact_size(1 << 30), "1 GiB (1073741824 bytes)");
        assert_eq!(exact_size(5 << 29), "2.50 GiB (2684354560 bytes)");
        assert_eq!(exact_size(100 << 20), "0.10 GiB (104857600 bytes)");
    }
}
