//! kiln: builds GPU Kubernetes node images offline, by writing the disk directly.
//!
//! Pipeline stages, one module each, in build order:
//! `acquire` (base image or root tarball) → `disk` (GPT, grow, fresh layout) + `esp`
//! → `loopdev`/`mounts` (guards, private namespace) → `unpack` (root tarball) →
//! `chroot` (session) → `apt` → `overlays` → `hooks` → `scrub` → `finalize` (sparse raw,
//! `checksum`, `payload`) → `verify` → `boottest`.

mod acquire;
mod checksum;
mod cmd;
mod disk;
mod error;
mod esp;
mod inspect;
mod loopdev;
mod mounts;
mod payload;
mod rootdir;
mod unpack;

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "kiln", version, about = "Build GPU Kubernetes node images offline, without booting a VM")]
struct Cli {
    /// More log output (-v debug, -vv trace). RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// SHA-256 of files, skipping holes (same output as sha256sum).
    Checksum {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Show partitions, filesystems, OS release, kernels and key package versions of an
    /// image (raw or qcow2) without mounting it.
    Inspect {
        image: PathBuf,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

fn main() {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            std::process::exit(code);
        }
    };
    init_logging(cli.verbose);
    if let Err(err) = run(cli) {
        report(&err);
        std::process::exit(error::exit_code(&err));
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Checksum { files } => checksum::cmd_checksum(&files),
        Command::Inspect { image, json } => inspect::cmd_inspect(&image, json),
    }
}

fn init_logging(verbose: u8) {
    use tracing_subscriber::EnvFilter;
    let default = match verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_env("RUST_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}

/// Print an error chain as `error: outer\n  caused by: inner`, with a backtrace only
/// when RUST_BACKTRACE asks for one.
fn report(err: &anyhow::Error) {
    eprintln!("error: {err}");
    for cause in err.chain().skip(1) {
        eprintln!("  caused by: {cause}");
    }
    if std::env::var_os("RUST_BACKTRACE").is_some_and(|v| v != "0") {
        eprintln!("{}", err.backtrace());
    }
}
