//! Locks: `images/NAME.lock`, what one resolution of a definition installed, so that a
//! later build installs exactly that (`kiln build --locked`), with or without network
//! (`kiln fetch` + `--offline --archive DIR`).
//!
//! A lock is TOML, sorted and one fact per line, so that `git diff` of an update reads
//! as the list of what changed: the base (file, URL, sha256, size), every repository
//! apt read (id, URI, suite, components, the fingerprints that signed its
//! InRelease/Release, that file's sha256 and `Date:`), every package installed in the
//! finished image (the base's and the build's: name, version, architecture, repository
//! id, pool file name, size, sha256, and whether the base already had it), the
//! `SOURCE_DATE_EPOCH` of locked builds, the `--repo-override`s it was made with, and a
//! digest of the definition's inputs (`kiln lock --check` compares it).
//!
//! The package records ([`LockedPackage`]) are gathered at the end of provisioning on
//! every build (`build::resolve`) and returned in the [`crate::build::BuildReport`]; a
//! lock is those records written down.

use crate::build::stages::apt::RepoOverride;
use crate::definition::ImageDef;
use crate::error::user;
use crate::user_bail;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The lock format's version (`lock_version` in the file).
pub const LOCK_VERSION: u32 = 1;

/// One lock file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LockFile {
    pub lock_version: u32,
    /// The definition's `name`.
    pub definition: String,
    /// sha256 over the definition's inputs (its `extends` chain, package lists, keys,
    /// overlays and hooks): `kiln lock --check` says the lock is stale when it changed.
    pub inputs_sha256: String,
    /// Exported to every command of a locked build; file times are clamped to it.
    pub source_date_epoch: u64,
    pub base: LockedBase,
    /// `--repo-override`s the lock was made with (a lock made against a stand-in or a
    /// mirror says so; `--locked` demands the same overrides).
    #[serde(default, rename = "override", skip_serializing_if = "Vec::is_empty")]
    pub overrides: Vec<LockedOverride>,
    #[serde(rename = "repository")]
    pub repositories: Vec<LockedRepository>,
    #[serde(rename = "package")]
    pub packages: Vec<LockedPackage>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LockedBase {
    /// File name (of the URL, or of the `--base` file).
    pub file: String,
    /// Where the definition's `[base]` downloads it from; absent for a `--base` file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    pub sha256: String,
    pub size: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LockedOverride {
    pub id: String,
    pub uri: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LockedRepository {
    /// The definition's repository id, or for the image's own sources (the Ubuntu
    /// archive) the suite (`jammy-updates`).
    pub id: String,
    /// Where the packages were fetched from (the override's URI when overridden).
    pub uri: String,
    pub suite: String,
    pub components: Vec<String>,
    /// Fingerprints of the keys whose signatures the InRelease (or Release.gpg) carries.
    pub fingerprints: Vec<String>,
    /// `InRelease`, or `Release` for a repository without one.
    pub release_file: String,
    pub release_sha256: String,
    /// Its `Date:` field.
    pub release_date: String,
}

impl LockedRepository {
    /// URL of the Release file this record was made from (for `--check`).
    pub fn release_url(&self) -> String {
        let base = self.uri.trim_end_matches('/');
        if self.suite.ends_with('/') {
            let suite = self.suite.trim_end_matches('/');
            if suite.is_empty() || suite == "." {
                format!("{base}/{}", self.release_file)
            } else {
                format!("{base}/{suite}/{}", self.release_file)
            }
        } else {
            format!("{base}/dists/{}/{}", self.suite, self.release_file)
        }
    }
}

/// One installed package, as a lock records it and as every build reports it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LockedPackage {
    pub name: String,
    pub version: String,
    pub architecture: String,
    /// Id of the [`LockedRepository`] whose index lists it ("" when none does: a base
    /// package whose version has left the archive).
    pub repository: String,
    /// Pool path relative to the repository URI (the index's `Filename:`), "" if unknown.
    pub filename: String,
    pub size: u64,
    /// sha256 of the .deb ("" if unknown: only for packages the base already had).
    pub sha256: String,
    /// The base had exactly this version: a locked build needs no .deb for it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub in_base: bool,
}

impl LockedPackage {
    /// The .deb's file name (the last part of its pool path).
    pub fn deb_name(&self) -> String {
        match self.filename.rsplit('/').next().filter(|s| !s.is_empty()) {
            Some(n) => n.to_string(),
            None => format!(
                "{}_{}_{}.deb",
                self.name,
                self.version.split_once(':').map_or(self.version.as_str(), |(_, v)| v),
                self.architecture
            ),
        }
    }
    pub fn key(&self) -> (String, String) {
        (self.name.clone(), self.architecture.clone())
    }
}

/// What a build resolved: the repositories apt read and every installed package.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Resolution {
    pub repositories: Vec<LockedRepository>,
    pub packages: Vec<LockedPackage>,
}

