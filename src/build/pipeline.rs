//! `kiln build`: the pipeline, stage by stage.
//!
//! acquire → disk → (root filesystem: unpack | grow) → provision (chroot session, apt,
//! overlays, hooks) → scrub → finalize. Every privileged resource is a guard (`Loop`,
//! `MountStack`) released in reverse order on success, error or panic; the whole build
//! runs in a private mount namespace entered by `main` before any thread starts.

use crate::build::acquire::{self, BaseFormat, Expected};
use crate::build::lock::{LockFile, Resolution, lock_path};
use crate::build::provision::Provisioned;
use crate::build::timings::Timings;
use crate::definition::{self, ImageDef};
use crate::disk::fat::ESP_LABEL;
use crate::disk::gpt::ROOT_LABEL;
use crate::host::loopdev::Loop;
use crate::host::mounts::MountStack;
use crate::host::rootdir::RootDir;
use crate::{host::cmd::Cmd, user_bail};
use anyhow::{Context, Result};
use nix::mount::MsFlags;
use std::path::{Path, PathBuf};

#[derive(Clone)]
pub struct BuildOpts {
    pub def: PathBuf,
    /// The variant: parameter values (`--set NAME=VALUE`), defaults for the others.
    pub sets: Vec<definition::Setting>,
    /// The base to build from; `None`: the definition's pinned `[base]`, fetched into
    /// (or reused from) the cache.
    pub base: Option<PathBuf>,
    /// Replaces the host of the pinned base's URLs (`--base-mirror`).
    pub base_mirror: Option<String>,
    pub out: PathBuf,
    pub base_sha256: Option<String>,
    pub base_sums: Option<PathBuf>,
    pub qcow2: bool,
    pub force: bool,
    /// On failure keep the partial image and work directory (for `kiln doctor` to list).
    pub keep_on_error: bool,
    pub cache_dir: PathBuf,
    pub provision: crate::build::provision::ProvisionOpts,
    /// `--locked`: install exactly `images/NAME.lock`.
    pub locked: Option<LockedBuild>,
    /// Stop after provisioning, before finalize (for `kiln lock`): nothing is renamed
    /// into place and the partial image is removed.
    pub resolve_only: bool,
    /// Start from (and store) cached layers (`build/layers.rs`); off: `--no-layer-cache`.
    /// Never for locked builds or `kiln lock`.
    pub layer_cache: bool,
}

/// How a locked build gets its packages.
#[derive(Clone, Debug, Default)]
pub struct LockedBuild {
    /// `--offline --archive DIR`: the base and every .deb from `kiln fetch`'s archive,
    /// with no network access at all; `None`: fetched (sha256-checked) into the cache.
    pub archive: Option<PathBuf>,
}

#[derive(serde::Serialize)]
pub struct BuildReport {
    pub name: String,
    pub raw: PathBuf,
    pub qcow2: Option<PathBuf>,
    pub payload: PathBuf,
    pub sha256: String,
    /// The SBOM, `NAME.spdx.json`.
    pub sbom: PathBuf,
    pub timings: Vec<crate::build::timings::StageTiming>,
    /// The base the build started from and its sha256.
    pub base: PathBuf,
    pub base_sha256: String,
    /// Every installed package with its repository, pool path, size and sha256, and the
    /// repositories apt read (`None` for a build without apt).
    #[serde(skip)]
    pub resolution: Option<Resolution>,
    /// What the user must know about the image: a pinned kernel that is not the newest
    /// the archive has (also logged as warnings and printed after the build).
    pub warnings: Vec<String>,
    /// What the layer cache did (`None`: not used).
    pub layers: Option<crate::build::layers::Report>,
}

/// ext4 features for a fresh root, fixed rather than the host's mke2fs defaults: newer
/// e2fsprogs enable orphan_file and metadata_csum_seed, which jammy's e2fsck and GRUB
/// 2.06 can't read.
const MKE2FS_CONF: &str = "[defaults]\n\tbase_features = sparse_super,large_file,filetype,resize_inode,dir_index,ext_attr\n\tdefault_mntopts = acl,user_xattr\n\tblocksize = 4096\n\tinode_size = 256\n\tinode_ratio = 16384\n[fs_types]\n\text4 = {\n\t\tfeatures = has_journal,extent,huge_file,flex_bg,metadata_csum,64bit,dir_nlink,extra_isize\n\t}\n";

