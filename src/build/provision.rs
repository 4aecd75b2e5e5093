//! Provisioning: the image definition's stages (system update, GPU prerequisites,
//! NVIDIA driver, Kubernetes tools, ...) run in one chroot session, each timed.
//!
//! All the definition's repositories are configured before the first stage, so a build
//! runs one apt update. A stage, in order: apt update (only the first stage that uses
//! apt) → full-upgrade → install its packages → the kernel pin → kernel headers for every image kernel →
//! holds → overlays → hooks → required kernel modules checked for every image kernel.

use crate::build::lock::Resolution;
use crate::build::stages::apt::{Apt, RepoOverride};
use crate::build::stages::chroot::Session;
use crate::build::stages::dkms::{self, Cache, Hidden};
use crate::build::stages::signing;
use crate::build::timings::Timings;
use crate::definition::{ImageDef, PackageSpec};
use crate::host::mounts::MountStack;
use crate::host::rootdir::RootDir;
use crate::image::kernels::bootable_kernels;
use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Default)]
pub struct ProvisionOpts {
    pub cache_dir: PathBuf,
    pub repo_overrides: Vec<RepoOverride>,
    /// Take DKMS modules from (and store them in) the DKMS build cache
    /// (`build/stages/dkms.rs`); off: package scripts compile them as on any machine.
    pub dkms_cache: bool,
    /// A locked build: apt installs exactly the lock's packages.
    pub locked: Option<crate::build::archive::LockedSource>,
    /// Exported to every command in the image (`SOURCE_DATE_EPOCH`).
    pub source_date_epoch: Option<u64>,
    /// `--module-signing-key`/`--module-signing-cert`: DKMS signs every module with it
    /// (`stages/signing.rs`); the key is in the image only while the stages run.
    pub module_signing: Option<crate::build::stages::signing::SigningKey>,
}

