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
use kiln::image::{diff, inspect, sbom, verify};
use kiln::publish;
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
    /// Compile every DKMS module instead of taking it from the DKMS build cache
    /// (<cache-dir>/dkms, keyed by module source, kernel, headers, compiler and signing
    /// certificate); the cache is still not written.
    #[arg(long)]
    no_dkms_cache: bool,
    /// Have DKMS sign every module it builds with this private key (unencrypted RSA,
    /// PEM or DER; needs --module-signing-cert). It is in the image only while DKMS runs
    /// and never in the output, the work directory or the cache.
    #[arg(long, value_name = "KEY", requires = "module_signing_cert")]
    module_signing_key: Option<PathBuf>,
    /// The X.509 certificate (DER or PEM) of --module-signing-key; it must match the key.
    /// The image keeps it as /var/lib/shim-signed/mok/MOK.der, for `mokutil --import`.
    #[arg(long, value_name = "CERT", requires = "module_signing_key")]
    module_signing_cert: Option<PathBuf>,
    /// Build every stage: neither start from nor store a cached layer (the root after
    /// the stages this build shares with a related definition's, <cache-dir>/layers;
    /// KILN_LAYER_CACHE_BUDGET bounds its size, default 8GiB).
    #[arg(long)]
    no_layer_cache: bool,
    /// Install exactly the packages of images/NAME.lock (`kiln lock`): every .deb fetched by
    /// pool path and checked by sha256; the build fails if apt ends with any other set.
    #[arg(long)]
    locked: bool,
    /// With --locked: no network at all; the base and every .deb come from --archive DIR
    /// (`kiln fetch`), each checked against the lock before anything is written.
    #[arg(long, requires_all = ["locked", "archive"])]
    offline: bool,
    /// The archive directory `kiln fetch` filled (used with --locked --offline).
    #[arg(long, value_name = "DIR", requires = "offline")]
    archive: Option<PathBuf>,
}