impl Resolution {
    /// Download URL of a package's .deb (its repository's URI + pool path), if known.
    pub fn download_url(&self, p: &LockedPackage) -> Option<String> {
        download_url(&self.repositories, p)
    }

    /// The packages' .deb sha256 and download URL, as the SBOM records them.
    pub fn sbom_records(&self) -> crate::image::sbom::PackageRecords {
        self.packages
            .iter()
            .filter(|p| !p.sha256.is_empty())
            .map(|p| {
                (
                    crate::image::sbom::PackageKey {
                        name: p.name.clone(),
                        version: p.version.clone(),
                        arch: p.architecture.clone(),
                    },
                    crate::image::sbom::DebRecord {
                        sha256: p.sha256.clone(),
                        // SPDX takes network locations only: a local (file:) repository
                        // such as a --repo-override directory says nothing to a reader.
                        url: self
                            .download_url(p)
                            .filter(|u| ["http://", "https://", "ftp://"].iter().any(|s| u.starts_with(s)))
                            .unwrap_or_else(|| "NOASSERTION".into()),
                    },
                )
            })
            .collect()
    }
}

pub fn download_url(repos: &[LockedRepository], p: &LockedPackage) -> Option<String> {
    if p.filename.is_empty() {
        return None;
    }
    let r = repos.iter().find(|r| r.id == p.repository)?;
    Some(format!(
        "{}/{}",
        r.uri.trim_end_matches('/'),
        p.filename.trim_start_matches("./")
    ))
}

/// The lock file of a definition: `images/NAME.lock` next to `images/NAME.toml`.
pub fn lock_path(def: &ImageDef) -> PathBuf {
    // A variant (`--set` away from a default) has its own lock beside the default's:
    // images/NAME+driver=550.lock.
    let mut name = def.file.file_stem().unwrap_or_default().to_os_string();
    for p in def.parameters.iter().filter(|p| p.value != p.default) {
        name.push(format!("+{}={}", p.name, p.value));
    }
    name.push(".lock");
    def.file.with_file_name(name)
}

