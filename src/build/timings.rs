//! Per-stage wall time, CPU time (kiln and its children), bytes downloaded and bytes
//! written, logged for every build and printed as a table by `--timings`.

use crate::host::progress::human_size;
use serde::Serialize;
use std::time::Instant;

#[derive(Debug, Clone, Serialize)]
pub struct StageTiming {
    pub stage: String,
    pub wall_s: f64,
    pub cpu_s: f64,
    pub downloaded_bytes: u64,
    pub written_bytes: u64,
}

#[derive(Default)]
pub struct Timings {
    pub stages: Vec<StageTiming>,
    current: Option<(String, Instant, f64, u64)>,
    /// Bytes fetched during the current stage, reported by the stage itself.
    pub downloaded: u64,
}

fn cpu_seconds() -> f64 {
    let mut total = 0.0;
    for who in [libc::RUSAGE_SELF, libc::RUSAGE_CHILDREN] {
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        if unsafe { libc::getrusage(who, &mut ru) } == 0 {
            let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
            total += tv(ru.ru_utime) + tv(ru.ru_stime);
        }
    }
    total
}

/// Bytes written to storage by kiln so far (children's counts arrive when they exit).
fn written_bytes() -> u64 {
    let Ok(io) = std::fs::read_to_string("/proc/self/io") else {
        return 0;
    };
    io.lines()
        .find_map(|l| l.strip_prefix("write_bytes:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

impl Timings {
    /// Start timing a stage (ending the one before). Stage boundaries go through
    /// [`crate::build::boundary`], which also checks for cancellation.
    pub fn begin(&mut self, stage: &str) {
        self.end();
        tracing::info!("== stage {stage}");
        self.downloaded = 0;
        self.current = Some((stage.to_string(), Instant::now(), cpu_seconds(), written_bytes()));
    }

    pub fn end(&mut self) {
        if let Some((stage, t0, c0, w0)) = self.current.take() {
            let t = StageTiming {
                wall_s: t0.elapsed().as_secs_f64(),
                cpu_s: cpu_seconds() - c0,
                downloaded_bytes: self.downloaded,
                written_bytes: written_bytes().saturating_sub(w0),
                stage,
            };
            tracing::info!(
                "stage {} done in {:.1}s (cpu {:.1}s, downloaded {}, written {})",
                t.stage,
                t.wall_s,
                t.cpu_s,
                human_size(t.downloaded_bytes),
                human_size(t.written_bytes)
            );
            self.stages.push(t);
        }
    }

    pub fn table(&self) -> String {
        let mut s = format!(
            "{:<22} {:>9} {:>9} {:>12} {:>12}\n",
            "stage", "wall", "cpu", "downloaded", "written"
        );
        let (mut w, mut c, mut d, mut b) = (0.0, 0.0, 0, 0);
        for t in &self.stages {
            s += &format!(
                "{:<22} {:>8.1}s {:>8.1}s {:>12} {:>12}\n",
                t.stage,
                t.wall_s,
                t.cpu_s,
                human_size(t.downloaded_bytes),
                human_size(t.written_bytes)
            );
            w += t.wall_s;
            c += t.cpu_s;
            d += t.downloaded_bytes;
            b += t.written_bytes;
        }
        s += &format!(
            "{:<22} {:>8.1}s {:>8.1}s {:>12} {:>12}\n",
            "total",
            w,
            c,
            human_size(d),
            human_size(b)
        );
        s
    }
}