pub fn build(opts: &BuildOpts, timings: &mut Timings) -> Result<BuildReport> {
    if !nix::unistd::geteuid().is_root() {
        user_bail!(
            "kiln build must run as root (it attaches loop devices and mounts filesystems); run it with sudo or in a --privileged container"
        );
    }
    crate::build::boundary(timings, "acquire")?;
    if opts.locked.is_some() && !opts.sets.is_empty() {
        user_bail!(
            "--locked does not take --set: a lock (images/NAME.lock, `kiln lock`) is made for a definition's default variant"
        );
    }
    let def = definition::load_with(&opts.def, &opts.sets)?;
    crate::build::provision::check_overrides(&def, &opts.provision.repo_overrides)?;
    let locked = match &opts.locked {
        Some(lb) => {
            let path = lock_path(&def);
            let lock = LockFile::load(&path)?;
            if lock.definition != def.name {
                user_bail!(
                    "lock file {} is for definition `{}`, not `{}`",
                    path.display(),
                    lock.definition,
                    def.name
                );
            }
            lock.check_overrides(&path, &opts.provision.repo_overrides)?;
            if crate::build::lock::inputs_sha256(&def)? != lock.inputs_sha256 {
                tracing::warn!(
                    "{} changed since {} was made (kiln lock --check); building the lock as it is",
                    def.file.display(),
                    path.display()
                );
            }
            Some((lb, path, lock))
        }
        None => None,
    };
    let raw_name = format!("{}.raw", def.name);
    let final_raw = opts.out.join(&raw_name);
    let final_json = opts.out.join(format!("{}.json", def.name));
    let final_sbom = opts.out.join(crate::image::sbom::file_name(&def.name));
    if !opts.force {
        for p in [&final_raw, &final_json, &final_sbom] {
            if p.exists() {
                user_bail!(
                    "{} already exists; pass --force to replace it or choose another --out",
                    p.display()
                );
            }
        }
    }
    // The base: the one given, or the definition's pinned base from the cache (fetched
    // and verified first if need be).
    let lock_sha = locked.as_ref().map(|(_, _, l)| l.base.sha256.clone());
    let archive = locked.as_ref().and_then(|(lb, _, _)| lb.archive.clone());
    let (base_path, pinned_sha) = match (&opts.base, &locked, &archive) {
        (Some(b), _, _) => (b.clone(), lock_sha.clone()),
        (None, Some((_, path, lock)), Some(a)) => {
            let f = crate::build::archive::archived_base(a, lock);
            if !f.is_file() {
                user_bail!(
                    "the archive {} lacks the base {} that {} pins; run `kiln fetch DEF --archive {}` again",
                    a.display(),
                    f.display(),
                    path.display(),
                    a.display()
                );
            }
            (f, lock_sha.clone())
        }
        (None, _, _) => {
            let Some(spec) = &def.base else {
                user_bail!(
                    "image definition {} pins no base ([base] table) and no --base was given; pass --base FILE \
                     (a cloud image or a root tarball, e.g. one made by `kiln bootstrap`)",
                    def.file.display()
                );
            };
            let policy = crate::host::download::Policy::from_env();
            let f = crate::build::base::ensure(spec, &opts.cache_dir, opts.base_mirror.as_deref(), &policy)?;
            if let Some(want) = &lock_sha
                && want != &f.sha256
            {
                user_bail!(
                    "the lock's base has sha256 {want}, the definition {} pins {}; pass the lock's base with --base \
                     FILE or run `kiln lock --update`",
                    def.file.display(),
                    f.sha256
                );
            }
            (f.path, Some(f.sha256))
        }
    };
    let expected = match (&pinned_sha, &opts.base_sha256, &opts.base_sums) {
        (Some(h), _, _) | (None, Some(h), _) => Expected::Hex(h),
        (None, None, Some(f)) => Expected::SumsFile(f),
        (None, None, None) => Expected::None,
    };
    let format = acquire::detect_format(&base_path)?;
    let base_sha = acquire::verify_sha256(&base_path, &expected)?;
    // A base is converted once into the cache, by its sha256: a qcow2 to raw, a
    // compressed root tarball to a plain tar (later builds skip the single-threaded xz
    // or gzip decoding). The disk base, or else the tarball to unpack:
    let base = &base_path;
    let cached = |path: PathBuf, form: &str, make: &dyn Fn(&Path, &Path) -> Result<()>| -> Result<PathBuf> {
        let bases = path.parent().unwrap();
        std::fs::create_dir_all(bases).with_context(|| format!("creating cache directory {}", bases.display()))?;
        // Two builds of one base at once: the first converts, the second waits and then
        // uses its result (they used to write the same temporary file).
        let _converting = crate::host::dirlock::DirLock::acquire(bases, "converting this base")?;
        if path.exists() {
            tracing::info!(
                "using the cached {form} form of {} ({})",
                base.display(),
                path.display()
            );
        } else {
            make(base, &path)?;
        }
        Ok(path)
    };
    let (disk_base, tarball): (Option<PathBuf>, PathBuf) = match format {
        BaseFormat::Raw => (Some(base.clone()), base.clone()),
        BaseFormat::Qcow2 => {
            let raw = cached(
                acquire::cached_raw(&opts.cache_dir, &base_sha),
                "raw",
                &acquire::qcow2_to_raw,
            )?;
            (Some(raw), base.clone())
        }
        BaseFormat::Tar(acquire::Compression::None) => (None, base.clone()),
        BaseFormat::Tar(_) => {
            let tar = cached(
                acquire::cached_tar(&opts.cache_dir, &base_sha),
                "decompressed",
                &|b, d| crate::build::unpack::decompress_to(b, d).map(|_| ()),
            )?;
            (None, tar)
        }
    };
    if let Some(b) = &disk_base {
        acquire::validate_disk(b, &base_path, def.disk_size)?;
    }
    // Bases accumulate in the cache (every pinned serial, every converted form): the
    // least recently used go once the cache is over its budget, never this build's.
    let in_use: Vec<&Path> = [Some(base_path.as_path()), disk_base.as_deref(), Some(tarball.as_path())]
        .into_iter()
        .flatten()
        .collect();
    crate::build::base::prune(&opts.cache_dir, &in_use, crate::build::base::base_cache_max()?)?;
    // A locked build's .debs: all checked against the lock before anything is written.
    let locked_source = match locked {
        Some((_, lock_path, lock)) => {
            let debs = match &archive {
                Some(a) => crate::build::archive::check_archive(&lock, a)?,
                None => {
                    let dir = opts.cache_dir.join("apt-archives");
                    let policy = crate::host::download::Policy::from_env();
                    let st = crate::build::archive::fetch_debs(&lock, &dir, None, &policy)?;
                    tracing::info!(
                        "{} locked .debs in {} ({} downloaded)",
                        st.files,
                        dir.display(),
                        crate::host::progress::human_size(st.downloaded)
                    );
                    dir
                }
            };
            Some(crate::build::archive::LockedSource {
                lock,
                lock_path,
                debs,
                repo_dir: PathBuf::new(),
            })
        }
        None => None,
    };
    let source_date_epoch = match &locked_source {
        Some(l) => Some(l.lock.source_date_epoch),
        None => source_date_epoch_env()?,
    };

    // Nothing was written to the output directory before this point.
    std::fs::create_dir_all(&opts.out).with_context(|| format!("creating output directory {}", opts.out.display()))?;
    // Absolute, so hooks (run from their own directory) get a usable KILN_ROOT.
    let out_dir = opts
        .out
        .canonicalize()
        .with_context(|| format!("resolving {}", opts.out.display()))?;
    let opts = &BuildOpts {
        out: out_dir,
        ..opts.clone()
    };
    let work = opts.out.join(format!(".kiln-work-{}", def.name));
    let opts = &BuildOpts {
        provision: crate::build::provision::ProvisionOpts {
            locked: locked_source.map(|l| crate::build::archive::LockedSource {
                repo_dir: work.join("locked-repo"),
                ..l
            }),
            source_date_epoch,
            ..opts.provision.clone()
        },
        ..opts.clone()
    };
    crate::host::buildlog::open(&opts.out.join(format!("{}.build.log", def.name)))?;
    prepare_workdir(&work)?;
    crate::host::supervisor::set_session_marker(&work);
    crate::host::state::start(&work)?;
    let partial = opts.out.join(format!("{raw_name}.partial"));
    // No layers for a build that signs modules: the user's key is in the root while the
    // stages run, and it must never reach the cache.
    let mut plan = if opts.layer_cache
        && opts.provision.locked.is_none()
        && opts.provision.module_signing.is_none()
        && !opts.resolve_only
    {
        let origin = crate::build::layers::Origin {
            base_sha256: base_sha.clone(),
            fresh_root: disk_base.is_none(),
            source_date_epoch,
            dkms_cache: opts.provision.dkms_cache,
        };
        Some(crate::build::layers::Plan::new(
            &def,
            &opts.sets,
            &origin,
            &opts.provision.repo_overrides,
            &opts.cache_dir,
        )?)
    } else {
        None
    };
    let result = loop {
        let r = build_in(
            &def,
            opts,
            (disk_base.as_deref(), &tarball),
            &work,
            &partial,
            plan.as_mut(),
            timings,
        );
        match (r, plan.as_mut()) {
            (Err(e), Some(p)) if p.hit.is_some() && e.chain().any(|c| c.is::<crate::build::layers::Stale>()) => {
                tracing::warn!("{e:#}; removing it and building from the base");
                p.drop_hit();
            }
            (r, _) => break r,
        }
    };
    let result = result.map_err(|e| {
        if !format!("{e:#}").contains("No space left on device") {
            return e;
        }
        // Either the host's disk (the output or the cache) or the image's root is full.
        let host_full = [&opts.out, &opts.cache_dir].into_iter().find_map(|dir| {
            let st = nix::sys::statvfs::statvfs(dir.as_path()).ok()?;
            let free = st.blocks_available() as u64 * st.fragment_size() as u64;
            (free < HOST_FULL_BELOW).then(|| (dir.clone(), free))
        });
        match host_full {
            Some((dir, free)) => e.context(format!(
                "the host filesystem holding {} is full ({} free); free space there or choose another --out / \
                 --cache-dir",
                dir.display(),
                crate::host::progress::human_size(free)
            )),
            None => e.context(format!(
                "the image's root filesystem ran out of space; raise disk_size (now {} GiB) in {}",
                def.disk_size >> 30,
                def.file.display()
            )),
        }
    });
    crate::host::supervisor::kill_session();
    // The guards inside build_in have run by now. The work directory goes only when
    // nothing is left mounted in it: a directory whose unmount failed is never deleted.
    let all_released = !crate::host::state::holds_anything(&work);
    let keep = opts.keep_on_error && result.is_err();
    if keep {
        crate::host::state::finish();
        tracing::warn!(
            "--keep-on-error: kept {} and {} (`kiln doctor --fix {}` removes them)",
            partial.display(),
            work.display(),
            opts.out.display()
        );
    } else if all_released {
        crate::host::state::finish();
        if let Err(e) = std::fs::remove_dir_all(&work) {
            tracing::warn!("could not remove work directory {}: {e}", work.display());
        }
    } else {
        tracing::error!(
            "work directory {} still holds mounts; left in place (see `kiln doctor`)",
            work.display()
        );
    }
    let partials = [
        partial.clone(),
        opts.out.join(format!("{}.json.partial", def.name)),
        opts.out.join(format!("{}.qcow2.partial", def.name)),
        opts.out
            .join(format!("{}.partial", crate::image::sbom::file_name(&def.name))),
        opts.out.join(format!("{}.lock.partial", def.name)),
    ];
    let finished = result.and_then(|p| {
        let Provisioned { resolution, warnings } = p;
        if opts.resolve_only {
            timings.end();
            return Ok((None, None, resolution, warnings));
        }
        finalize(&def, opts, &partials, resolution.as_ref(), timings).map(|(d, q)| (Some(d), q, resolution, warnings))
    });
    if (finished.is_err() && !keep) || opts.resolve_only {
        for p in &partials {
            let _ = std::fs::remove_file(p);
        }
    }
    let (digest, qcow2, resolution, warnings) = finished?;
    Ok(BuildReport {
        name: def.name.clone(),
        raw: final_raw,
        qcow2,
        payload: final_json,
        sbom: final_sbom,
        sha256: digest.map(|d| crate::disk::checksum::hex(&d)).unwrap_or_default(),
        timings: timings.stages.clone(),
        base: base_path.clone(),
        base_sha256: base_sha.clone(),
        resolution,
        warnings,
        layers: plan.map(|p| p.report),
    })
}

