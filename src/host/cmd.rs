//! The one runner for child processes.
//!
//! Every command kiln runs goes through [`Cmd`]: it is logged before it starts, its
//! stderr is captured (and echoed at debug level), and on failure the error carries the
//! command line, the exit status and the last lines of stderr.

use anyhow::{Context, Result, bail};
use std::ffi::{OsStr, OsString};
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// How many trailing lines of output go into an error message.
pub const TAIL_LINES: usize = 20;

pub struct Cmd {
    inner: Command,
    display: String,
}

/// What a finished command printed.
#[derive(Debug)]
pub struct Output {
    pub stdout: Vec<u8>,
    pub stderr: String,
}

impl Output {
    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
}

/// Where `name` is on PATH, if it is: for optional tools whose absence deserves a
/// message saying how to install them before anything starts.
pub fn on_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

impl Cmd {
    pub fn new(program: impl AsRef<OsStr>) -> Self {
        let p = program.as_ref();
        Cmd {
            inner: Command::new(p),
            display: p.to_string_lossy().into_owned(),
        }
    }

    pub fn arg(mut self, a: impl AsRef<OsStr>) -> Self {
        let a = a.as_ref();
        self.display.push(' ');
        self.display.push_str(&shell_quote(&a.to_string_lossy()));
        self.inner.arg(a);
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        for a in args {
            self = self.arg(a);
        }
        self
    }

    pub fn env(mut self, k: impl AsRef<OsStr>, v: impl AsRef<OsStr>) -> Self {
        self.inner.env(k, v);
        self
    }

    pub fn env_clear_to(mut self, vars: &[(OsString, OsString)]) -> Self {
        self.inner.env_clear();
        for (k, v) in vars {
            self.inner.env(k, v);
        }
        self
    }

    pub fn current_dir(mut self, d: impl AsRef<Path>) -> Self {
        self.inner.current_dir(d);
        self
    }

    /// Access the underlying `Command` (pre_exec hooks and the like).
    pub fn command_mut(&mut self) -> &mut Command {
        &mut self.inner
    }

    pub fn display(&self) -> &str {
        &self.display
    }

    /// Run to completion; error if it exits non-zero.
    pub fn run(self) -> Result<Output> {
        self.run_inner()
    }

    fn run_inner(mut self) -> Result<Output> {
        tracing::info!(target: "kiln::cmd", "$ {}", self.display);
        if let Some(m) = crate::host::supervisor::session_marker() {
            self.inner.env(crate::host::supervisor::SESSION_ENV, m);
        }
        self.inner
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // A second line of defence behind the build's own PID namespace (see
        // host/supervisor.rs), which is what guarantees that nothing outlives kiln; this
        // also covers commands of `inspect`, `verify` and `boot-test`.
        unsafe {
            use std::os::unix::process::CommandExt;
            self.inner.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // Its own process group, so cancellation stops the child *and* what it
                // started (a hook's `sleep`, apt's dpkg) together.
                if libc::setpgid(0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = self
            .inner
            .spawn()
            .with_context(|| format!("could not start `{}`", self.display))?;
        let stderr = child.stderr.take().expect("piped stderr");
        let err_thread = std::thread::spawn(move || collect_lines(stderr));
        let mut stdout_pipe = child.stdout.take().expect("piped stdout");
        let out_thread = std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = stdout_pipe.read_to_end(&mut v);
            v
        });
        // Poll so that Ctrl-C / SIGTERM (which set the cancel flag) stop the child and
        // unwind kiln's guards instead of waiting for a long apt or dkms run.
        let status = loop {
            if let Some(st) = child
                .try_wait()
                .with_context(|| format!("waiting for `{}`", self.display))?
            {
                break st;
            }
            if crate::host::cancel::is_cancelled() {
                let pg = nix::unistd::Pid::from_raw(child.id() as i32);
                let _ = nix::sys::signal::killpg(pg, nix::sys::signal::Signal::SIGTERM);
                std::thread::sleep(std::time::Duration::from_millis(500));
                let _ = nix::sys::signal::killpg(pg, nix::sys::signal::Signal::SIGKILL);
                let _ = child.kill();
                let _ = child.wait();
                // Whatever escaped the process group (a daemon of a maintainer script,
                // a hook's child that ignores SIGTERM) goes too.
                crate::host::supervisor::kill_session();
                let _ = out_thread.join();
                let _ = err_thread.join();
                return Err(crate::host::cancel::Cancelled.into());
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        };
        let stdout = out_thread.join().unwrap_or_default();
        let err_lines = err_thread.join().unwrap_or_default();
        let stderr_text = err_lines.join("\n");
        // The whole stdout goes into the build log (debug level), after the command.
        if tracing::enabled!(target: "kiln::cmd", tracing::Level::DEBUG) {
            for line in String::from_utf8_lossy(&stdout).lines() {
                tracing::debug!(target: "kiln::cmd", "  > {line}");
            }
        }
        if !status.success() {
            let mut tail = err_lines;
            if tail.is_empty() {
                tail = String::from_utf8_lossy(&stdout).lines().map(str::to_owned).collect();
            }
            let start = tail.len().saturating_sub(TAIL_LINES);
            let tail = tail[start..].join("\n    ");
            let how = match status.code() {
                Some(c) => format!("exit code {c}"),
                None => format!("{status}"),
            };
            if tail.is_empty() {
                bail!("`{}` failed ({how})", self.display);
            }
            bail!("`{}` failed ({how}); last output:\n    {tail}", self.display);
        }
        Ok(Output {
            stdout,
            stderr: stderr_text,
        })
    }
}

/// Read a stream line by line, logging each line (debug: the build log has them all).
fn collect_lines(r: impl Read) -> Vec<String> {
    let mut lines = Vec::new();
    for line in BufReader::new(r).split(b'\n') {
        let Ok(line) = line else { break };
        let line = String::from_utf8_lossy(&line).trim_end_matches('\r').to_string();
        tracing::debug!(target: "kiln::cmd", "  | {line}");
        lines.push(line);
    }
    lines
}

fn shell_quote(s: &str) -> String {
    if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c)) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_carries_tail_of_stderr() {
        let err = Cmd::new("sh")
            .arg("-c")
            .arg("for i in $(seq 1 50); do echo line$i >&2; done; exit 3")
            .run()
            .unwrap_err()
            .to_string();
        assert!(err.contains("exit code 3"), "{err}");
        assert!(err.contains("line50"), "{err}");
        assert!(!err.contains("line10\n"), "only the tail is kept: {err}");
    }

    #[test]
    fn success_returns_stdout() {
        let out = Cmd::new("sh").arg("-c").arg("echo hi; echo warn >&2").run().unwrap();
        assert_eq!(out.stdout_str(), "hi\n");
        assert_eq!(out.stderr, "warn");
    }

    #[test]
    fn missing_program_is_named() {
        let err = Cmd::new("kiln-no-such-program").run().unwrap_err().to_string();
        assert!(err.contains("kiln-no-such-program"), "{err}");
    }

    #[test]
    fn on_path_finds_sh_only() {
        assert!(on_path("sh").is_some_and(|p| p.ends_with("sh")));
        assert_eq!(on_path("kiln-no-such-program"), None);
    }

    #[test]
    fn quoting() {
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("/dev/loop0"), "/dev/loop0");
    }
}
