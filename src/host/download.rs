//! HTTP(S) downloads: small files into memory, large ones into a resumable `.partial`
//! file, with connect and read timeouts, retries with exponential backoff, HTTP Range
//! resume and a progress bar. Errors say what failed (DNS, connect, timeout, HTTP
//! status, I/O) for which URL. `file://` URLs are read from the local filesystem (an
//! air-gapped mirror on a mounted share). Nothing here knows about images.

use crate::host::progress;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::time::Duration;

/// Timeouts and retries. [`Policy::from_env`] reads `KILN_HTTP_TIMEOUT_SECS` (connect and
/// per-read timeout), `KILN_HTTP_RETRIES` (attempts after the first) and
/// `KILN_HTTP_BACKOFF_MS` (first pause between attempts, doubled each time, at most 30 s).
#[derive(Debug, Clone)]
pub struct Policy {
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    pub retries: u32,
    pub backoff: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            connect_timeout: Duration::from_secs(30),
            read_timeout: Duration::from_secs(60),
            retries: 4,
            backoff: Duration::from_secs(2),
        }
    }
}

impl Policy {
    pub fn from_env() -> Self {
        let num = |k: &str| std::env::var(k).ok().and_then(|v| v.trim().parse::<u64>().ok());
        let mut p = Policy::default();
        if let Some(s) = num("KILN_HTTP_TIMEOUT_SECS").filter(|s| *s > 0) {
            p.connect_timeout = Duration::from_secs(s);
            p.read_timeout = Duration::from_secs(s);
        }
        if let Some(r) = num("KILN_HTTP_RETRIES") {
            p.retries = r.min(100) as u32;
        }
        if let Some(ms) = num("KILN_HTTP_BACKOFF_MS") {
            p.backoff = Duration::from_millis(ms);
        }
        p
    }

    fn pause(&self, attempt: u32) -> Duration {
        self.backoff
            .saturating_mul(1u32 << attempt.min(10))
            .min(Duration::from_secs(30))
    }
}

/// What went wrong, in the words an error message needs.
#[derive(Debug, Clone, PartialEq)]
pub enum Failure {
    /// The host name did not resolve.
    Dns(String),
    /// No TCP (or TLS) connection.
    Connect(String),
    /// Connected, but no answer within the timeout.
    Timeout(String),
    /// The server answered with an error status.
    Status(u16),
    /// The transfer broke off, or a local file could not be read or written.
    Io(String),
    /// A response kiln cannot use (bad URL, protocol error, oversized).
    Other(String),
}

impl Failure {
    /// A short name of the kind of failure: DNS, connect, timeout, HTTP status, I/O.
    pub fn kind(&self) -> &'static str {
        match self {
            Failure::Dns(_) => "DNS",
            Failure::Connect(_) => "connect",
            Failure::Timeout(_) => "timeout",
            Failure::Status(_) => "HTTP status",
            Failure::Io(_) => "I/O",
            Failure::Other(_) => "download",
        }
    }

    /// Worth another attempt: a network hiccup or a server-side error, not a 404.
    pub(crate) fn transient(&self) -> bool {
        match self {
            Failure::Connect(_) | Failure::Timeout(_) | Failure::Io(_) => true,
            Failure::Status(s) => *s >= 500 || *s == 408 || *s == 429,
            Failure::Dns(_) | Failure::Other(_) => false,
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Dns(h) => write!(f, "DNS: cannot resolve the host name {h}"),
            Failure::Connect(e) => write!(f, "connect: no connection to the server ({e})"),
            Failure::Timeout(e) => write!(f, "timeout: the server stopped answering ({e})"),
            Failure::Status(s) => write!(f, "HTTP status {s} {}", reason(*s)),
            Failure::Io(e) => write!(f, "I/O: {e}"),
            Failure::Other(e) => write!(f, "{e}"),
        }
    }
}

fn reason(s: u16) -> &'static str {
    match s {
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        408 => "Request Timeout",
        410 => "Gone",
        416 => "Range Not Satisfiable",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "",
    }
}

/// A failed download: the URL, the last failure and how many attempts were made.
#[derive(Debug)]
pub struct DownloadError {
    pub url: String,
    pub failure: Failure,
    pub attempts: u32,
}

impl fmt::Display for DownloadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.url, self.failure)?;
        if self.attempts > 1 {
            write!(f, " (after {} attempts)", self.attempts)?;
        }
        Ok(())
    }
}

impl std::error::Error for DownloadError {}

pub(crate) fn agent(p: &Policy) -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_connect(Some(p.connect_timeout))
        .timeout_resolve(Some(p.connect_timeout))
        .timeout_recv_response(Some(p.read_timeout))
        .timeout_per_read(Some(p.read_timeout))
        .http_status_as_error(false)
        .user_agent(concat!("kiln/", env!("CARGO_PKG_VERSION")))
        .build()
        .into()
}