impl LockFile {
    pub fn load(path: &Path) -> Result<LockFile> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            user(format!(
                "cannot read lock file {}: {e}; make it with `kiln lock DEF`",
                path.display()
            ))
        })?;
        let lock: LockFile = toml::from_str(&text).map_err(|e| user(format!("lock file {}: {e}", path.display())))?;
        if lock.lock_version != LOCK_VERSION {
            user_bail!(
                "lock file {} has lock_version {}; this kiln reads version {LOCK_VERSION}: run `kiln lock --update`",
                path.display(),
                lock.lock_version
            );
        }
        Ok(lock)
    }

    /// Sorted TOML with a header comment.
    pub fn to_toml(&self) -> Result<String> {
        let mut l = self.clone();
        l.overrides.sort();
        l.repositories.sort_by(|a, b| a.id.cmp(&b.id));
        l.packages.sort();
        let body = toml::to_string(&l).context("serializing the lock")?;
        let mut head = format!(
            "# kiln lock of images/{}.toml: what `kiln build --locked` installs. Made by `kiln lock`;\n\
             # refresh with `kiln lock --update`, check with `kiln lock --check`. Do not edit.\n",
            self.definition
        );
        if !l.overrides.is_empty() {
            head.push_str(
                "# Made with --repo-override: pinned to the overriding repositories, not the definition's.\n",
            );
        }
        Ok(format!("{head}\n{body}"))
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let tmp = path.with_extension("lock.partial");
        std::fs::write(&tmp, self.to_toml()?).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("renaming {} into place", tmp.display()))
    }

    /// The packages a locked build installs from .debs (those the base lacks).
    pub fn needed(&self) -> impl Iterator<Item = &LockedPackage> {
        self.packages.iter().filter(|p| !p.in_base)
    }

    pub fn repository(&self, id: &str) -> Option<&LockedRepository> {
        self.repositories.iter().find(|r| r.id == id)
    }

    /// `--locked` demands the overrides the lock was made with, no more, no fewer.
    pub fn check_overrides(&self, path: &Path, given: &[RepoOverride]) -> Result<()> {
        let mut given: Vec<LockedOverride> = given.iter().map(LockedOverride::from).collect();
        given.sort();
        let mut want = self.overrides.clone();
        want.sort();
        if given == want {
            return Ok(());
        }
        let show = |v: &[LockedOverride]| {
            if v.is_empty() {
                "none".to_string()
            } else {
                v.iter()
                    .map(|o| format!("--repo-override {}={}", o.id, o.uri))
                    .collect::<Vec<_>>()
                    .join(" ")
            }
        };
        user_bail!(
            "lock file {} was made with repository overrides {}, this build has {}; a lock made against a mirror \
             or stand-in is pinned to it: pass the same --repo-override flags, or make a lock without them \
             (`kiln lock --update`)",
            path.display(),
            show(&want),
            show(&given)
        );
    }
}

impl From<&RepoOverride> for LockedOverride {
    fn from(o: &RepoOverride) -> Self {
        LockedOverride {
            id: o.id.clone(),
            uri: o.uri.clone(),
        }
    }
}

/// sha256 over everything a definition is made of (the `extends` chain, its package
/// lists, keys, overlays and hooks), in a fixed order.
pub fn inputs_sha256(def: &ImageDef) -> Result<String> {
    use sha2::Digest;
    let mut files: Vec<PathBuf> = def.chain.clone();
    for r in &def.repositories {
        files.push(def.project_root.join(&r.key));
    }
    for s in &def.stages {
        for d in s.overlays.iter().chain(&s.hooks) {
            collect(d, &mut files)?;
        }
    }
    let mut lists: Vec<&str> = def
        .stages
        .iter()
        .flat_map(|s| s.packages.iter().map(|p| p.origin.as_str()))
        .filter_map(|o| o.rsplit_once(':').map(|(f, _)| f))
        .collect();
    lists.sort();
    lists.dedup();
    files.extend(lists.iter().map(PathBuf::from));
    let mut h = sha2::Sha256::new();
    for f in &files {
        let rel = f.strip_prefix(&def.project_root).unwrap_or(f);
        h.update(rel.to_string_lossy().as_bytes());
        h.update([0]);
        h.update(std::fs::read(f).with_context(|| format!("reading {}", f.display()))?);
        h.update([0]);
    }
    Ok(hex::encode(h.finalize()))
}

fn collect(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            collect(&p, out)?;
        } else {
            out.push(p);
        }
    }
    Ok(())
}

/// Seconds since 1970 of a Release file's `Date:` (RFC 2822, `Thu, 04 Dec 2024
/// 00:00:00 UTC`).
pub fn parse_release_date(d: &str) -> Option<u64> {
    let w: Vec<&str> = d.split_whitespace().collect();
    let w = if w.first()?.ends_with(',') { &w[1..] } else { &w[..] };
    let (day, mon, year, time) = (
        w.first()?.parse::<i64>().ok()?,
        *w.get(1)?,
        w.get(2)?.parse::<i64>().ok()?,
        w.get(3)?,
    );
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let m = MONTHS.iter().position(|x| x.eq_ignore_ascii_case(mon))? as i64 + 1;
    let hms: Vec<i64> = time.split(':').map(|x| x.parse().ok()).collect::<Option<_>>()?;
    // Days from civil (Howard Hinnant's algorithm).
    let (y, m) = if m <= 2 { (year - 1, m + 9) } else { (year, m - 3) };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * m + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hms.first()? * 3600 + hms.get(1)? * 60 + hms.get(2).copied().unwrap_or(0);
    u64::try_from(secs).ok()
}