/// `--repo-override` may only name repositories the definition has (checked before
/// anything is written).
pub fn check_overrides(def: &ImageDef, overrides: &[RepoOverride]) -> Result<()> {
    for o in overrides {
        if def.repository(&o.id).is_none() {
            crate::user_bail!(
                "--repo-override {}: the image definition {} has no repository with that id (it has: {})",
                o.id,
                def.file.display(),
                def.repositories
                    .iter()
                    .map(|r| r.id.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
    Ok(())
}

/// What provisioning leaves for the build's report.
#[derive(Debug, Default)]
pub struct Provisioned {
    /// Every installed package's source (`None` without apt).
    pub resolution: Option<Resolution>,
    /// What the user must know about the image (a kernel pinned below the newest).
    pub warnings: Vec<String>,
}

/// The layer cache during provisioning (`build/layers.rs`): the plan, and the image file
/// whose root is being provisioned.
pub struct LayerRun<'a> {
    pub plan: &'a mut crate::build::layers::Plan,
    pub raw: &'a Path,
}

pub fn provision(
    root: &Path,
    rd: &RootDir,
    def: &ImageDef,
    opts: &ProvisionOpts,
    mounts: &mut MountStack,
    timings: &mut Timings,
    mut layer: Option<LayerRun>,
) -> Result<Provisioned> {
    if def.stages.is_empty() {
        return Ok(Provisioned::default());
    }
    let mut session = Session::enter(root, rd, mounts)?;
    session.source_date_epoch = opts.source_date_epoch;
    let session = session;
    let mut warnings = Vec::new();
    let res = (|| -> Result<Option<Resolution>> {
        // apt's build-time setup only when a stage uses apt.
        let uses_apt = def.stages.iter().any(stage_uses_apt);
        let mut apt = if uses_apt {
            Some(Apt::setup(
                &session,
                rd,
                mounts,
                &opts.cache_dir,
                &opts.repo_overrides,
                opts.locked.as_ref(),
            )?)
        } else {
            None
        };
        if let Some(a) = apt.as_mut() {
            // A base that is itself a built image already lists the definition's
            // repositories: an overridden one must be redirected before the first
            // apt update, or that update goes to the unreachable original.
            a.redirect_present_overrides(def)?;
            // Every repository a stage names is configured before the first apt update:
            // one update per build, not one per stage that adds a repository. Packages
            // come only from the stage that names them, so an early list changes nothing
            // else (the base's packages are not in the third-party repositories).
            for id in def.stages.iter().flat_map(|s| &s.repositories) {
                a.add_repository(def, def.repository(id).unwrap())?;
            }
        }
        let mut updated = false;
        // Started from a cached layer: its stages are done. The indexes are refreshed
        // now, and the layer is stale if one its build read has changed.
        let hit = layer.as_ref().and_then(|l| l.plan.hit.clone());
        let skip = hit.as_ref().map_or(0, crate::build::layers::Hit::stages);
        if let Some(h) = &hit {
            if let Some(a) = apt.as_mut() {
                a.base_installed = h.manifest.base_installed.iter().cloned().collect();
                a.update()?;
                updated = true;
                let now = a.releases()?;
                let changed: Vec<&str> = h
                    .manifest
                    .releases
                    .iter()
                    .filter(|(n, sha)| now.get(*n).is_some_and(|x| x != *sha))
                    .map(|(n, _)| n.as_str())
                    .collect();
                if !changed.is_empty() {
                    return Err(anyhow::Error::new(crate::build::layers::Stale(format!(
                        "{} changed since {} was stored",
                        changed.join(", "),
                        h.entry.display()
                    ))));
                }
            }
            let l = layer.as_mut().unwrap();
            l.plan.report.from_layer = h.manifest.stages.clone();
            l.plan.report.from_entry = Some(h.entry.clone());
            tracing::info!(
                "layer cache: stage(s) {} taken from {}",
                h.manifest.stages.join(", "),
                h.entry.display()
            );
        }
        let dkms_cache = opts.dkms_cache.then(|| Cache::new(&opts.cache_dir));
        // The user's signing key is in the image from before the first package install
        // (a DKMS package's postinst builds its module) until every stage has run; the
        // guard removes it on any error or cancellation too.
        let placed = opts
            .module_signing
            .as_ref()
            .map(|k| signing::PlacedKey::place(rd, k))
            .transpose()?;
        for (i, stage) in def.stages.iter().enumerate().skip(skip) {
            crate::build::boundary(timings, &stage.name)?;
            let before = apt.as_ref().map_or(0, |a| a.downloaded);
            run_stage(
                def,
                stage,
                apt.as_mut(),
                &session,
                rd,
                dkms_cache.as_ref(),
                &mut updated,
            )
            .map(|w| warnings.extend(w))
            .with_context(|| format!("stage {} of {}", stage.name, def.name))?;
            timings.downloaded = apt.as_ref().map_or(0, |a| a.downloaded) - before;
            if let Some(l) = layer.as_mut()
                && l.plan.wants(i + 1)
            {
                crate::build::boundary(timings, "store-layer")?;
                store_layer(def, i + 1, l, apt.as_ref(), &session, rd)?;
            }
        }
        if let (Some(placed), Some(key)) = (placed, &opts.module_signing) {
            let unsigned = signing::unsigned_modules(rd, key)?;
            placed.remove()?;
            if !unsigned.is_empty() {
                bail!(
                    "--module-signing-cert {}: DKMS did not sign every module with it (the image needs kmodsign, from sbsigntool, and update-secureboot-policy, from shim-signed):\n  {}",
                    key.cert_path.display(),
                    unsigned.join("\n  ")
                );
            }
        }
        // What the build installed, while apt's indexes are still mounted: a locked
        // build must have installed exactly its lock.
        let resolution = match (&apt, &opts.locked) {
            (None, _) => None,
            (Some(_), Some(l)) => {
                crate::build::resolve::check_against_lock(&crate::build::resolve::installed(&session)?, l)?;
                Some(Resolution {
                    repositories: l.lock.repositories.clone(),
                    packages: l.lock.packages.clone(),
                })
            }
            (Some(a), None) => {
                match crate::build::resolve::resolve(
                    &session,
                    rd,
                    def,
                    &opts.repo_overrides,
                    &a.base_installed,
                    &opts.cache_dir.join("apt-archives"),
                ) {
                    Ok(r) => Some(r),
                    Err(e) => {
                        tracing::warn!("could not record the installed packages' sources: {e:#}");
                        None
                    }
                }
            }
        };
        crate::build::boundary(timings, "initramfs")?;
        if let Some(a) = apt {
            a.finish(def)?;
        }
        Ok(resolution)
    })();
    let closed = session.close(rd, mounts);
    let resolution = res?;
    closed?;
    Ok(Provisioned { resolution, warnings })
}

/// Store the root after the first `done` stages as a layer, without the session's and
/// apt's build-time files and the repositories no stage so far named; they are put
/// back afterwards. A layer that cannot be stored is logged, not fatal.
fn store_layer(
    def: &ImageDef,
    done: usize,
    l: &mut LayerRun,
    apt: Option<&Apt>,
    session: &Session,
    rd: &RootDir,
) -> Result<()> {
    let stages = &def.stages[..done];
    let keep: Vec<String> = stages.iter().flat_map(|s| s.repositories.iter().cloned()).collect();
    let names: Vec<String> = stages.iter().map(|s| s.name.clone()).collect();
    if let Some(a) = apt {
        a.suspend(&keep)?;
    }
    session.suspend(rd)?;
    let releases = apt.map(Apt::releases).transpose();
    let stored = releases.and_then(|r| {
        let empty = Default::default();
        let base = apt.map_or(&empty, |a| &a.base_installed);
        l.plan
            .store(l.raw, session.root(), &def.name, &names, base, r.unwrap_or_default())
    });
    session.resume(rd)?;
    if let Some(a) = apt {
        a.resume(def)?;
    }
    if let Err(e) = stored {
        tracing::warn!("layer cache: {e:#}; the build goes on without it");
    }
    Ok(())
}

fn stage_uses_apt(s: &crate::definition::Stage) -> bool {
    s.full_upgrade || s.kernel_headers || !s.packages.is_empty() || !s.repositories.is_empty() || !s.hold.is_empty()
}

fn run_stage(
    def: &ImageDef,
    stage: &crate::definition::Stage,
    apt: Option<&mut Apt>,
    session: &Session,
    rd: &RootDir,
    dkms_cache: Option<&Cache>,
    updated: &mut bool,
) -> Result<Option<String>> {
    if !stage_uses_apt(stage) {
        return run_files(stage, session, rd).map(|()| None);
    }
    let apt = apt.expect("apt is set up when a stage uses it");
    let mut repos_changed = false;
    for id in &stage.repositories {
        repos_changed |= apt.add_repository(def, def.repository(id).unwrap())?;
    }
    let needs_apt = stage.full_upgrade || !stage.packages.is_empty() || stage.kernel_headers;
    if needs_apt && (!*updated || repos_changed) {
        apt.update()?;
        *updated = true;
    }
    // With the DKMS cache, no package script compiles a module: the headers are hidden
    // while packages install, and build_modules below builds or fetches every module.
    let mut hidden = Hidden::hide(
        rd,
        dkms_cache.is_some() && (stage.full_upgrade || !stage.packages.is_empty()),
    )?;
    if stage.full_upgrade {
        apt.full_upgrade()?;
    }
    apt.install(&stage.packages)?;
    // The kernel pin's warning, when the archive has a newer kernel.
    let warning = match &stage.kernel {
        Some(k) => crate::build::stages::kernel::pin(apt, k)?,
        None => None,
    };
    if stage.kernel_headers {
        let kernels = bootable_kernels(rd)?;
        if kernels.is_empty() {
            bail!("the image has no kernel (no /boot/vmlinuz-* with a /lib/modules directory)");
        }
        let headers: Vec<PackageSpec> = kernels
            .iter()
            .map(|k| PackageSpec {
                name: format!("linux-headers-{k}"),
                version: None,
                pool: None,
                origin: format!("kernel {k} of the image"),
            })
            .collect();
        tracing::info!("kernel headers for {}", kernels.join(", "));
        apt.install(&headers)?;
    }
    hidden.restore_headers()?;
    let built = dkms::build_modules(session, rd, dkms_cache)?;
    hidden.restore()?;
    if !built.hits.is_empty() || !built.compiled.is_empty() {
        tracing::info!(
            "DKMS modules: {} from the build cache, {} compiled",
            built.hits.len(),
            built.compiled.len()
        );
    }
    let pins: Vec<&PackageSpec> = stage.packages.iter().filter(|p| p.version.is_some()).collect();
    let mut hold = stage.hold.clone();
    for p in &pins {
        if !hold.contains(&p.name) {
            hold.push(p.name.clone());
        }
    }
    apt.hold(&hold, &pins)?;
    run_files(stage, session, rd)?;
    Ok(warning)
}

/// Overlays, hooks and the module check of a stage.
fn run_files(stage: &crate::definition::Stage, session: &Session, rd: &RootDir) -> Result<()> {
    for o in &stage.overlays {
        crate::build::stages::overlays::apply(o, rd)?;
    }
    for h in &stage.hooks {
        crate::build::stages::hooks::run_all(h, session, rd)?;
    }
    if !stage.require_modules.is_empty() {
        ensure_modules(session, rd, &stage.require_modules)?;
    }
    Ok(())
}

/// Every required module must exist for every image kernel with a vermagic naming that
/// kernel; missing ones get one `dkms autoinstall -k` before the build fails.
fn ensure_modules(session: &Session, rd: &RootDir, modules: &[String]) -> Result<()> {
    for k in bootable_kernels(rd)? {
        let mut missing = check_modules(session, rd, &k, modules)?;
        if !missing.is_empty() {
            tracing::warn!("kernel {k} lacks {}: running dkms autoinstall", missing.join(", "));
            session
                .cmd("dkms")
                .args(["autoinstall", "-k", &k])
                .run()
                .with_context(|| format!("dkms autoinstall -k {k}"))?;
            missing = check_modules(session, rd, &k, modules)?;
        }
        if !missing.is_empty() {
            bail!(
                "kernel {k} of the image has no usable {} module(s) after DKMS; DKMS's output is in the build log (NAME.build.log); rebuild with --keep-on-error to keep the image and read /var/lib/dkms/*/build/make.log in it",
                missing.join(", ")
            );
        }
        tracing::info!("kernel {k}: {} present with matching vermagic", modules.join(", "));
    }
    Ok(())
}

fn check_modules(session: &Session, _rd: &RootDir, kernel: &str, modules: &[String]) -> Result<Vec<String>> {
    let mut missing = Vec::new();
    for m in modules {
        let out = session.cmd("modinfo").args(["-k", kernel, "-F", "vermagic", m]).run();
        match out {
            Ok(o) if o.stdout_str().split_whitespace().next() == Some(kernel) => {}
            Ok(o) => {
                tracing::warn!("module {m} for {kernel} has vermagic `{}`", o.stdout_str().trim());
                missing.push(m.clone());
            }
            Err(_) => missing.push(m.clone()),
        }
    }
    Ok(missing)
}
