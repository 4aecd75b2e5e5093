//! The .debs of a locked build: fetched by pool path and checked by sha256 (into the
//! package cache for `kiln build --locked`, into an archive directory for `kiln fetch`),
//! or taken from an archive directory with no network at all (`--offline --archive`),
//! and served to apt inside the image as one local repository holding exactly the
//! locked versions.
//!
//! An archive directory (`kiln fetch DEF --archive DIR`):
//!
//! | path | what |
//! |---|---|
//! | `DIR/NAME.lock` | the lock it was fetched for |
//! | `DIR/base/FILE` | the base (the lock's `base.file`) |
//! | `DIR/debs/*.deb` | every .deb the base lacks, by its pool file name |
//! | `DIR/keys/ID.asc` | the repositories' signing keys |
//!
//! The local repository is trusted without a signature because every .deb in it was
//! checked against the lock's sha256 before anything was written; its `Packages` is made
//! from each .deb's control fields (`dpkg-deb -f`, read and written with `deb822-fast`).

use crate::build::lock::{LockFile, LockedPackage, download_url, lock_path};
use crate::definition::ImageDef;
use crate::error::user;
use crate::host::cmd::Cmd;
use crate::host::download::{self, Policy};
use crate::user_bail;
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

/// The archive directory's base file.
pub fn archived_base(archive: &Path, lock: &LockFile) -> PathBuf {
    archive.join("base").join(&lock.base.file)
}

fn sha256_hex(path: &Path) -> Result<String> {
    Ok(crate::disk::checksum::hex(&crate::disk::checksum::sha256_file(
        path, None,
    )?))
}

/// Offline: every .deb the locked build needs must be in `archive/debs` with its
/// locked sha256. All are checked (missing ones listed by file name) before anything is
/// written. Returns the directory.
pub fn check_archive(lock: &LockFile, archive: &Path) -> Result<PathBuf> {
    let debs = archive.join("debs");
    let needed: Vec<&LockedPackage> = lock.needed().collect();
    let missing: Vec<String> = needed
        .iter()
        .map(|p| debs.join(p.deb_name()))
        .filter(|f| !f.is_file())
        .map(|f| f.display().to_string())
        .collect();
    if !missing.is_empty() {
        user_bail!(
            "the archive {} lacks {} of the {} .debs the lock needs: {}; run `kiln fetch DEF --archive {}` again",
            archive.display(),
            missing.len(),
            needed.len(),
            missing.join(", "),
            archive.display()
        );
    }
    let total: u64 = needed.iter().map(|p| p.size).sum();
    let pb = crate::host::progress::bytes(total, "checking archive");
    for p in &needed {
        let f = debs.join(p.deb_name());
        let got = sha256_hex(&f)?;
        if got != p.sha256 {
            user_bail!(
                "{}: sha256 {got}, but the lock says {} for {}={} ({}); the archive is damaged or not this lock's — \
                 refusing it (fetch it again with `kiln fetch`)",
                f.display(),
                p.sha256,
                p.name,
                p.version,
                p.architecture
            );
        }
        pb.inc(p.size);
    }
    pb.finish_and_clear();
    tracing::info!(
        "archive {}: {} .debs ({}) match the lock",
        archive.display(),
        needed.len(),
        crate::host::progress::human_size(total)
    );
    Ok(debs)
}

/// What [`fetch_debs`] did.
#[derive(Debug, Default)]
pub struct Fetched {
    pub files: usize,
    pub downloaded: u64,
    pub reused: u64,
}

