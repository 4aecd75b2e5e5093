//! The layer cache: the image root after the first N stages of a build, kept in
//! `<cache>/layers/<key>/` (`root.raw`, sparse, and `manifest.json`), so that a build
//! whose stage list starts with the same N stages (a definition that extends another,
//! or a variant whose parameters change only later stages) starts from it and runs only
//! the rest.
//!
//! **Key.** Cumulative per stage: `key[0]` covers what the root starts from (the kiln
//! binary's sha256, the base's sha256 and whether it is a root tarball, the
//! `SOURCE_DATE_EPOCH`, the DKMS cache switch); `key[i]` = sha256(`key[i-1]`, stage i's
//! inputs after parameter substitution: name, switches, repositories (with the key
//! file's content and this build's override), package specs and pins, holds, required
//! modules, and the content of its overlay and hook trees). `--set` values count only
//! through what they change in a stage, so `--set kubernetes=1.29` shares the layers of
//! the stages before `kubernetes-tools`.
//!
//! **Where a layer is taken.** Stages are ordered by `before =`, so a child's stages can
//! come between its parent's (the NVIDIA driver before `kubernetes-tools`): what parent
//! and child share is the longest common prefix of their stage keys. A build stores the
//! root after the prefix it shares with each related definition (one it extends or one
//! that extends it, in the same directory) and with each build of the last [`MAX_AGE`]
//! (`recent.json` keeps their stage keys): variants built one after another, say two
//! drivers x two Kubernetes versions, each store the prefix they share with the one
//! before, so from the second build on each starts as late as it can. A build starts
//! from the longest prefix of its own keys that is cached.
//!
//! **Validity.** A layer is used only if its manifest is for the key, its data has the
//! recorded sha256, it is less than [`MAX_AGE`] old, and it is no larger than the disk
//! being built. After it is copied, the build runs `apt-get update`; if any repository
//! index (`InRelease`/`Release`) the layer's build read is now different, the layer is
//! stale: it is removed and the build starts again from the base.
//!
//! **Size.** After a store the cache is pruned to [`budget`] bytes (allocated), least
//! recently used first.

use crate::build::resolve::Installed;
use crate::definition::{ImageDef, Setting, Stage};
use crate::host::dirlock::DirLock;
use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const FORMAT: &str = "kiln-layer-1";
const MANIFEST: &str = "manifest.json";
const ROOT: &str = "root.raw";
/// The stage keys of recent builds, in the layers directory.
const RECENT: &str = "recent.json";
/// How many recent builds `recent.json` remembers.
const RECENT_MAX: usize = 64;
/// A layer older than this is not used (and pruned): 24 hours.
pub const MAX_AGE: std::time::Duration = std::time::Duration::from_secs(24 * 3600);
/// Default size budget of `<cache>/layers` (allocated bytes); `KILN_LAYER_CACHE_BUDGET`
/// (`8GiB`, `20G`, ...) sets another.
pub const DEFAULT_BUDGET: u64 = 8 << 30;

/// The budget of the layer cache: `KILN_LAYER_CACHE_BUDGET` or [`DEFAULT_BUDGET`].
pub fn budget() -> Result<u64> {
    match std::env::var("KILN_LAYER_CACHE_BUDGET") {
        Ok(v) if !v.trim().is_empty() => match crate::definition::parse_size(&v) {
            Some(n) => Ok(n),
            None => crate::user_bail!("KILN_LAYER_CACHE_BUDGET = `{v}` is not a size (e.g. 8GiB)"),
        },
        _ => Ok(DEFAULT_BUDGET),
    }
}

/// What the root starts from, before any stage.
#[derive(Debug, Clone)]
pub struct Origin {
    pub base_sha256: String,
    /// A root tarball (fresh disk) rather than a disk image.
    pub fresh_root: bool,
    pub source_date_epoch: Option<u64>,
    pub dkms_cache: bool,
}

/// The manifest of a cache entry.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub format: String,
    pub key: String,
    /// The definition whose build stored it, and the stages it holds.
    pub definition: String,
    pub stages: Vec<String>,
    /// Seconds since 1970.
    pub created: u64,
    /// The image file's length.
    pub disk_size: u64,
    /// [`crate::disk::checksum::sha256_data`] of `root.raw` and its bytes of data.
    pub data_sha256: String,
    pub data_bytes: u64,
    /// The packages the base had before the first stage (for the package records).
    pub base_installed: Vec<Installed>,
    /// sha256 of each repository index file (`InRelease`/`Release`) the build read.
    pub releases: BTreeMap<String, String>,
}