/// Below this much free space, a host filesystem that a failed build wrote to counts as
/// the one that ran out (rather than the image's root).
const HOST_FULL_BELOW: u64 = 256 << 20;

/// `SOURCE_DATE_EPOCH` from the environment, if set.
pub fn source_date_epoch_env() -> Result<Option<u64>> {
    match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(v) if !v.trim().is_empty() => match v.trim().parse() {
            Ok(n) => Ok(Some(n)),
            Err(_) => user_bail!("SOURCE_DATE_EPOCH = `{v}` is not a number of seconds since 1970"),
        },
        _ => Ok(None),
    }
}

/// Read the facts back from the finished image, write the payload, checksum, and only
/// then rename everything into place.
fn finalize(
    def: &ImageDef,
    opts: &BuildOpts,
    partials: &[PathBuf; 5],
    resolution: Option<&crate::build::lock::Resolution>,
    timings: &mut Timings,
) -> Result<([u8; 32], Option<PathBuf>)> {
    let [partial, json_partial, q_partial, sbom_partial, lock_partial] = partials;
    let raw_name = format!("{}.raw", def.name);
    crate::build::boundary(timings, "finalize")?;
    let facts = crate::image::inspect::inspect_image(partial).context("reading the finished image's facts")?;
    let payload = crate::image::payload::build_payload(&facts, &crate::image::payload::PayloadInput::of(def))?;
    // The SBOM, from the finished image's dpkg database; the .debs' sha256 and URLs from
    // the build's package records (what `kiln lock` writes). A package they lack (a base
    // package whose version left the archive) gets NOASSERTION and no checksum.
    let sbom_name = crate::image::sbom::file_name(&def.name);
    let records = resolution.map(crate::build::lock::Resolution::sbom_records);
    let root = crate::image::open::RootFs::open(partial).context("reading the finished image's dpkg database")?;
    let stats = crate::image::sbom::write_sbom(
        &root,
        &crate::image::sbom::SbomInput {
            name: &def.name,
            records: records.as_ref(),
            created: opts.provision.source_date_epoch,
        },
        sbom_partial,
    )?;
    drop(root);
    tracing::info!(
        "SBOM {sbom_name}: {} packages, {} with a declared license, {} with a .deb checksum",
        stats.packages,
        stats.with_license,
        stats.with_checksum
    );
    let pb = crate::host::progress::bytes(std::fs::metadata(partial)?.len(), "checksum");
    let digest = crate::disk::checksum::sha256_file(partial, Some(&pb))?;
    pb.finish_and_clear();
    let mut sums = vec![
        (raw_name.clone(), digest),
        (
            sbom_name.clone(),
            crate::disk::checksum::sha256_file(sbom_partial, None)?,
        ),
    ];
    // A locked build ships its lock: what the image holds, by sha256, for whoever
    // rebuilds or audits it (`kiln publish` uploads it too).
    let lock_name = format!("{}.lock", def.name);
    if let Some(locked) = &opts.provision.locked {
        std::fs::copy(&locked.lock_path, lock_partial)
            .with_context(|| format!("copying {} to {}", locked.lock_path.display(), lock_partial.display()))?;
        sums.push((
            lock_name.clone(),
            crate::disk::checksum::sha256_file(lock_partial, None)?,
        ));
    }
    let mut json = serde_json::to_vec_pretty(&payload)?;
    json.push(b'\n');
    std::fs::write(json_partial, json).with_context(|| format!("writing {}", json_partial.display()))?;
    let mut qcow2 = None;
    if opts.qcow2 {
        Cmd::new("qemu-img")
            .args(["convert", "-c", "-f", "raw", "-O", "qcow2"])
            .arg(partial)
            .arg(q_partial)
            .run()
            .context("writing the qcow2 copy")?;
        sums.push((
            format!("{}.qcow2", def.name),
            crate::disk::checksum::sha256_file(q_partial, None)?,
        ));
        qcow2 = Some(opts.out.join(format!("{}.qcow2", def.name)));
    }
    crate::host::cancel::check()?;
    if let Some(q) = &qcow2 {
        std::fs::rename(q_partial, q).with_context(|| format!("renaming {} into place", q_partial.display()))?;
    }
    std::fs::rename(partial, opts.out.join(&raw_name))
        .with_context(|| format!("renaming {} into place", partial.display()))?;
    std::fs::rename(json_partial, opts.out.join(format!("{}.json", def.name)))?;
    std::fs::rename(sbom_partial, opts.out.join(&sbom_name))
        .with_context(|| format!("renaming {} into place", sbom_partial.display()))?;
    if opts.provision.locked.is_some() {
        std::fs::rename(lock_partial, opts.out.join(&lock_name))
            .with_context(|| format!("renaming {} into place", lock_partial.display()))?;
    }
    // An earlier build's qcow2 or lock of this name would describe another image.
    for (stale, written) in [
        (format!("{}.qcow2", def.name), qcow2.is_some()),
        (lock_name, opts.provision.locked.is_some()),
    ] {
        let path = opts.out.join(stale);
        if !written && path.is_file() {
            tracing::info!("removing {}, left by an earlier build of {}", path.display(), def.name);
            std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        }
    }
    crate::disk::checksum::write_sha256sums(&opts.out, &sums)?;
    timings.end();
    Ok((digest, qcow2))
}