pub(crate) fn classify(e: ureq::Error, url: &str) -> Failure {
    use ureq::Error as E;
    match e {
        E::HostNotFound => Failure::Dns(host_of(url)),
        E::ConnectionFailed => Failure::Connect("connection failed".into()),
        E::Timeout(t) => Failure::Timeout(format!("no data within the {t:?} timeout")),
        E::StatusCode(s) => Failure::Status(s),
        E::Io(io) => match io_failure(&io) {
            // The resolver's errors come as plain I/O errors.
            Failure::Io(m) if is_dns(&m) => Failure::Dns(format!("{} ({m})", host_of(url))),
            f => f,
        },
        other => Failure::Other(other.to_string()),
    }
}

pub(crate) fn io_failure(io: &std::io::Error) -> Failure {
    use std::io::ErrorKind as K;
    match io.kind() {
        K::ConnectionRefused
        | K::ConnectionReset
        | K::ConnectionAborted
        | K::NotConnected
        | K::HostUnreachable
        | K::NetworkUnreachable
        | K::AddrNotAvailable => Failure::Connect(io.to_string()),
        K::TimedOut | K::WouldBlock => Failure::Timeout(io.to_string()),
        _ => {
            // ureq wraps its own timeouts and transport errors in io::Error while reading a body.
            if let Some(inner) = io.get_ref().and_then(|e| e.downcast_ref::<ureq::Error>())
                && let ureq::Error::Timeout(t) = inner
            {
                return Failure::Timeout(format!("no data within the {t:?} timeout"));
            }
            let s = io.to_string();
            if s.to_ascii_lowercase().contains("timeout") || s.to_ascii_lowercase().contains("timed out") {
                Failure::Timeout(s)
            } else {
                Failure::Io(s)
            }
        }
    }
}

fn is_dns(msg: &str) -> bool {
    let m = msg.to_ascii_lowercase();
    [
        "lookup address",
        "name or service not known",
        "name resolution",
        "no address associated",
    ]
    .iter()
    .any(|p| m.contains(p))
}

fn host_of(url: &str) -> String {
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    rest.split(['/', '?']).next().unwrap_or(rest).to_string()
}

fn file_path(url: &str) -> Option<&Path> {
    url.strip_prefix("file://").map(Path::new)
}

/// Run `f` until it succeeds, fails for good, or the retries are spent. An attempt that
/// made progress (`f` returns `Err((failure, true))`) does not count against the retries
/// (unless there are none).
pub(crate) fn with_retries<T>(
    url: &str,
    p: &Policy,
    mut f: impl FnMut() -> Result<T, (Failure, bool)>,
) -> Result<T, DownloadError> {
    let mut attempts = 0;
    let mut failed = 0;
    loop {
        attempts += 1;
        match f() {
            Ok(v) => return Ok(v),
            Err((failure, progressed)) => {
                if progressed {
                    failed = 0;
                } else {
                    failed += 1;
                }
                // KILN_HTTP_RETRIES=0: one attempt, even if it made progress.
                let spent = failed > p.retries || p.retries == 0;
                if !failure.transient() || spent || crate::host::cancel::is_cancelled() {
                    return Err(DownloadError {
                        url: url.to_string(),
                        failure,
                        attempts,
                    });
                }
                let pause = p.pause(failed.saturating_sub(1));
                tracing::warn!("{url}: {failure}; retrying in {:.1} s", pause.as_secs_f64());
                std::thread::sleep(pause);
            }
        }
    }
}

/// A `file://` mirror's error, reported like its HTTP equivalent (a missing file is 404).
fn local_error(url: &str, e: std::io::Error) -> DownloadError {
    DownloadError {
        url: url.to_string(),
        failure: if e.kind() == std::io::ErrorKind::NotFound {
            Failure::Status(404)
        } else {
            Failure::Io(e.to_string())
        },
        attempts: 1,
    }
}

/// Fetch a small file (a checksum list, a signature) into memory, at most `limit` bytes.
pub fn fetch_bytes(url: &str, p: &Policy, limit: u64) -> Result<Vec<u8>, DownloadError> {
    if let Some(path) = file_path(url) {
        return std::fs::read(path).map_err(|e| local_error(url, e));
    }
    let agent = agent(p);
    with_retries(url, p, || {
        tracing::debug!("GET {url}");
        let resp = agent.get(url).call().map_err(|e| (classify(e, url), false))?;
        let status = resp.status().as_u16();
        if status != 200 {
            return Err((Failure::Status(status), false));
        }
        let mut data = Vec::new();
        resp.into_body()
            .into_reader()
            .take(limit + 1)
            .read_to_end(&mut data)
            .map_err(|e| (io_failure(&e), false))?;
        if data.len() as u64 > limit {
            return Err((Failure::Other(format!("larger than the {limit} bytes expected")), false));
        }
        Ok(data)
    })
}