/// A cached layer a build starts from, held with a shared lock so that no other build
/// prunes it while this one copies it.
#[derive(Debug, Clone)]
pub struct Hit {
    pub entry: PathBuf,
    pub manifest: Manifest,
    _in_use: std::sync::Arc<DirLock>,
}

impl Hit {
    pub fn raw(&self) -> PathBuf {
        self.entry.join(ROOT)
    }
    /// The number of stages it holds.
    pub fn stages(&self) -> usize {
        self.manifest.stages.len()
    }
}

/// What the build did with the layer cache (in the `--json` report).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    /// The stages taken from a cached layer (empty: none).
    pub from_layer: Vec<String>,
    pub from_entry: Option<PathBuf>,
    /// Entries stored by this build.
    pub stored: Vec<PathBuf>,
    /// Entries removed because they failed their checks or were stale.
    pub removed: Vec<String>,
}

/// The layer a build started from is stale: a repository index its build read has
/// changed since. The build starts again from the base.
#[derive(Debug)]
pub struct Stale(pub String);

impl std::fmt::Display for Stale {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the cached layer is stale: {}", self.0)
    }
}

impl std::error::Error for Stale {}

/// The layer cache for one build.
#[derive(Debug, Clone)]
pub struct Plan {
    pub dir: PathBuf,
    /// `keys[i]`: the key of the root after stages `0..=i`.
    pub keys: Vec<String>,
    /// Numbers of stages after which this build stores a layer.
    pub store_after: BTreeSet<usize>,
    pub hit: Option<Hit>,
    pub report: Report,
}

impl Plan {
    /// The keys of `def`'s stages, where to store layers, and the longest cached prefix.
    pub fn new(
        def: &ImageDef,
        sets: &[Setting],
        origin: &Origin,
        overrides: &[crate::build::stages::apt::RepoOverride],
        cache_dir: &Path,
    ) -> Result<Plan> {
        let root = root_key(origin)?;
        let keys = stage_keys(def, &root, overrides)?;
        let mut store_after = BTreeSet::new();
        for other in related(def, sets) {
            let theirs = stage_keys(&other, &root, overrides)?;
            let shared = keys.iter().zip(&theirs).take_while(|(a, b)| a == b).count();
            if shared > 0 {
                store_after.insert(shared);
            }
        }
        let dir = cache_dir.join("layers");
        match shared_with_recent(&dir, &keys) {
            Ok(shared) => store_after.extend(shared),
            Err(e) => tracing::warn!("layer cache: recent builds not read or recorded ({e:#})"),
        }
        let mut plan = Plan {
            dir,
            keys,
            store_after,
            hit: None,
            report: Report::default(),
        };
        plan.hit = plan.find(def.disk_size);
        match &plan.hit {
            Some(h) => tracing::info!(
                "layer cache: starting from the root after stage(s) {} ({})",
                h.manifest.stages.join(", "),
                h.entry.display()
            ),
            None => tracing::info!("layer cache: no cached layer for {}", def.name),
        }
        Ok(plan)
    }

    /// The longest cached prefix of the keys that passes its checks; entries that fail
    /// them are removed.
    fn find(&mut self, disk_size: u64) -> Option<Hit> {
        for key in self.keys.clone().iter().rev() {
            let entry = self.dir.join(key);
            if !entry.join(MANIFEST).is_file() {
                continue;
            }
            // In use from here on; it may have been removed while we waited for the lock.
            let Ok(in_use) = DirLock::shared(&entry) else {
                continue;
            };
            if !entry.join(MANIFEST).is_file() {
                continue;
            }
            match check(&entry, key) {
                Ok(m) if m.disk_size > disk_size => {
                    tracing::info!(
                        "layer cache: {} is for a larger disk ({} bytes) than this one",
                        entry.display(),
                        m.disk_size
                    );
                }
                Ok(m) => {
                    // Least recently used is by the manifest's mtime.
                    let _ = std::fs::File::options()
                        .append(true)
                        .open(entry.join(MANIFEST))
                        .and_then(|f| f.set_modified(std::time::SystemTime::now()));
                    return Some(Hit {
                        entry,
                        manifest: m,
                        _in_use: std::sync::Arc::new(in_use),
                    });
                }
                Err(e) => {
                    tracing::warn!("layer cache: {} is not usable ({e:#}); removing it", entry.display());
                    drop(in_use);
                    self.remove(&entry);
                }
            }
        }
        None
    }