/// Put every .deb the locked build needs into `dest` (by pool file name), each checked
/// against the lock's sha256: kept if already there, copied from `reuse` (the package
/// cache) if it has it, else downloaded from its repository's URI + pool path.
pub fn fetch_debs(lock: &LockFile, dest: &Path, reuse: Option<&Path>, policy: &Policy) -> Result<Fetched> {
    std::fs::create_dir_all(dest).with_context(|| format!("creating {}", dest.display()))?;
    let needed: Vec<&LockedPackage> = lock.needed().collect();
    let mut st = Fetched {
        files: needed.len(),
        ..Default::default()
    };
    let total: u64 = needed.iter().map(|p| p.size).sum();
    let pb = crate::host::progress::bytes(total, "packages");
    for p in needed {
        crate::host::cancel::check()?;
        let f = dest.join(p.deb_name());
        if p.sha256.is_empty() {
            user_bail!(
                "the lock has no sha256 for {}={} ({}): no repository index listed it when the lock was made; \
                 run `kiln lock --update`",
                p.name,
                p.version,
                p.architecture
            );
        }
        if f.is_file() && sha256_hex(&f)? == p.sha256 {
            st.reused += p.size;
            pb.inc(p.size);
            continue;
        }
        let part = dest.join(format!("{}.partial", p.deb_name()));
        let from_cache = reuse
            .map(|r| r.join(p.deb_name()))
            .filter(|c| c.is_file() && c != &f && sha256_hex(c).is_ok_and(|h| h == p.sha256));
        if let Some(c) = from_cache {
            if std::fs::hard_link(&c, &f).is_err() {
                std::fs::copy(&c, &part).with_context(|| format!("copying {}", c.display()))?;
                std::fs::rename(&part, &f)?;
            }
            st.reused += p.size;
            pb.inc(p.size);
            continue;
        }
        let url = download_url(&lock.repositories, p).ok_or_else(|| {
            user(format!(
                "the lock names no repository with a pool path for {}={} ({}); run `kiln lock --update`",
                p.name, p.version, p.architecture
            ))
        })?;
        let _ = std::fs::remove_file(&part);
        download::fetch_to_file(&url, &part, policy, &p.name).map_err(|e| {
            user(format!(
                "cannot fetch {}={} ({}) for the lock: {e}; the repository may have dropped it — `kiln fetch` an \
                 archive where it is still available, or `kiln lock --update`",
                p.name, p.version, p.architecture
            ))
        })?;
        let got = sha256_hex(&part)?;
        if got != p.sha256 {
            let _ = std::fs::remove_file(&part);
            user_bail!(
                "{url}: sha256 {got}, but the lock says {} for {}={}; refused (the download was deleted)",
                p.sha256,
                p.name,
                p.version
            );
        }
        std::fs::rename(&part, &f).with_context(|| format!("renaming {} into place", part.display()))?;
        st.downloaded += p.size;
        pb.inc(p.size);
    }
    pb.finish_and_clear();
    Ok(st)
}

/// The local repository of a locked build in `repo` (Packages, Release, the one-line
/// sources list and an empty sources.list.d for apt's `Dir::Etc` settings); the .debs
/// stay in `debs` and are bind-mounted at `repo/debs` inside the image.
pub fn write_local_repo(repo: &Path, debs: &Path, lock: &LockFile, inside: &str) -> Result<()> {
    std::fs::create_dir_all(repo.join("debs"))?;
    std::fs::create_dir_all(repo.join("parts"))?;
    let mut stanzas = Vec::new();
    for p in lock.needed() {
        let f = debs.join(p.deb_name());
        let out = Cmd::new("dpkg-deb")
            .arg("-f")
            .arg(&f)
            .run()
            .with_context(|| format!("reading the control fields of {}", f.display()))?;
        let mut para: deb822_fast::Paragraph = out
            .stdout_str()
            .parse()
            .map_err(|e| anyhow::anyhow!("control fields of {}: {e:?}", f.display()))?;
        if para.get("Package") != Some(p.name.as_str()) || para.get("Version") != Some(p.version.as_str()) {
            user_bail!(
                "{} is {} {}, not the locked {}={}",
                f.display(),
                para.get("Package").unwrap_or("?"),
                para.get("Version").unwrap_or("?"),
                p.name,
                p.version
            );
        }
        para.set("Filename", &format!("debs/{}", p.deb_name()));
        para.set("Size", &p.size.to_string());
        para.set("SHA256", &p.sha256);
        stanzas.push(para.to_string());
    }
    let packages = stanzas.join("\n");
    std::fs::write(repo.join("Packages"), &packages)?;
    let digest = crate::disk::checksum::hex(&{
        use sha2::Digest;
        sha2::Sha256::digest(packages.as_bytes()).into()
    });
    std::fs::write(
        repo.join("Release"),
        format!(
            "Origin: kiln\nLabel: kiln lock {}\nSuite: ./\nDescription: the locked packages of {}\nSHA256:\n {digest} {} Packages\n",
            lock.definition,
            lock.definition,
            packages.len()
        ),
    )?;
    std::fs::write(
        repo.join("sources.list"),
        format!("deb [trusted=yes] file:{inside} ./\n"),
    )?;
    Ok(())
}

