//! The build's whole log, next to its outputs (`NAME.build.log`).
//!
//! The CLI installs [`BuildLog`] as a second tracing writer (debug level, so the output
//! of every command is in it, not only the last lines of a failing one). Until the build
//! knows its output directory and image name, lines are kept in memory (bounded); [`open`]
//! writes them out and appends from then on.

use anyhow::{Context, Result};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// What is kept in memory before the log file is known.
const EARLY_LIMIT: usize = 8 << 20;

struct Sink {
    early: Vec<u8>,
    file: Option<(PathBuf, std::fs::File)>,
}

static SINK: Mutex<Sink> = Mutex::new(Sink {
    early: Vec::new(),
    file: None,
});

/// Start writing the log to `path` (replacing an older one), with what was logged so far.
pub fn open(path: &Path) -> Result<()> {
    let mut f = std::fs::File::create(path).with_context(|| format!("creating the build log {}", path.display()))?;
    let mut s = SINK.lock().unwrap_or_else(|e| e.into_inner());
    f.write_all(&std::mem::take(&mut s.early))
        .with_context(|| format!("writing the build log {}", path.display()))?;
    s.file = Some((path.to_owned(), f));
    Ok(())
}

/// The log file, once open.
pub fn path() -> Option<PathBuf> {
    SINK.lock()
        .unwrap_or_else(|e| e.into_inner())
        .file
        .as_ref()
        .map(|(p, _)| p.clone())
}

/// Append text that does not go through tracing (the final error report).
pub fn append(text: &str) {
    let _ = BuildLog.write_all(text.as_bytes());
}

/// A `tracing_subscriber` writer into the build log.
#[derive(Clone, Copy, Default)]
pub struct BuildLog;

impl Write for BuildLog {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut s = SINK.lock().unwrap_or_else(|e| e.into_inner());
        match &mut s.file {
            Some((_, f)) => f.write_all(buf)?,
            None => {
                if s.early.len() + buf.len() <= EARLY_LIMIT {
                    s.early.extend_from_slice(buf);
                }
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for BuildLog {
    type Writer = BuildLog;
    fn make_writer(&'a self) -> Self::Writer {
        BuildLog
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn early_lines_reach_the_file_and_later_ones_follow() {
        let d = tempfile::tempdir().unwrap();
        BuildLog.write_all(b"before\n").unwrap();
        let p = d.path().join("x.build.log");
        open(&p).unwrap();
        BuildLog.write_all(b"after\n").unwrap();
        append("error: boom\n");
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "before\nafter\nerror: boom\n");
        assert_eq!(path().as_deref(), Some(p.as_path()));
    }
}