    /// Remove an entry (damaged or stale), unless another build is using it.
    pub fn remove(&mut self, entry: &Path) {
        if remove_entry(entry) {
            self.report.removed.push(entry.display().to_string());
        }
    }

    /// Drop the hit (it was stale): the build starts again from the base.
    pub fn drop_hit(&mut self) {
        if let Some(h) = self.hit.take() {
            let entry = h.entry.clone();
            drop(h);
            self.remove(&entry);
        }
    }

    /// Whether to store a layer after `done` stages (not when this build started from
    /// it or a later one, or it is cached already).
    pub fn wants(&self, done: usize) -> bool {
        self.store_after.contains(&done)
            && self.hit.as_ref().is_none_or(|h| h.stages() < done)
            && !self.dir.join(&self.keys[done - 1]).join(MANIFEST).is_file()
    }

    /// Copy the image `raw`, whose root filesystem is mounted on `mount`, as the layer
    /// after `stages` (written under a temporary name, renamed into place, then the
    /// cache pruned). The root filesystem is frozen while it is copied.
    pub fn store(
        &mut self,
        raw: &Path,
        mount: &Path,
        definition: &str,
        stages: &[String],
        base_installed: &BTreeSet<Installed>,
        releases: BTreeMap<String, String>,
    ) -> Result<()> {
        let key = &self.keys[stages.len() - 1];
        std::fs::create_dir_all(&self.dir).with_context(|| format!("creating {}", self.dir.display()))?;
        let tmp = self.dir.join(format!(".tmp-{key}-{}", std::process::id()));
        let entry = self.dir.join(key);
        let res = (|| -> Result<()> {
            if tmp.exists() {
                std::fs::remove_dir_all(&tmp)?;
            }
            std::fs::create_dir_all(&tmp)?;
            let copy = tmp.join(ROOT);
            let pb = crate::host::progress::spinner("storing layer");
            crate::host::cmd::Cmd::new("fsfreeze")
                .arg("-f")
                .arg(mount)
                .run()
                .context("freezing the root filesystem to copy it")?;
            let copied = crate::disk::sparse::clone_or_copy(raw, &copy);
            let thawed = crate::host::cmd::Cmd::new("fsfreeze").arg("-u").arg(mount).run();
            pb.finish_and_clear();
            thawed.context("thawing the root filesystem")?;
            copied?;
            let (data_sha256, data_bytes) = crate::disk::checksum::sha256_data(&copy)?;
            let m = Manifest {
                format: FORMAT.into(),
                key: key.clone(),
                definition: definition.into(),
                stages: stages.to_vec(),
                created: now(),
                disk_size: std::fs::metadata(&copy)?.len(),
                data_sha256,
                data_bytes,
                base_installed: base_installed.iter().cloned().collect(),
                releases,
            };
            std::fs::write(tmp.join(MANIFEST), serde_json::to_vec_pretty(&m)?)?;
            std::fs::File::open(tmp.join(ROOT))?.sync_all()?;
            if std::fs::rename(&tmp, &entry).is_err() && !entry.is_dir() {
                bail!("could not rename {} to {}", tmp.display(), entry.display());
            }
            tracing::info!(
                "layer cache: stored the root after stage(s) {} ({}, {} of data)",
                stages.join(", "),
                entry.display(),
                crate::host::progress::human_size(data_bytes)
            );
            Ok(())
        })();
        let _ = std::fs::remove_dir_all(&tmp);
        res.with_context(|| format!("storing a layer in {}", self.dir.display()))?;
        self.report.stored.push(entry.clone());
        prune(&self.dir, budget()?, Some(key))?;
        Ok(())
    }
}

/// One build in `recent.json`: when it planned, and its stage keys.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Recent {
    at: u64,
    keys: Vec<String>,
}