/// Download `url` into `partial`, resuming what an earlier attempt left there with an
/// HTTP Range request. On success `partial` holds the whole file; on failure it keeps
/// what arrived (if anything), for the next attempt or run to resume. Returns the file's
/// size.
pub fn fetch_to_file(url: &str, partial: &Path, p: &Policy, label: &str) -> Result<u64, DownloadError> {
    let io_err = |e: std::io::Error| DownloadError {
        url: url.to_string(),
        failure: Failure::Io(format!("{}: {e}", partial.display())),
        attempts: 1,
    };
    if let Some(src) = file_path(url) {
        return std::fs::copy(src, partial).map_err(|e| local_error(url, e));
    }
    let mut file = OpenOptions::new()
        .create(true)
        .append(false)
        .read(true)
        .write(true)
        .truncate(false)
        .open(partial)
        .map_err(io_err)?;
    let agent = agent(p);
    let pb = progress::bytes(0, label);
    let res = with_retries(url, p, || attempt(&agent, url, &mut file, &pb));
    pb.finish_and_clear();
    if res.is_err() && file.metadata().is_ok_and(|m| m.len() == 0) {
        // Nothing arrived: nothing to resume.
        let _ = std::fs::remove_file(partial);
    }
    let size = res?;
    file.sync_all().map_err(io_err)?;
    Ok(size)
}

/// One GET (ranged if `file` has data). `Err((failure, progressed))`.
fn attempt(
    agent: &ureq::Agent,
    url: &str,
    file: &mut File,
    pb: &indicatif::ProgressBar,
) -> Result<u64, (Failure, bool)> {
    let local = |e: std::io::Error| (Failure::Io(format!("writing the download: {e}")), false);
    let have = file.metadata().map_err(local)?.len();
    let mut req = agent.get(url);
    if have > 0 {
        req = req.header("Range", format!("bytes={have}-"));
        tracing::info!("resuming {url} at byte {have}");
    } else {
        tracing::info!("downloading {url}");
    }
    let resp = req.call().map_err(|e| (classify(e, url), false))?;
    let status = resp.status().as_u16();
    let content_len = resp
        .headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let start = match status {
        206 => {
            // Content-Range: bytes START-END/TOTAL; only a range starting where we are is usable.
            let cr = resp
                .headers()
                .get("content-range")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            let first = cr
                .strip_prefix("bytes ")
                .and_then(|r| r.split('-').next())
                .and_then(|s| s.trim().parse::<u64>().ok());
            if first != Some(have) {
                file.set_len(0).map_err(local)?;
                return Err((
                    Failure::Io(format!("the server resumed at the wrong place ({cr})")),
                    false,
                ));
            }
            have
        }
        200 => {
            if have > 0 {
                tracing::info!("{url}: the server ignored the Range request; starting over");
            }
            file.set_len(0).map_err(local)?;
            0
        }
        416 if have > 0 => {
            // What we have is not a prefix the server can continue: start over.
            file.set_len(0).map_err(local)?;
            return Err((
                Failure::Io("the partial download does not fit the file on the server".into()),
                false,
            ));
        }
        s => return Err((Failure::Status(s), false)),
    };
    file.seek(SeekFrom::Start(start)).map_err(local)?;
    pb.set_length(start + content_len.unwrap_or(0));
    pb.set_position(start);
    let mut reader = resp.into_body().into_reader();
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = start;
    loop {
        if crate::host::cancel::is_cancelled() {
            let _ = file.flush();
            return Err((Failure::Other("cancelled".into()), false));
        }
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => {
                let _ = file.flush();
                return Err((io_failure(&e), pos > start));
            }
        };
        file.write_all(&buf[..n]).map_err(local)?;
        pos += n as u64;
        pb.set_position(pos);
    }
    if let Some(len) = content_len
        && pos != start + len
    {
        return Err((
            Failure::Io(format!("the transfer ended after {} of {len} bytes", pos - start)),
            pos > start,
        ));
    }
    file.flush().map_err(local)?;
    Ok(pos)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_name_their_kind() {
        assert_eq!(Failure::Status(404).to_string(), "HTTP status 404 Not Found");
        assert!(Failure::Dns("x.invalid".into()).to_string().starts_with("DNS"));
        assert!(!Failure::Status(404).transient());
        assert!(Failure::Status(503).transient());
        assert!(Failure::Timeout("t".into()).transient());
        assert_eq!(host_of("https://a.example:8080/x/y"), "a.example:8080");
        let e = DownloadError {
            url: "http://h/f".into(),
            failure: Failure::Connect("refused".into()),
            attempts: 3,
        };
        assert_eq!(
            e.to_string(),
            "http://h/f: connect: no connection to the server (refused) (after 3 attempts)"
        );
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        let p = Policy {
            backoff: Duration::from_secs(2),
            ..Policy::default()
        };
        assert_eq!(p.pause(0), Duration::from_secs(2));
        assert_eq!(p.pause(2), Duration::from_secs(8));
        assert_eq!(p.pause(9), Duration::from_secs(30));
    }
}