/// Options of `kiln lock`.
pub struct LockOpts {
    /// The build that resolves the definition (stopped before finalize).
    pub build: crate::build::BuildOpts,
    /// Replace an existing lock.
    pub update: bool,
}

/// `kiln lock DEF`: resolve the definition with a build that stops before finalize, and
/// write `images/NAME.lock`.
pub fn cmd_lock(o: &LockOpts) -> Result<()> {
    let started = std::time::Instant::now();
    let def = crate::definition::load_with(&o.build.def, &o.build.sets)?;
    let path = lock_path(&def);
    let old = if path.exists() {
        if !o.update {
            user_bail!(
                "{} exists; `kiln lock --update` refreshes it, `kiln lock --check` tells whether it is stale",
                path.display()
            );
        }
        Some(LockFile::load(&path)?)
    } else {
        None
    };
    let mut t = crate::build::timings::Timings::default();
    let report = crate::build::build(&o.build, &mut t)?;
    let Some(res) = report.resolution else {
        user_bail!(
            "{} installs no packages (no apt stage), or apt's sources could not be read: nothing to lock",
            def.file.display()
        );
    };
    let unknown: Vec<String> = res
        .packages
        .iter()
        .filter(|p| p.sha256.is_empty() && !p.in_base)
        .map(|p| format!("{}={}", p.name, p.version))
        .collect();
    if !unknown.is_empty() {
        user_bail!(
            "cannot lock {}: no repository index lists, and the package cache does not hold, {}",
            def.file.display(),
            unknown.join(", ")
        );
    }
    let base_size = std::fs::metadata(&report.base)?.len();
    let pinned = def
        .base
        .as_ref()
        .filter(|b| o.build.base.is_none() && b.sha256 == report.base_sha256);
    let base = LockedBase {
        file: match pinned {
            Some(b) => b.url.rsplit('/').next().unwrap_or(&b.url).to_string(),
            None => report
                .base
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        },
        url: pinned.map(|b| b.url.clone()),
        sha256: report.base_sha256.clone(),
        size: base_size,
    };
    let epoch = match crate::build::pipeline::source_date_epoch_env()? {
        Some(e) => e,
        None => res
            .repositories
            .iter()
            .filter_map(|r| parse_release_date(&r.release_date))
            .max()
            .unwrap_or(0),
    };
    let lock = LockFile {
        lock_version: LOCK_VERSION,
        definition: def.name.clone(),
        inputs_sha256: inputs_sha256(&def)?,
        source_date_epoch: epoch,
        base,
        overrides: o
            .build
            .provision
            .repo_overrides
            .iter()
            .map(LockedOverride::from)
            .collect(),
        repositories: res.repositories,
        packages: res.packages,
    };
    lock.save(&path)?;
    let needed: Vec<&LockedPackage> = lock.needed().collect();
    println!(
        "locked {} in {}: {} packages ({} to install, {}), {} repositories, base {}, SOURCE_DATE_EPOCH {} ({:.0} s)",
        def.name,
        path.display(),
        lock.packages.len(),
        needed.len(),
        crate::host::progress::human_size(needed.iter().map(|p| p.size).sum()),
        lock.repositories.len(),
        lock.base.file,
        lock.source_date_epoch,
        started.elapsed().as_secs_f64()
    );
    if let Some(old) = old {
        let changes = package_changes(&old.packages, &lock.packages);
        println!("{} package changes", changes.len());
        for c in changes {
            println!("  {c}");
        }
    }
    Ok(())
}