/// The lengths of the prefixes `keys` shares with builds of the last [`MAX_AGE`] (shorter
/// than all of `keys`), after recording this build among them (the newest
/// [`RECENT_MAX`], under a lock on `dir`).
fn shared_with_recent(dir: &Path, keys: &[String]) -> Result<BTreeSet<usize>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let _lock = DirLock::acquire(dir, "recording its build in the layer cache")?;
    let file = dir.join(RECENT);
    let mut recent: Vec<Recent> = match std::fs::read(&file) {
        Ok(b) => serde_json::from_slice(&b).unwrap_or_default(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", file.display())),
    };
    let now = now();
    recent.retain(|r| now.saturating_sub(r.at) <= MAX_AGE.as_secs() && r.keys != keys);
    let shared = recent
        .iter()
        .map(|r| keys.iter().zip(&r.keys).take_while(|(a, b)| a == b).count())
        .filter(|&n| n > 0 && n < keys.len())
        .collect();
    recent.push(Recent {
        at: now,
        keys: keys.to_vec(),
    });
    let drop = recent.len().saturating_sub(RECENT_MAX);
    recent.drain(..drop);
    let tmp = dir.join(format!(".{RECENT}.{}", std::process::id()));
    std::fs::write(&tmp, serde_json::to_vec(&recent)?).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &file).with_context(|| format!("renaming {} to {}", tmp.display(), file.display()))?;
    Ok(shared)
}

/// Remove a cache entry unless a build holds it (a shared lock: it starts from it);
/// whether it was removed.
fn remove_entry(entry: &Path) -> bool {
    match DirLock::try_exclusive(entry) {
        Ok(Some(_lock)) => match std::fs::remove_dir_all(entry) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!("could not remove layer {}: {e}", entry.display());
                false
            }
        },
        Ok(None) => {
            tracing::info!("layer cache: {} is in use by another build; kept", entry.display());
            false
        }
        // Gone already.
        Err(_) => false,
    }
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The manifest of `entry` once it passes every check: for `key`, of this format,
/// younger than [`MAX_AGE`], and its data's sha256 as recorded.
pub fn check(entry: &Path, key: &str) -> Result<Manifest> {
    let text = std::fs::read(entry.join(MANIFEST)).context("no readable manifest.json")?;
    let m: Manifest = serde_json::from_slice(&text).context("manifest.json does not parse")?;
    if m.format != FORMAT || m.key != key {
        bail!("its manifest is for another key or format");
    }
    let age = now().saturating_sub(m.created);
    if age > MAX_AGE.as_secs() {
        bail!(
            "it is {} h old (layers are used for {} h)",
            age / 3600,
            MAX_AGE.as_secs() / 3600
        );
    }
    let raw = entry.join(ROOT);
    let len = std::fs::metadata(&raw)
        .with_context(|| format!("{ROOT} is missing"))?
        .len();
    if len != m.disk_size {
        bail!("{ROOT} has {len} bytes, the manifest says {}", m.disk_size);
    }
    let (sha, _) = crate::disk::checksum::sha256_data(&raw)?;
    if sha != m.data_sha256 {
        bail!("{ROOT} has data sha256 {sha}, the manifest says {}", m.data_sha256);
    }
    Ok(m)
}

/// Remove expired entries, leftovers of interrupted stores, then the least recently
/// used entries until the cache takes at most `budget` bytes (`keep` stays).
pub fn prune(dir: &Path, budget: u64, keep: Option<&str>) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    let mut entries = Vec::new();
    for e in rd.flatten() {
        // Entries are directories (`recent.json` is not one).
        if !e.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let name = e.file_name().to_string_lossy().into_owned();
        let path = e.path();
        let mtime = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        if name.starts_with(".tmp-") {
            // Another build's store in progress, or one that was killed.
            if mtime(&path)
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|a| a.as_secs() > 3600)
            {
                let _ = std::fs::remove_dir_all(&path);
            }
            continue;
        }
        let expired = std::fs::read(path.join(MANIFEST))
            .ok()
            .and_then(|t| serde_json::from_slice::<Manifest>(&t).ok())
            .is_none_or(|m| now().saturating_sub(m.created) > MAX_AGE.as_secs());
        if expired && Some(name.as_str()) != keep {
            tracing::info!("layer cache: removing expired {}", path.display());
            remove_entry(&path);
            continue;
        }
        let size = std::fs::metadata(path.join(ROOT))
            .map(|m| m.blocks() * 512)
            .unwrap_or(0);
        entries.push((mtime(&path.join(MANIFEST)), size, name, path));
    }
    let mut total: u64 = entries.iter().map(|e| e.1).sum();
    entries.sort_by_key(|e| e.0);
    for (_, size, name, path) in entries {
        if total <= budget {
            break;
        }
        if Some(name.as_str()) == keep {
            continue;
        }
        tracing::info!(
            "layer cache: removing least recently used {} ({}) to stay within {}",
            path.display(),
            crate::host::progress::human_size(size),
            crate::host::progress::human_size(budget)
        );
        if remove_entry(&path) {
            total -= size;
        }
    }
    Ok(())
}