/// `kiln fetch DEF --archive DIR`: everything a locked build of DEF needs, checked.
pub fn cmd_fetch(
    def: &Path,
    sets: &[crate::definition::Setting],
    archive: &Path,
    base: Option<&Path>,
    cache_dir: &Path,
    mirror: Option<&str>,
) -> Result<()> {
    let started = std::time::Instant::now();
    let def: ImageDef = crate::definition::load_with(def, sets)?;
    let lp = lock_path(&def);
    let lock = LockFile::load(&lp)?;
    std::fs::create_dir_all(archive.join("base")).with_context(|| format!("creating {}", archive.display()))?;
    let policy = Policy::from_env();
    // The base.
    let dest = archived_base(archive, &lock);
    if !(dest.is_file() && sha256_hex(&dest)? == lock.base.sha256) {
        let src = match (base, &def.base) {
            (Some(b), _) => b.to_path_buf(),
            (None, Some(spec)) if spec.sha256 == lock.base.sha256 => {
                crate::build::base::ensure(spec, cache_dir, mirror, &policy)?.path
            }
            _ => user_bail!(
                "the lock's base {} (sha256 {}) is not the definition's pinned [base]; pass it with --base FILE",
                lock.base.file,
                lock.base.sha256
            ),
        };
        let got = sha256_hex(&src)?;
        if got != lock.base.sha256 {
            user_bail!(
                "{}: sha256 {got}, but the lock's base {} has {}",
                src.display(),
                lock.base.file,
                lock.base.sha256
            );
        }
        let _ = std::fs::remove_file(&dest);
        if std::fs::hard_link(&src, &dest).is_err() {
            std::fs::copy(&src, &dest).with_context(|| format!("copying {} to {}", src.display(), dest.display()))?;
        }
    }
    // The repositories' keys.
    std::fs::create_dir_all(archive.join("keys"))?;
    for r in &def.repositories {
        let key = def.project_root.join(&r.key);
        let ext = key.extension().and_then(|e| e.to_str()).unwrap_or("asc");
        std::fs::copy(&key, archive.join("keys").join(format!("{}.{ext}", r.id)))
            .with_context(|| format!("copying key {}", key.display()))?;
    }
    let st = fetch_debs(
        &lock,
        &archive.join("debs"),
        Some(&cache_dir.join("apt-archives")),
        &policy,
    )?;
    std::fs::copy(&lp, archive.join(lp.file_name().unwrap()))?;
    let size: u64 = lock.needed().map(|p| p.size).sum::<u64>() + lock.base.size;
    println!(
        "archive {}: base {} + {} .debs, {} in all ({} downloaded, {} from the package cache) in {:.1} s",
        archive.display(),
        lock.base.file,
        st.files,
        crate::host::progress::human_size(size),
        crate::host::progress::human_size(st.downloaded),
        crate::host::progress::human_size(st.reused),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// A locked build's packages for provisioning: the lock, the directory of its checked
/// .debs, and where (in the work directory) to make the local repository.
#[derive(Debug, Clone)]
pub struct LockedSource {
    pub lock: LockFile,
    pub lock_path: PathBuf,
    pub debs: PathBuf,
    pub repo_dir: PathBuf,
}