/// `kiln lock --check`: is the lock stale? It is when the definition's inputs changed
/// or a repository serves another Release file than the one the lock was made from (a
/// new resolution could then pick other versions). Returns the reasons (empty: fresh).
pub fn check(def_path: &Path, sets: &[crate::definition::Setting]) -> Result<Vec<String>> {
    let def = crate::definition::load_with(def_path, sets)?;
    let path = lock_path(&def);
    let lock = LockFile::load(&path)?;
    let mut stale = Vec::new();
    if inputs_sha256(&def)? != lock.inputs_sha256 {
        stale.push(format!(
            "the definition's inputs changed ({} and its package lists, keys, overlays, hooks)",
            def.file.display()
        ));
    }
    let policy = crate::host::download::Policy::from_env();
    for r in &lock.repositories {
        let url = r.release_url();
        match crate::host::download::fetch_bytes(&url, &policy, 64 << 20) {
            Ok(b) => {
                let sha = crate::disk::checksum::hex(&{
                    use sha2::Digest;
                    sha2::Sha256::digest(&b).into()
                });
                if sha != r.release_sha256 {
                    let date = String::from_utf8_lossy(&b)
                        .lines()
                        .find_map(|l| l.strip_prefix("Date:").map(|d| d.trim().to_string()))
                        .unwrap_or_default();
                    stale.push(format!(
                        "repository {} has a new {} ({url}): Date {date}, the lock's is {}",
                        r.id, r.release_file, r.release_date
                    ));
                }
            }
            Err(e) => stale.push(format!("repository {}: cannot read {url}: {e}", r.id)),
        }
    }
    Ok(stale)
}