fn put(h: &mut Sha256, field: &str, value: &[u8]) {
    h.update(field.as_bytes());
    h.update((value.len() as u64).to_le_bytes());
    h.update(value);
}

/// The key of the root before the first stage.
fn root_key(o: &Origin) -> Result<String> {
    let exe = std::env::current_exe().context("finding the kiln executable")?;
    let kiln = crate::disk::checksum::sha256_file(&exe, None)?;
    let mut h = Sha256::new();
    put(&mut h, "format", FORMAT.as_bytes());
    put(&mut h, "kiln", &kiln);
    put(&mut h, "base", o.base_sha256.as_bytes());
    put(&mut h, "fresh_root", &[o.fresh_root as u8]);
    put(&mut h, "sde", format!("{:?}", o.source_date_epoch).as_bytes());
    put(&mut h, "dkms_cache", &[o.dkms_cache as u8]);
    Ok(crate::disk::checksum::hex(&h.finalize().into()))
}

/// `keys[i]`: the key of the root after stages `0..=i` of `def`.
pub fn stage_keys(
    def: &ImageDef,
    root: &str,
    overrides: &[crate::build::stages::apt::RepoOverride],
) -> Result<Vec<String>> {
    let mut prev = root.to_string();
    let mut out = Vec::new();
    for s in &def.stages {
        prev = stage_key(def, s, &prev, overrides).with_context(|| format!("stage {} of {}", s.name, def.name))?;
        out.push(prev.clone());
    }
    Ok(out)
}

fn stage_key(
    def: &ImageDef,
    s: &Stage,
    prev: &str,
    overrides: &[crate::build::stages::apt::RepoOverride],
) -> Result<String> {
    let file_sha = |p: &Path| -> Result<[u8; 32]> { crate::disk::checksum::sha256_file(p, None) };
    let mut h = Sha256::new();
    put(&mut h, "prev", prev.as_bytes());
    put(&mut h, "name", s.name.as_bytes());
    put(&mut h, "full_upgrade", &[s.full_upgrade as u8]);
    put(&mut h, "kernel_headers", &[s.kernel_headers as u8]);
    for id in &s.repositories {
        let r = def.repository(id).context("unknown repository")?;
        put(
            &mut h,
            "repo",
            format!("{}\n{}\n{}\n{}", r.id, r.uri, r.suite, r.components.join(" ")).as_bytes(),
        );
        put(&mut h, "repo_key", &file_sha(&def.project_root.join(&r.key))?);
        if let Some(o) = overrides.iter().find(|o| &o.id == id) {
            put(&mut h, "override", o.uri.as_bytes());
            if let Some(k) = &o.key {
                put(&mut h, "override_key", &file_sha(k)?);
            }
        }
    }
    for p in &s.packages {
        let pool = p
            .pool
            .as_ref()
            .map(|x| format!("{} {}", x.path, x.sha256))
            .unwrap_or_default();
        put(
            &mut h,
            "package",
            format!("{}\n{}\n{pool}", p.name, p.version.as_deref().unwrap_or("")).as_bytes(),
        );
    }
    for x in &s.hold {
        put(&mut h, "hold", x.as_bytes());
    }
    for x in &s.require_modules {
        put(&mut h, "module", x.as_bytes());
    }
    for (what, dirs) in [("overlay", &s.overlays), ("hooks", &s.hooks)] {
        for d in dirs {
            put(&mut h, what, tree_sha256(d)?.as_bytes());
        }
    }
    Ok(crate::disk::checksum::hex(&h.finalize().into()))
}

