//! The `kiln` command: parses arguments and calls the library (`src/lib.rs`).

use anyhow::Result;
use clap::{Parser, Subcommand};
use kiln::boottest;
use kiln::build::stages::apt;
use kiln::build::{self, provision, timings};
use kiln::definition::Setting;
use kiln::disk::checksum;
use kiln::error;
use kiln::host::{buildlog, cancel, doctor, mounts, rootdir, supervisor};
use kiln::image::{inspect, verify};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "kiln",
    version,
    about = "Build GPU Kubernetes node images offline, without booting a VM",
    help_expected = true
)]
struct Cli {
    /// More log output (-v debug, -vv trace). RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct BuildArgs {
    /// Image definition (images/NAME.toml).
    def: PathBuf,
    /// Choose a variant: set the definition's parameter NAME to VALUE (repeatable;
    /// `kiln list` shows the parameters and their allowed values).
    #[arg(long = "set", value_name = "NAME=VALUE")]
    set: Vec<Setting>,
    /// Base: an Ubuntu cloud image (raw or qcow2) or a root tarball (.tar, .tar.xz, .tar.gz).
    /// Without it: the definition's pinned [base], downloaded and verified into the cache
    /// once, then reused with no network access.
    #[arg(long, conflicts_with = "base_mirror")]
    base: Option<PathBuf>,
    /// Fetch the pinned base from this mirror: replaces the scheme, host and path up to
    /// /releases/ of its URLs (same signature and checksum checks).
    #[arg(long, value_name = "URL", env = "KILN_BASE_MIRROR")]
    base_mirror: Option<String>,
    /// Output directory for NAME.raw, NAME.json and SHA256SUMS.
    #[arg(long)]
    out: PathBuf,
    /// Expected SHA-256 of the base.
    #[arg(long, value_name = "HEX", conflicts_with = "base_sha256sums")]
    base_sha256: Option<String>,
    /// A SHA256SUMS file with a line for the base.
    #[arg(long, value_name = "FILE")]
    base_sha256sums: Option<PathBuf>,
    /// Also write a compressed qcow2 next to the raw image.
    #[arg(long, value_enum, default_value = "raw")]
    format: OutFormat,
    /// Replace existing outputs.
    #[arg(long)]
    force: bool,
    /// Package and base cache shared across builds.
    #[arg(long, default_value = "/var/cache/kiln", env = "KILN_CACHE_DIR")]
    cache_dir: PathBuf,
    /// Point repository ID at a mirror or local directory for this build: ID=URI[,key=PATH].
    /// The image keeps the definition's repository.
    #[arg(long = "repo-override", value_name = "ID=URI[,key=PATH]")]
    repo_override: Vec<apt::RepoOverride>,
    /// Print the per-stage timing table (it is always logged).
    #[arg(long)]
    timings: bool,
    /// Print the build report as JSON on stdout.
    #[arg(long)]
    json: bool,
    /// On failure keep the partial image and the work directory for debugging (for
    /// example DKMS's make.log inside the image); `kiln doctor --fix OUT` removes them.
    #[arg(long)]
    keep_on_error: bool,
}

#[derive(Clone, Copy, PartialEq, clap::ValueEnum)]
enum OutFormat {
    Raw,
    Qcow2,
}