/// Added, removed and changed packages between two package lists, one line each
/// (`+ name version`, `- name version`, `~ name old -> new`).
pub fn package_changes(old: &[LockedPackage], new: &[LockedPackage]) -> Vec<String> {
    let map = |v: &[LockedPackage]| -> BTreeMap<(String, String), String> {
        v.iter().map(|p| (p.key(), p.version.clone())).collect()
    };
    let (a, b) = (map(old), map(new));
    let mut out = Vec::new();
    for ((n, arch), v) in &a {
        match b.get(&(n.clone(), arch.clone())) {
            None => out.push(format!("- {n}:{arch} {v}")),
            Some(w) if w != v => out.push(format!("~ {n}:{arch} {v} -> {w}")),
            _ => {}
        }
    }
    for ((n, arch), v) in &b {
        if !a.contains_key(&(n.clone(), arch.clone())) {
            out.push(format!("+ {n}:{arch} {v}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The default's lock is images/NAME.lock; a variant's names its settings, so locking
    /// one never replaces the other.
    #[test]
    fn each_variant_has_its_own_lock() {
        let def = Path::new(env!("CARGO_MANIFEST_DIR")).join("images/ubuntu-2204-nvidia-565-firmware1.toml");
        let load = |sets: &[&str]| {
            let sets: Vec<crate::definition::Setting> = sets.iter().map(|s| s.parse().unwrap()).collect();
            lock_path(&crate::definition::load_with(&def, &sets).unwrap())
        };
        assert_eq!(load(&[]), def.with_extension("lock"));
        assert_eq!(
            load(&["driver=565"]),
            def.with_extension("lock"),
            "a default is no variant"
        );
        let v = load(&["driver=550", "kubernetes=1.29"]);
        let name = v.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            name.starts_with("ubuntu-2204-nvidia-565-firmware1+")
                && name.contains("+driver=550")
                && name.contains("+kubernetes=1.29")
                && name.ends_with(".lock"),
            "{name}"
        );
        assert_eq!(v.parent(), def.parent());
    }

    fn pkg(name: &str, version: &str) -> LockedPackage {
        LockedPackage {
            name: name.into(),
            version: version.into(),
            architecture: "amd64".into(),
            repository: "jammy-updates".into(),
            filename: format!("pool/main/{}/{name}/{name}_{version}_amd64.deb", &name[..1]),
            size: 10,
            sha256: "a".repeat(64),
            in_base: false,
        }
    }

    fn lock() -> LockFile {
        LockFile {
            lock_version: LOCK_VERSION,
            definition: "x".into(),
            inputs_sha256: "b".repeat(64),
            source_date_epoch: 1_700_000_000,
            base: LockedBase {
                file: "base.tar".into(),
                url: None,
                sha256: "c".repeat(64),
                size: 5,
            },
            overrides: vec![],
            repositories: vec![
                LockedRepository {
                    id: "kubernetes".into(),
                    uri: "https://pkgs.k8s.io/core:/stable:/v1.30/deb/".into(),
                    suite: "/".into(),
                    components: vec![],
                    fingerprints: vec!["DE15B14486CD377B9E876E1A234654DA9A296436".into()],
                    release_file: "InRelease".into(),
                    release_sha256: "d".repeat(64),
                    release_date: "Thu, 01 Jan 2024 00:00:00 UTC".into(),
                },
                LockedRepository {
                    id: "jammy-updates".into(),
                    uri: "http://archive.ubuntu.com/ubuntu".into(),
                    suite: "jammy-updates".into(),
                    components: vec!["main".into(), "universe".into()],
                    fingerprints: vec![],
                    release_file: "InRelease".into(),
                    release_sha256: "e".repeat(64),
                    release_date: "Thu, 01 Jan 2024 00:00:00 UTC".into(),
                },
            ],
            packages: vec![pkg("zlib1g", "1:1.2.11"), pkg("bash", "5.1-6ubuntu1")],
        }
    }

    #[test]
    fn round_trip_is_sorted_and_stable() {
        let l = lock();
        let text = l.to_toml().unwrap();
        assert!(text.find("name = \"bash\"").unwrap() < text.find("name = \"zlib1g\"").unwrap());
        assert!(text.find("id = \"jammy-updates\"").unwrap() < text.find("id = \"kubernetes\"").unwrap());
        assert!(!text.contains("in_base"), "{text}");
        let back: LockFile = toml::from_str(&text).unwrap();
        assert_eq!(back.to_toml().unwrap(), text);
        assert_eq!(back.packages.len(), 2);
    }

    #[test]
    fn urls_and_release_files() {
        let l = lock();
        assert_eq!(
            download_url(&l.repositories, &l.packages[1]).unwrap(),
            "http://archive.ubuntu.com/ubuntu/pool/main/b/bash/bash_5.1-6ubuntu1_amd64.deb"
        );
        assert_eq!(
            l.repositories[0].release_url(),
            "https://pkgs.k8s.io/core:/stable:/v1.30/deb/InRelease"
        );
        assert_eq!(
            l.repositories[1].release_url(),
            "http://archive.ubuntu.com/ubuntu/dists/jammy-updates/InRelease"
        );
        assert_eq!(l.packages[0].deb_name(), "zlib1g_1:1.2.11_amd64.deb");
        let mut p = pkg("x", "1:2");
        p.filename.clear();
        assert_eq!(p.deb_name(), "x_2_amd64.deb");
    }

    #[test]
    fn overrides_must_match() {
        let mut l = lock();
        let p = Path::new("images/x.lock");
        l.check_overrides(p, &[]).unwrap();
        let o: RepoOverride = "kubernetes=file:///srv/k".parse().unwrap();
        let e = l.check_overrides(p, std::slice::from_ref(&o)).unwrap_err();
        assert_eq!(crate::error::exit_code(&e), 2);
        l.overrides.push(LockedOverride::from(&o));
        l.check_overrides(p, &[o]).unwrap();
        let e = l.check_overrides(p, &[]).unwrap_err();
        assert!(e.to_string().contains("kubernetes=file:///srv/k"), "{e}");
    }

    #[test]
    fn release_dates() {
        assert_eq!(parse_release_date("Thu, 04 Dec 2024 00:00:00 UTC"), Some(1_733_270_400));
        assert_eq!(parse_release_date("Sun, 29 Nov 2026  3:25:35 UTC"), Some(1_795_922_735));
        assert_eq!(parse_release_date("Thu, 21 Apr 2022 17:16:08 UTC"), Some(1_650_561_368));
        assert_eq!(parse_release_date("garbage"), None);
    }

    #[test]
    fn changes() {
        let old = vec![pkg("a", "1"), pkg("b", "1")];
        let new = vec![pkg("b", "2"), pkg("c", "1")];
        assert_eq!(
            package_changes(&old, &new),
            ["- a:amd64 1", "~ b:amd64 1 -> 2", "+ c:amd64 1"]
        );
    }
}