/// A work directory left by a crashed kiln may still hold mounts or loop devices: refuse
/// to reuse it until `kiln doctor --fix` has released them.
fn prepare_workdir(work: &Path) -> Result<()> {
    if crate::host::state::build_alive(work) == Some(true) {
        user_bail!(
            "another kiln build is running in {} (it holds {}); wait for it to finish or choose another --out",
            work.display(),
            work.join(crate::host::state::LOCK_FILE).display()
        );
    }
    if crate::host::state::holds_anything(work) {
        user_bail!(
            "work directory {} holds resources of an earlier kiln run (see {}); run `kiln doctor --fix {}` to release them",
            work.display(),
            work.join(crate::host::state::STATE_FILE).display(),
            work.display()
        );
    }
    if work.exists() {
        std::fs::remove_dir_all(work).with_context(|| format!("clearing stale work directory {}", work.display()))?;
    }
    std::fs::create_dir_all(work).with_context(|| format!("creating work directory {}", work.display()))?;
    Ok(())
}

/// The part of the build that holds guards; they are all released when it returns.
/// It starts from the disk base (a disk image) or else the root tarball, or from the
/// cached layer of `layer`'s plan if it has one.
fn build_in(
    def: &ImageDef,
    opts: &BuildOpts,
    (disk_base, tarball): (Option<&Path>, &Path),
    work: &Path,
    partial: &Path,
    mut layer: Option<&mut crate::build::layers::Plan>,
    timings: &mut Timings,
) -> Result<Provisioned> {
    crate::build::boundary(timings, "disk")?;
    // A root tarball gets a fresh disk, its root unpacked and a bootloader; a cached
    // layer of such a build has the first two.
    let fresh = disk_base.is_none();
    let layer_raw = layer.as_ref().and_then(|p| p.hit.as_ref()).map(|h| h.raw());
    // A locked build's identifiers (GPT, ext4) derive from its lock: the same lock
    // gives the same disk and filesystem UUIDs.
    let seed = opts.provision.locked.as_ref().map(|l| l.lock.to_toml()).transpose()?;
    let layout = match layer_raw.as_deref().or(disk_base) {
        Some(base) if layer_raw.is_some() => {
            let pb = crate::host::progress::spinner("copying the cached layer");
            crate::disk::sparse::clone_or_copy(base, partial)?;
            pb.finish_and_clear();
            crate::disk::gpt::grow(partial, def.disk_size)?
        }
        Some(base) => {
            let pb = crate::host::progress::spinner("copying base");
            crate::disk::sparse::copy_sparse(base, partial)?;
            pb.finish_and_clear();
            crate::disk::gpt::grow(partial, def.disk_size)?
        }
        None => {
            let layout =
                crate::disk::gpt::create_cloud_layout_with(partial, def.disk_size, seed.as_deref().map(str::as_bytes))?;
            let esp = layout.esp().context("fresh layout has no ESP")?;
            let f = std::fs::OpenOptions::new().read(true).write(true).open(partial)?;
            crate::disk::fat::format_fat32(&f, esp.offset_bytes(), esp.size_bytes(), ESP_LABEL)
                .with_context(|| format!("formatting the ESP of {}", partial.display()))?;
            layout
        }
    };
    let root = layout.root().context("the disk has no root partition")?.clone();
    let root_loop = Loop::attach(partial, root.offset_bytes(), root.size_bytes(), false)?;
    let dev = root_loop.path().to_owned();
    if disk_base.is_some() || layer_raw.is_some() {
        // -p fixes only what is safe; resize2fs insists on a freshly checked filesystem.
        Cmd::new("e2fsck")
            .args(["-f", "-p"])
            .arg(&dev)
            .run()
            .context("checking the base's root filesystem")?;
        Cmd::new("resize2fs")
            .arg(&dev)
            .run()
            .context("growing the root filesystem")?;
    } else {
        let conf = work.join("mke2fs.conf");
        std::fs::write(&conf, MKE2FS_CONF)?;
        let mut mkfs = Cmd::new("mkfs.ext4");
        if let Some(seed) = &seed {
            let uuid = crate::disk::gpt::guid_to_string(&crate::disk::gpt::derived_guid(seed.as_bytes(), "root fs"))
                .to_ascii_lowercase();
            mkfs = mkfs.args(["-U", &uuid, "-E", &format!("hash_seed={uuid}")]);
        }
        if let Some(e) = opts.provision.source_date_epoch {
            mkfs = mkfs.env("E2FSPROGS_FAKE_TIME", e.to_string());
        }
        mkfs.env("MKE2FS_CONFIG", &conf)
            .args([
                "-q",
                "-F",
                "-L",
                ROOT_LABEL,
                "-E",
                "lazy_itable_init=0,lazy_journal_init=0,discard",
            ])
            .arg(&dev)
            .run()
            .context("formatting the root filesystem")?;
    }
    let mut mounts = MountStack::new();
    let root_dir = work.join("root");
    mounts.mount(&dev.to_string_lossy(), &root_dir, Some("ext4"), MsFlags::empty(), None)?;

    let res = (|| -> Result<Provisioned> {
        let rd = RootDir::open(&root_dir)?;
        if fresh && layer_raw.is_none() {
            crate::build::boundary(timings, "unpack")?;
            let len = std::fs::metadata(tarball)?.len();
            let pb = crate::host::progress::bytes(len, "unpacking");
            let st = crate::build::unpack::unpack_tarball(tarball, &rd, Some(&pb))?;
            pb.finish_and_clear();
            tracing::info!(
                "unpacked {} entries ({})",
                st.entries,
                crate::host::progress::human_size(st.bytes)
            );
            write_fstab(&rd)?;
        }
        let run = layer
            .as_mut()
            .map(|plan| crate::build::provision::LayerRun { plan, raw: partial });
        let provisioned =
            crate::build::provision::provision(&root_dir, &rd, def, &opts.provision, &mut mounts, timings, run)?;
        if fresh && def.bootloader {
            crate::build::stages::bootloader::install(partial, &layout, &dev, &root_dir, &rd, &mut mounts, timings)?;
        }
        crate::build::boundary(timings, "scrub")?;
        crate::build::stages::scrub::scrub(&rd)?;
        if let Some(e) = opts.provision.source_date_epoch {
            let n = crate::build::stages::scrub::clamp_mtimes(&root_dir, e)?;
            tracing::info!("clamped the times of {n} files to SOURCE_DATE_EPOCH {e}");
        }
        crate::build::boundary(timings, "trim")?;
        Cmd::new("fstrim")
            .arg(&root_dir)
            .run()
            .context("discarding free blocks (fstrim) so the image stays sparse")?;
        Ok(provisioned)
    })();
    // Release in reverse order: mounts, then the loop device.
    let unmounted = mounts.close();
    let provisioned = res?;
    unmounted?;
    Cmd::new("e2fsck")
        .args(["-f", "-n"])
        .arg(&dev)
        .run()
        .context("final check of the root filesystem")?;
    root_loop.close()?;
    let f = std::fs::File::open(partial)?;
    f.sync_all().with_context(|| format!("syncing {}", partial.display()))?;
    Ok(provisioned)
}

/// The fstab of Ubuntu's cloud image: root and ESP by label.
fn write_fstab(rd: &RootDir) -> Result<()> {
    let fstab = format!(
        "LABEL={ROOT_LABEL}\t/\text4\tdiscard,errors=remount-ro\t0 1\nLABEL={ESP_LABEL}\t/boot/efi\tvfat\tumask=0077\t0 1\n"
    );
    rd.create_dir_all("/boot/efi", 0o755)?;
    rd.write_file("/etc/fstab", fstab.as_bytes(), 0o644)
        .context("writing /etc/fstab")?;
    Ok(())
}