#[derive(Subcommand)]
enum Command {
    /// Build an image from a definition and a base (cloud image or root tarball).
    Build(BuildArgs),
    /// Download the definition's pinned base into the cache and verify it (the signature
    /// of SHA256SUMS, then the sha256), or check that it is cached; what `build` does
    /// first without --base.
    FetchBase {
        /// Image definition (images/NAME.toml) with a [base] table.
        def: PathBuf,
        /// Choose a variant: set the definition's parameter NAME to VALUE (repeatable;
        /// `kiln list` shows the parameters and their allowed values).
        #[arg(long = "set", value_name = "NAME=VALUE")]
        set: Vec<Setting>,
        /// Package and base cache shared across builds.
        #[arg(long, default_value = "/var/cache/kiln", env = "KILN_CACHE_DIR")]
        cache_dir: PathBuf,
        /// Fetch from this mirror: replaces the scheme, host and path up to /releases/ of
        /// the base's URLs.
        #[arg(long, value_name = "URL", env = "KILN_BASE_MIRROR")]
        base_mirror: Option<String>,
    },
    /// Make a base root tarball from the Ubuntu archive with mmdebstrap (the cloud
    /// image's package set), for machines that cannot reach the cloud-image host.
    Bootstrap {
        /// Ubuntu suite (codename).
        #[arg(long, default_value = "jammy")]
        suite: String,
        /// The tarball to write (.tar; .tar.gz, .tar.xz or .tar.zst compress).
        #[arg(long)]
        out: PathBuf,
        /// Package list [default: package-lists/SUITE-cloudimg.list].
        #[arg(long, value_name = "FILE")]
        package_list: Option<PathBuf>,
        /// Archive keyring [default: keys/ubuntu-archive-keyring.gpg].
        #[arg(long, value_name = "FILE")]
        keyring: Option<PathBuf>,
        /// Replace an existing output.
        #[arg(long)]
        force: bool,
    },
    /// Find (and with --fix release) build processes, loop devices, mounts, work directories and partial
    /// outputs a crashed kiln left behind.
    Doctor {
        /// Output directories to check for work directories and partial files.
        dirs: Vec<PathBuf>,
        /// End leftover session processes, unmount, detach, and remove work directories
        /// and partial outputs.
        #[arg(long)]
        fix: bool,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// List the image definitions in a directory: name, file, the definition each
    /// extends, disk size and parameters (NAME=DEFAULT{ALLOWED|...}; the input of a CI
    /// matrix).
    List {
        /// Directory of definitions.
        #[arg(default_value = "images")]
        dir: PathBuf,
        /// Machine-readable output: a JSON array of {name, file, extends, disk_size,
        /// parameters: [{name, description, default, allowed, value}]}.
        #[arg(long)]
        json: bool,
    },
    /// For host hooks: write stdin to PATH inside an image root, resolving PATH inside
    /// the root so a symlink in the image can never redirect the write onto the host.
    #[command(hide = true)]
    RootWrite {
        /// The image root (a hook's $KILN_ROOT).
        #[arg(long, env = "KILN_ROOT")]
        root: PathBuf,
        /// Path inside the image, e.g. /etc/modprobe.d/local.conf.
        path: String,
        /// File mode (octal).
        #[arg(long, default_value = "644")]
        mode: String,
    },
    /// SHA-256 of files, skipping holes (same output as sha256sum).
    Checksum {
        /// Files to hash (sparse images are read extent by extent).
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Show partitions, filesystems, OS release, kernels and key package versions of an
    /// image (raw or qcow2) without mounting it.
    Inspect {
        /// The image (raw or qcow2).
        image: PathBuf,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Check a finished image (raw or qcow2) against its definition and the spec,
    /// without mounting it; exits 1 if any check fails.
    Verify {
        /// The image (raw or qcow2).
        image: PathBuf,
        /// The image definition it was built from (images/NAME.toml).
        #[arg(long)]
        def: PathBuf,
        /// The variant it was built as: set the definition's parameter NAME to VALUE (repeatable;
        /// `kiln list` shows the parameters and their allowed values).
        #[arg(long = "set", value_name = "NAME=VALUE")]
        set: Vec<Setting>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Boot a throwaway copy of an image in QEMU through UEFI (OVMF) and/or BIOS
    /// (SeaBIOS) and check it from inside against its definition's `[expect]`; exits 1
    /// if any check fails.
    BootTest {
        /// The image (raw or qcow2); a throwaway copy is booted, the image is not changed.
        image: PathBuf,
        /// The image definition it was built from (images/NAME.toml): its `[expect]`
        /// table says what the guest must show.
        #[arg(long)]
        def: PathBuf,
        /// The variant it was built as: set the definition's parameter NAME to VALUE (repeatable;
        /// `kiln list` shows the parameters and their allowed values).
        #[arg(long = "set", value_name = "NAME=VALUE")]
        set: Vec<Setting>,
        /// Which firmware to boot through.
        #[arg(long, value_enum, default_value = "both")]
        firmware: boottest::FirmwareChoice,
        /// Boot once per firmware: skip the second UEFI (or BIOS) boot of a throwaway copy
        /// that checks each copy makes its own machine-id and SSH host keys.
        #[arg(long)]
        once: bool,
        /// Time budget per boot, split over the phases (firmware 1/5, kernel to
        /// cloud-init done 3/5, checks 1/5).
        #[arg(long, default_value_t = 600)]
        timeout_secs: u64,
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
    // While kiln is single-threaded: the build runs as PID 1 of its own PID namespace
    // (nothing it starts can outlive it; see supervisor.rs), in a private mount namespace.
    if let Command::Build(_) = cli.command
        && nix::unistd::geteuid().is_root()
        && let Err(e) = supervisor::enter_own_pid_namespace().and_then(|_| mounts::enter_private_namespace())
    {
        report(&e);
        std::process::exit(1);
    }
    cancel::install();
    let is_build = matches!(cli.command, Command::Build(_));
    init_logging(cli.verbose, is_build);
    if let Err(err) = run(cli) {
        report(&err);
        if is_build {
            buildlog::append(&report_text(&err));
            if let Some(log) = buildlog::path() {
                eprintln!("the whole build log: {}", log.display());
            }
        }
        std::process::exit(error::exit_code(&err));
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Build(a) => {
            let opts = build::BuildOpts {
                def: a.def,
                sets: a.set,
                base: a.base,
                base_mirror: a.base_mirror,
                out: a.out,
                base_sha256: a.base_sha256,
                base_sums: a.base_sha256sums,
                qcow2: a.format == OutFormat::Qcow2,
                force: a.force,
                keep_on_error: a.keep_on_error,
                cache_dir: a.cache_dir.clone(),
                provision: provision::ProvisionOpts {
                    cache_dir: a.cache_dir,
                    repo_overrides: a.repo_override,
                },
            };
            let mut t = timings::Timings::default();
            let res = build::build(&opts, &mut t);
            t.end();
            if a.timings || res.is_err() {
                eprint!("{}", t.table());
            } else {
                tracing::info!("timings:\n{}", t.table());
            }
            let report = res?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!("built {} (sha256 {})", report.raw.display(), report.sha256);
                println!("payload {}", report.payload.display());
            }
            Ok(())
        }
        Command::FetchBase {
            def,
            set,
            cache_dir,
            base_mirror,
        } => build::base::cmd_fetch_base(&def, &set, &cache_dir, base_mirror.as_deref()),
        Command::Bootstrap {
            suite,
            out,
            package_list,
            keyring,
            force,
        } => build::bootstrap::bootstrap(&build::bootstrap::BootstrapOpts {
            suite,
            out,
            package_list,
            keyring,
            force,
        }),
        Command::Doctor { dirs, fix, json } => doctor::cmd_doctor(&dirs, fix, json),
        Command::List { dir, json } => {
            let defs = kiln::definition::list(&dir)?;
            if json {
                println!("{}", serde_json::to_string(&defs)?);
            } else {
                for d in &defs {
                    // NAME=DEFAULT{ALLOWED|...} per parameter: `--set NAME=VALUE` builds a variant.
                    let params: Vec<String> = d
                        .parameters
                        .iter()
                        .map(|p| format!("{}={}{{{}}}", p.name, p.default, p.allowed.join("|")))
                        .collect();
                    println!(
                        "{}\t{}\t{}\t{}\t{}",
                        d.name,
                        d.file.display(),
                        d.extends.as_deref().unwrap_or("-"),
                        kiln::host::progress::human_size(d.disk_size),
                        if params.is_empty() {
                            "-".to_string()
                        } else {
                            params.join(" ")
                        }
                    );
                }
            }
            Ok(())
        }
        Command::RootWrite { root, path, mode } => {
            let mode = u32::from_str_radix(&mode, 8)
                .map_err(|_| error::user(format!("--mode {mode} is not an octal mode")))?;
            let mut data = Vec::new();
            std::io::Read::read_to_end(&mut std::io::stdin(), &mut data)?;
            let rd = rootdir::RootDir::open(&root)?;
            if let Some(parent) = std::path::Path::new(&path).parent() {
                rd.create_dir_all(parent, 0o755)?;
            }
            rd.write_file(&path, &data, mode)
        }
        Command::Checksum { files } => checksum::cmd_checksum(&files),
        Command::Inspect { image, json } => inspect::cmd_inspect(&image, json),
        Command::Verify { image, def, set, json } => verify::cmd_verify(&image, &def, &set, json),
        Command::BootTest {
            image,
            def,
            set,
            firmware,
            once,
            timeout_secs,
            json,
        } => boottest::cmd_boot_test(&boottest::Opts {
            image,
            def,
            sets: set,
            firmware,
            once,
            timeout_secs,
            json,
        }),
    }
}

/// Logging to stderr at the chosen level; for builds also everything at debug level
/// (every command's output) into the build log, NAME.build.log next to the outputs.
fn init_logging(verbose: u8, build_log: bool) {
    use tracing_subscriber::{EnvFilter, Layer, layer::SubscriberExt, util::SubscriberInitExt};
    let default = match verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_env("RUST_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    let stderr = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_filter(filter);
    let file = build_log.then(|| {
        tracing_subscriber::fmt::layer()
            .with_writer(buildlog::BuildLog)
            .with_ansi(false)
            .with_target(false)
            .with_filter(EnvFilter::new("debug"))
    });
    tracing_subscriber::registry().with(stderr).with(file).init();
}

fn report_text(err: &anyhow::Error) -> String {
    let mut s = format!("error: {err}\n");
    for cause in err.chain().skip(1) {
        s.push_str(&format!("  caused by: {cause}\n"));
    }
    s
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

#[cfg(test)]
mod tests {
    use super::*;

    /// clap's own checks, `help_expected` among them: every argument has help text.
    #[test]
    fn cli_is_well_formed_and_every_argument_has_help() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn root_write_is_hidden() {
        use clap::CommandFactory;
        let help = Cli::command().render_help().to_string();
        assert!(!help.contains("root-write"), "{help}");
        assert!(help.contains("doctor"), "{help}");
    }
}