#[derive(clap::Args)]
struct PublishArgs {
    /// The build's output prefix: out/NAME (NAME.raw, NAME.json and SHA256SUMS in out/).
    image: PathBuf,
    /// Destination: s3://BUCKET/PREFIX (objects are PREFIX/NAME.raw, ...). Credentials
    /// and region come from the standard AWS chain (AWS_* variables, ~/.aws, SSO,
    /// instance roles).
    #[arg(long, value_name = "s3://BUCKET/PREFIX")]
    to: String,
    /// An S3-compatible endpoint instead of AWS (path-style requests).
    #[arg(long, value_name = "URL", env = "KILN_S3_ENDPOINT")]
    endpoint: Option<String>,
    /// Form of the image URL written into the payload's spec.uri: virtual-hosted,
    /// path-style, or a template with {key} and optionally {bucket}, {region}, {endpoint}
    /// (a CDN: https://images.example.com/{key}) [default: virtual-hosted on AWS,
    /// path-style with --endpoint].
    #[arg(long, value_name = "STYLE|TEMPLATE", env = "KILN_PUBLISH_URL")]
    url: Option<publish::url::UrlTemplate>,
    /// Multipart part size in MiB (raised to what S3's 5 MiB minimum and 10 000-part
    /// limit need; a resumed upload keeps its own).
    #[arg(long, value_name = "MIB", default_value_t = publish::s3::DEFAULT_PART_SIZE >> 20)]
    part_size_mib: u64,
    /// Parts in memory at once (read, queued or being sent); memory is bounded by
    /// jobs x part size.
    #[arg(long, default_value_t = publish::s3::DEFAULT_JOBS as u64, value_parser = clap::value_parser!(u64).range(1..=64))]
    jobs: u64,
    /// Print what was published as JSON on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct LockArgs {
    /// Image definition (images/NAME.toml); the lock is written next to it (images/NAME.lock).
    def: PathBuf,
    /// Lock a variant: set the definition's parameter NAME to VALUE (repeatable). A variant
    /// has its own lock file, images/NAME+NAME=VALUE.lock.
    #[arg(long = "set", value_name = "NAME=VALUE")]
    set: Vec<Setting>,
    /// Base to resolve on (cloud image or root tarball) instead of the definition's pinned
    /// [base]; the lock records its file name, sha256 and size.
    #[arg(long, conflicts_with = "base_mirror")]
    base: Option<PathBuf>,
    /// Fetch the pinned base from this mirror (see `kiln build --base-mirror`).
    #[arg(long, value_name = "URL", env = "KILN_BASE_MIRROR")]
    base_mirror: Option<String>,
    /// Package and base cache shared across builds (the resolution's build log is kept in
    /// CACHE/lock/NAME/).
    #[arg(long, default_value = "/var/cache/kiln", env = "KILN_CACHE_DIR")]
    cache_dir: PathBuf,
    /// Point repository ID at a mirror or local directory: ID=URI[,key=PATH]. The lock
    /// records the override, and `build --locked` then demands the same one.
    #[arg(long = "repo-override", value_name = "ID=URI[,key=PATH]")]
    repo_override: Vec<apt::RepoOverride>,
    /// Replace an existing lock (prints the package changes).
    #[arg(long, conflicts_with = "check")]
    update: bool,
    /// Only tell whether the lock is stale (the definition's inputs changed, or a
    /// repository serves a new Release file); exits 1 if it is. Builds nothing.
    #[arg(long)]
    check: bool,
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
    /// Resolve a definition (a build that stops before finalize) and write images/NAME.lock:
    /// the base, the repositories' Release files, every installed package with its pool
    /// path and sha256, SOURCE_DATE_EPOCH.
    Lock(LockArgs),
    /// Download everything a locked build needs (the base, every .deb, the repositories'
    /// keys) into an archive directory, each checked against the lock's sha256, for
    /// `kiln build --locked --offline --archive DIR`.
    Fetch {
        /// Image definition (images/NAME.toml) with its lock (images/NAME.lock).
        def: PathBuf,
        /// The variant whose lock to fetch for: set the definition's parameter NAME to VALUE
        /// (repeatable; its lock is images/NAME+NAME=VALUE.lock).
        #[arg(long = "set", value_name = "NAME=VALUE")]
        set: Vec<Setting>,
        /// The archive directory to fill (kept files with the right sha256 are not fetched again).
        #[arg(long, value_name = "DIR")]
        archive: PathBuf,
        /// The lock's base, when it is not the definition's pinned [base] (a `--base` file).
        #[arg(long, value_name = "FILE")]
        base: Option<PathBuf>,
        /// Package and base cache: .debs and the base already there are copied, not downloaded.
        #[arg(long, default_value = "/var/cache/kiln", env = "KILN_CACHE_DIR")]
        cache_dir: PathBuf,
        /// Fetch the pinned base from this mirror (see `kiln build --base-mirror`).
        #[arg(long, value_name = "URL", env = "KILN_BASE_MIRROR")]
        base_mirror: Option<String>,
    },
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
        /// Every NVIDIA module must be signed by NAME (what `modinfo -F signer` shows: the
        /// signing certificate's CN); overrides the definition's `expect.module_signer`.
        /// Without either, the signers are only reported.
        #[arg(long, value_name = "NAME")]
        module_signer: Option<String>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Upload a built image to S3 or an S3-compatible store (multipart, resumable,
    /// checked against SHA256SUMS and after upload), with SHA256SUMS, the SBOM and lock
    /// when present, and the payload, whose spec.uri becomes the image's URL.
    Publish(PublishArgs),
    /// Validate a registration payload against the spec's schema and POST it to the
    /// platform's API (token from --token-file or $KILN_API_TOKEN).
    Register {
        /// The payload (out/NAME.json).
        payload: PathBuf,
        /// The API URL the payload is POSTed to; a 409 is checked with GET URL/NAME.
        #[arg(long, value_name = "URL")]
        api: String,
        /// File whose first line is the API token [default: $KILN_API_TOKEN].
        #[arg(long, value_name = "FILE")]
        token_file: Option<PathBuf>,
        /// Print the request (token redacted) instead of sending it.
        #[arg(long)]
        dry_run: bool,
    },
    /// Write the SBOM (SPDX 2.3 JSON) of an existing image (raw or qcow2), read from its
    /// dpkg database without mounting it; what every build writes as NAME.spdx.json.
    Sbom {
        /// The image (raw or qcow2).
        image: PathBuf,
        /// The document's and the image package's name [default: the image's file name
        /// without its extension].
        #[arg(long)]
        name: Option<String>,
        /// Write the document to FILE instead of stdout.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Compare two images (raw or qcow2) without mounting them: installed packages added,
    /// removed and changed, then files (type, mode, owner, size, content sha256, symlink
    /// target).
    Diff {
        /// The old image (raw or qcow2).
        a: PathBuf,
        /// The new image (raw or qcow2).
        b: PathBuf,
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
        /// Boot with Secure Boot enforced: OVMF's Secure Boot firmware with Microsoft's keys
        /// enrolled (UEFI only: both boots go through it), the image's own shim, GRUB and
        /// kernel; the guest must report Secure Boot on, kernel lockdown, and (NVIDIA
        /// images) a `nvidia` module the kernel accepts.
        #[arg(long)]
        secure_boot: bool,
        /// With --secure-boot: the certificate (DER or PEM) that signed the image's modules,
        /// put in shim's MokList first as `mokutil --import` and MokManager would (needs
        /// virt-fw-vars, PyPI virt-firmware); the kernel must load it.
        #[arg(long, value_name = "CERT", requires = "secure_boot")]
        mok: Option<PathBuf>,
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
    let builds = match &cli.command {
        Command::Build(_) => true,
        Command::Lock(a) => !a.check,
        _ => false,
    };
    if builds
        && nix::unistd::geteuid().is_root()
        && let Err(e) = supervisor::enter_own_pid_namespace().and_then(|_| mounts::enter_private_namespace())
    {
        report(&e);
        std::process::exit(1);
    }
    cancel::install();
    let is_build = builds;
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
            // Checked before anything is written: readable, and the certificate is the key's.
            let module_signing = match (&a.module_signing_key, &a.module_signing_cert) {
                (Some(k), Some(c)) => Some(build::stages::signing::SigningKey::load(k, c)?),
                _ => None,
            };
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
                    dkms_cache: !a.no_dkms_cache,
                    module_signing,
                    ..Default::default()
                },
                locked: a.locked.then_some(build::pipeline::LockedBuild { archive: a.archive }),
                resolve_only: false,
                layer_cache: !a.no_layer_cache,
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
                println!("SBOM {}", report.sbom.display());
                for w in &report.warnings {
                    println!("warning: {w}");
                }
            }
            Ok(())
        }
        Command::Lock(a) if a.check => {
            let stale = build::lock::check(&a.def, &a.set)?;
            if stale.is_empty() {
                println!("{}: the lock is up to date", a.def.display());
                Ok(())
            } else {
                println!("{}: the lock is stale:", a.def.display());
                for s in &stale {
                    println!("  - {s}");
                }
                println!("run `kiln lock --update {}` to refresh it", a.def.display());
                std::process::exit(1);
            }
        }
        Command::Lock(a) => {
            let name = kiln::definition::load_with(&a.def, &a.set)?.name;
            build::lock::cmd_lock(&build::lock::LockOpts {
                build: build::BuildOpts {
                    def: a.def,
                    base: a.base,
                    base_mirror: a.base_mirror,
                    out: a.cache_dir.join("lock").join(name),
                    base_sha256: None,
                    base_sums: None,
                    qcow2: false,
                    force: true,
                    keep_on_error: false,
                    cache_dir: a.cache_dir.clone(),
                    provision: provision::ProvisionOpts {
                        cache_dir: a.cache_dir,
                        repo_overrides: a.repo_override,
                        dkms_cache: true,
                        ..Default::default()
                    },
                    locked: None,
                    resolve_only: true,
                    layer_cache: false,
                    sets: a.set,
                },
                update: a.update,
            })
        }
        Command::Fetch {
            def,
            set,
            archive,
            base,
            cache_dir,
            base_mirror,
        } => build::archive::cmd_fetch(
            &def,
            &set,
            &archive,
            base.as_deref(),
            &cache_dir,
            base_mirror.as_deref(),
        ),
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
        Command::Publish(a) => publish::cmd_publish(&publish::PublishOpts {
            image: a.image,
            to: a.to,
            endpoint: a.endpoint,
            url: a.url,
            tuning: publish::s3::Tuning {
                part_size: a.part_size_mib << 20,
                jobs: a.jobs as usize,
            },
            json: a.json,
        }),
        Command::Register {
            payload,
            api,
            token_file,
            dry_run,
        } => publish::register::cmd_register(&publish::register::RegisterOpts {
            payload,
            api,
            token_file,
            dry_run,
        }),
        Command::Sbom { image, name, out } => sbom::cmd_sbom(&image, name.as_deref(), out.as_deref()),
        Command::Diff { a, b, json } => diff::cmd_diff(&a, &b, json),
        Command::Verify {
            image,
            def,
            set,
            module_signer,
            json,
        } => verify::cmd_verify(&image, &def, &set, module_signer, json),
        Command::BootTest {
            image,
            def,
            set,
            firmware,
            once,
            secure_boot,
            mok,
            timeout_secs,
            json,
        } => boottest::cmd_boot_test(&boottest::Opts {
            image,
            def,
            sets: set,
            firmware,
            once,
            secure_boot,
            mok,
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