/// sha256 over a host directory: each entry's path relative to it, mode, and content
/// (a symlink's target), in sorted order.
fn tree_sha256(dir: &Path) -> Result<String> {
    use std::os::unix::fs::MetadataExt;
    let mut h = Sha256::new();
    let mut stack = vec![dir.to_path_buf()];
    let mut all = Vec::new();
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))? {
            let p = e?.path();
            let md = std::fs::symlink_metadata(&p)?;
            if md.is_dir() {
                stack.push(p.clone());
            }
            all.push((p, md));
        }
    }
    all.sort_by(|a, b| a.0.cmp(&b.0));
    for (p, md) in all {
        let rel = p.strip_prefix(dir).unwrap_or(&p);
        put(&mut h, "path", rel.as_os_str().as_encoded_bytes());
        put(&mut h, "mode", &md.mode().to_le_bytes());
        if md.is_symlink() {
            put(&mut h, "link", std::fs::read_link(&p)?.as_os_str().as_encoded_bytes());
        } else if md.is_file() {
            put(&mut h, "data", &crate::disk::checksum::sha256_file(&p, None)?);
        }
    }
    Ok(crate::disk::checksum::hex(&h.finalize().into()))
}

/// The definitions in `def`'s directory that it extends or that extend it, each as the
/// same variant where they have the parameter (defaults otherwise). Ones that do not
/// load are left out: they only decide where layers are stored.
fn related(def: &ImageDef, sets: &[Setting]) -> Vec<ImageDef> {
    let Some(dir) = def.file.parent() else {
        return vec![];
    };
    let Ok(listing) = crate::definition::list(dir) else {
        return vec![];
    };
    let mine = std::fs::canonicalize(&def.file).unwrap_or(def.file.clone());
    let canon = |p: &Path| std::fs::canonicalize(p).unwrap_or(p.to_path_buf());
    let mut out = Vec::new();
    for l in listing {
        if canon(&l.file) == mine {
            continue;
        }
        let own: Vec<Setting> = sets
            .iter()
            .filter(|s| l.parameters.iter().any(|p| p.name == s.name))
            .cloned()
            .collect();
        let Ok(other) = crate::definition::load_with(&l.file, &own) else {
            continue;
        };
        let extends_me = other.chain.iter().any(|f| canon(f) == mine);
        let extended = def.chain.iter().any(|f| canon(f) == canon(&other.file));
        if extends_me || extended {
            out.push(other);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom, Write};

    /// A cache entry with a sparse 64 MiB root.raw holding two data pieces.
    fn entry(dir: &Path, key: &str) -> PathBuf {
        let e = dir.join(key);
        std::fs::create_dir_all(&e).unwrap();
        let mut f = crate::disk::sparse::create_sized(&e.join(ROOT), 64 << 20).unwrap();
        f.seek(SeekFrom::Start(1 << 20)).unwrap();
        f.write_all(&[7u8; 8192]).unwrap();
        f.seek(SeekFrom::Start(40 << 20)).unwrap();
        f.write_all(b"root filesystem").unwrap();
        drop(f);
        let (data_sha256, data_bytes) = crate::disk::checksum::sha256_data(&e.join(ROOT)).unwrap();
        let m = Manifest {
            format: FORMAT.into(),
            key: key.into(),
            definition: "d".into(),
            stages: vec!["one".into()],
            created: now(),
            disk_size: 64 << 20,
            data_sha256,
            data_bytes,
            base_installed: vec![],
            releases: BTreeMap::new(),
        };
        std::fs::write(e.join(MANIFEST), serde_json::to_vec(&m).unwrap()).unwrap();
        e
    }

    fn plan(dir: &Path, keys: &[&str]) -> Plan {
        Plan {
            dir: dir.to_path_buf(),
            keys: keys.iter().map(|k| k.to_string()).collect(),
            store_after: BTreeSet::new(),
            hit: None,
            report: Report::default(),
        }
    }

    #[test]
    fn longest_cached_prefix_is_used() {
        let tmp = tempfile::tempdir().unwrap();
        entry(tmp.path(), "k1");
        let mut p = plan(tmp.path(), &["k1", "k2", "k3"]);
        let hit = p.find(64 << 20).expect("k1 is cached");
        assert_eq!(hit.manifest.key, "k1");
        entry(tmp.path(), "k2");
        assert_eq!(p.find(64 << 20).unwrap().manifest.key, "k2");
        // A layer for a larger disk than the one being built is not used (nor removed).
        assert!(p.find(32 << 20).is_none());
        assert!(tmp.path().join("k2").is_dir());
    }

    #[test]
    fn damaged_entries_are_removed_not_used() {
        let tmp = tempfile::tempdir().unwrap();
        let e = entry(tmp.path(), "k1");
        // One byte of the data changed: the data sha256 no longer matches.
        let mut f = std::fs::OpenOptions::new().write(true).open(e.join(ROOT)).unwrap();
        f.seek(SeekFrom::Start((40 << 20) + 2)).unwrap();
        f.write_all(b"X").unwrap();
        drop(f);
        let mut p = plan(tmp.path(), &["k1"]);
        assert!(p.find(64 << 20).is_none(), "a damaged layer was used");
        assert!(!e.exists(), "the damaged layer was kept");
        assert_eq!(p.report.removed.len(), 1);
        // Truncated, and a manifest for another key: the same.
        let e = entry(tmp.path(), "k1");
        std::fs::File::options()
            .write(true)
            .open(e.join(ROOT))
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        assert!(p.find(64 << 20).is_none());
        assert!(!e.exists());
        let e = entry(tmp.path(), "k1");
        std::fs::rename(&e, tmp.path().join("k9")).unwrap();
        let mut p = plan(tmp.path(), &["k9"]);
        assert!(p.find(64 << 20).is_none());
        assert!(!tmp.path().join("k9").exists());
    }

    #[test]
    fn expired_entries_are_not_used() {
        let tmp = tempfile::tempdir().unwrap();
        let e = entry(tmp.path(), "k1");
        let mut m: Manifest = serde_json::from_slice(&std::fs::read(e.join(MANIFEST)).unwrap()).unwrap();
        m.created -= MAX_AGE.as_secs() + 60;
        std::fs::write(e.join(MANIFEST), serde_json::to_vec(&m).unwrap()).unwrap();
        let mut p = plan(tmp.path(), &["k1"]);
        assert!(p.find(64 << 20).is_none());
        assert!(!e.exists());
    }

    #[test]
    fn prune_keeps_the_budget_least_recently_used_first() {
        let tmp = tempfile::tempdir().unwrap();
        let old = entry(tmp.path(), "old");
        let set = |e: &Path, secs: u64| {
            std::fs::File::options()
                .append(true)
                .open(e.join(MANIFEST))
                .unwrap()
                .set_modified(std::time::SystemTime::now() - std::time::Duration::from_secs(secs))
                .unwrap();
        };
        set(&old, 300);
        let new = entry(tmp.path(), "new");
        set(&new, 100);
        let kept = entry(tmp.path(), "kept");
        set(&kept, 500);
        // Each takes 3 blocks' worth or more; a budget for about two entries.
        use std::os::unix::fs::MetadataExt;
        let one = std::fs::metadata(old.join(ROOT)).unwrap().blocks() * 512;
        std::fs::write(tmp.path().join(RECENT), b"[]").unwrap();
        prune(tmp.path(), 2 * one, Some("kept")).unwrap();
        assert!(tmp.path().join(RECENT).is_file(), "recent.json is not an entry");
        assert!(kept.exists(), "the entry to keep was removed");
        assert!(!old.exists(), "the least recently used entry was kept");
        assert!(new.exists());
    }

    /// Variants built one after another: each records its keys; the next stores the
    /// prefix it shares with an earlier one; a build identical to an earlier one, or
    /// sharing nothing, stores nothing; records expire and are bounded.
    #[test]
    fn builds_learn_the_prefixes_they_share_with_recent_ones() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path().join("layers");
        let k = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let v565_130 = k(&["sys", "gpu", "nv565", "k130", "end1"]);
        let v565_129 = k(&["sys", "gpu", "nv565", "k129", "end2"]);
        let v550_130 = k(&["sys", "gpu", "nv550", "k130b", "end3"]);
        let other = k(&["noble", "x"]);
        assert!(
            shared_with_recent(&d, &v565_130).unwrap().is_empty(),
            "nothing recent yet"
        );
        assert_eq!(shared_with_recent(&d, &v565_129).unwrap(), BTreeSet::from([3]));
        assert_eq!(shared_with_recent(&d, &v550_130).unwrap(), BTreeSet::from([2]));
        assert!(shared_with_recent(&d, &other).unwrap().is_empty());
        // The same build again: only what it shares with the others.
        assert_eq!(shared_with_recent(&d, &v565_130).unwrap(), BTreeSet::from([2, 3]));
        // Expired records teach nothing.
        let mut r: Vec<Recent> = serde_json::from_slice(&std::fs::read(d.join(RECENT)).unwrap()).unwrap();
        assert_eq!(r.len(), 4);
        for x in &mut r {
            x.at -= MAX_AGE.as_secs() + 1;
        }
        std::fs::write(d.join(RECENT), serde_json::to_vec(&r).unwrap()).unwrap();
        assert!(shared_with_recent(&d, &v565_129).unwrap().is_empty());
        for i in 0..RECENT_MAX + 5 {
            shared_with_recent(&d, &k(&["sys", &format!("s{i}")])).unwrap();
        }
        let r: Vec<Recent> = serde_json::from_slice(&std::fs::read(d.join(RECENT)).unwrap()).unwrap();
        assert_eq!(r.len(), RECENT_MAX);
        // A damaged record file is started afresh, not an error.
        std::fs::write(d.join(RECENT), b"{not json").unwrap();
        assert!(shared_with_recent(&d, &v565_130).unwrap().is_empty());
    }

    /// A layer another build starts from (it holds the entry's shared lock) survives a
    /// prune by a third build that wants the space; once released, it goes.
    #[test]
    fn a_layer_in_use_is_not_pruned() {
        let tmp = tempfile::tempdir().unwrap();
        let e = entry(tmp.path(), "k1");
        let mut p = plan(tmp.path(), &["k1"]);
        let hit = p.find(64 << 20).expect("a valid layer");
        prune(tmp.path(), 0, None).unwrap();
        assert!(e.join(ROOT).is_file(), "a layer in use was pruned");
        // Stale for the build using it: kept while another holds it too.
        let other = hit.clone();
        p.hit = Some(hit);
        p.drop_hit();
        assert!(
            e.is_dir() && p.report.removed.is_empty(),
            "removed while another build holds it"
        );
        drop(other);
        prune(tmp.path(), 0, None).unwrap();
        assert!(!e.exists(), "a released layer over the budget was kept");
    }

    #[test]
    fn keys_are_cumulative_and_follow_stage_inputs() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        std::fs::create_dir_all(d.join("images")).unwrap();
        std::fs::create_dir_all(d.join("overlays/o/etc")).unwrap();
        std::fs::write(d.join("overlays/o/etc/x.conf"), "a=1\n").unwrap();
        std::fs::write(
            d.join("images/p.toml"),
            "name = \"p\"\ndescription = \"d\"\ndisk_size = \"1G\"\n[payload]\nuri = \"https://b.example/{name}.raw\"\n[[stage]]\nname = \"one\"\noverlays = [\"o\"]\n[[stage]]\nname = \"two\"\n",
        )
        .unwrap();
        std::fs::write(
            d.join("images/c.toml"),
            "extends = \"p.toml\"\nname = \"c\"\ndisk_size = \"2G\"\n[[stage]]\nname = \"mid\"\nbefore = \"two\"\n",
        )
        .unwrap();
        let p = crate::definition::load(&d.join("images/p.toml")).unwrap();
        let c = crate::definition::load(&d.join("images/c.toml")).unwrap();
        let kp = stage_keys(&p, "root", &[]).unwrap();
        let kc = stage_keys(&c, "root", &[]).unwrap();
        // c = one, mid, two: it shares only the first stage with p.
        assert_eq!(kp[0], kc[0]);
        assert_ne!(kp[1], kc[2], "stage two follows different roots");
        assert_ne!(stage_keys(&p, "other root", &[]).unwrap()[0], kp[0]);
        // The child and the parent are related and store after their common prefix.
        assert_eq!(related(&p, &[]).len(), 1);
        assert_eq!(related(&c, &[]).len(), 1);
        // An overlay's content is in the key of its stage and every later one.
        std::fs::write(d.join("overlays/o/etc/x.conf"), "a=2\n").unwrap();
        let changed = stage_keys(&p, "root", &[]).unwrap();
        assert_ne!(changed[0], kp[0]);
        assert_ne!(changed[1], kp[1]);
    }
}
