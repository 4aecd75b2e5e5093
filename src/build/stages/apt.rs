//! apt inside the image: repositories, update/upgrade/install, pins (including pins by
//! pool path), holds, and the build-time settings that make dpkg fast.
//!
//! Build-time settings (removed by [`Apt::finish`]): dpkg `force-unsafe-io` (the image
//! is synced once at the end), no recommends, man-db's auto-update off, and
//! `update_initramfs=no` so the initramfs is regenerated once per kernel at the end
//! instead of once per package. Downloads land in a host cache bind-mounted on
//! /var/cache/apt/archives, so a rebuild downloads nothing it already has.

use crate::build::stages::chroot::Session;
use crate::definition::{ImageDef, PackageSpec, Repository};
use crate::host::mounts::MountStack;
use crate::host::rootdir::RootDir;
use crate::user_bail;
use anyhow::{Context, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const APT_CONF: &str = "/etc/apt/apt.conf.d/99kiln-build";
const DPKG_CONF: &str = "/etc/dpkg/dpkg.cfg.d/kiln-unsafe-io";
const INITRAMFS_CONF: &str = "/etc/initramfs-tools/update-initramfs.conf";
const MANDB_FLAG: &str = "/var/lib/man-db/auto-update";
const ARCHIVES: &str = "/var/cache/apt/archives";
const LISTS: &str = "/var/lib/apt/lists";

/// `--repo-override ID=URI[,key=PATH]`: point a repository at a mirror or a local
/// directory for this build; the image keeps the definition's repository.
#[derive(Debug, Clone, PartialEq)]
pub struct RepoOverride {
    pub id: String,
    pub uri: String,
    pub key: Option<PathBuf>,
}

impl RepoOverride {
    /// Where a local (`file://`) override is bind-mounted in the build's root. Named by
    /// the host directory too, not by the id alone: apt's package indexes are cached
    /// across builds by URI, and two directories standing for the same repository (the
    /// v1.29 and v1.30 Kubernetes channels of two variants) must not share an index
    /// (apt refuses a repository whose Origin or Label changed).
    pub fn mount_point(&self) -> String {
        use sha2::{Digest, Sha256};
        let digest: [u8; 32] = Sha256::digest(self.uri.as_bytes()).into();
        format!(
            "/run/kiln/repos/{}-{}",
            self.id,
            &crate::disk::checksum::hex(&digest)[..12]
        )
    }
}

impl std::str::FromStr for RepoOverride {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (id, rest) = s.split_once('=').ok_or("expected ID=URI[,key=PATH]")?;
        let mut parts = rest.split(',');
        let uri = parts.next().unwrap_or_default().to_string();
        if id.is_empty() || uri.is_empty() {
            return Err("expected ID=URI[,key=PATH]".into());
        }
        let mut key = None;
        for p in parts {
            match p.split_once('=') {
                Some(("key", k)) => key = Some(PathBuf::from(k)),
                _ => return Err(format!("unknown option `{p}` (expected key=PATH)")),
            }
        }
        Ok(RepoOverride {
            id: id.into(),
            uri,
            key,
        })
    }
}

pub struct Apt<'a> {
    pub s: &'a Session,
    rd: &'a RootDir,
    /// The host side of the package cache bind-mounted on /var/cache/apt/archives.
    archives_host: PathBuf,
    /// Held while this build uses the shared package cache.
    _cache_lock: std::fs::File,
    saved_initramfs: Option<Vec<u8>>,
    mandb_flag: bool,
    overrides: Vec<RepoOverride>,
    /// Repositories configured so far (restored to the definition's form at the end).
    configured: Vec<Repository>,
    pub downloaded: u64,
    /// A locked build: apt sees only the lock's local repository.
    locked: bool,
    /// What the base had installed before provisioning.
    pub base_installed: std::collections::BTreeSet<crate::build::resolve::Installed>,
    /// The host side of the package indexes bind-mounted on /var/lib/apt/lists.
    lists_host: PathBuf,
    /// The build-time apt.conf ([`APT_CONF`]).
    conf: String,
}

/// Where a locked build's local repository appears inside the image.
const LOCKED_REPO: &str = "/run/kiln/locked";

impl<'a> Apt<'a> {
    pub fn setup(
        s: &'a Session,
        rd: &'a RootDir,
        mounts: &mut MountStack,
        cache_dir: &Path,
        overrides: &[RepoOverride],
        locked: Option<&crate::build::archive::LockedSource>,
    ) -> Result<Apt<'a>> {
        let base_installed = crate::build::resolve::installed(s)?;
        let archives = cache_dir.join("apt-archives");
        std::fs::create_dir_all(archives.join("partial"))
            .with_context(|| format!("creating package cache {}", archives.display()))?;
        // apt in two images sharing one cache would fight over its lock: builds that
        // share a cache take turns for the apt part of the build.
        let cache_lock = lock_cache(&archives, &cache_dir.join("apt-lists"))?;
        mounts.bind(&archives, &rd.mount_point(ARCHIVES)?, false)?;
        // The package indexes live in the cache too: a rebuild's apt update then only
        // revalidates them (If-Modified-Since, pdiffs) instead of downloading ~50 MB,
        // and the image never holds them (the scrub would empty them anyway).
        // A locked build's apt sees only the lock's local repository, with lists of
        // its own (an update there must not prune the shared index cache).
        let lists = match locked {
            Some(l) => l.repo_dir.join("lists"),
            None => cache_dir.join("apt-lists"),
        };
        std::fs::create_dir_all(lists.join("partial"))
            .with_context(|| format!("creating package index cache {}", lists.display()))?;
        mounts.bind(&lists, &rd.mount_point(LISTS)?, false)?;
        let archives_host = archives.clone();
        let mut conf = String::from(
            "// kiln build-time settings, removed after the build\n\
             Acquire::Retries \"3\";\nAPT::Install-Recommends \"false\";\nAPT::Install-Suggests \"false\";\n\
             Dpkg::Use-Pty \"0\";\nDpkg::Options { \"--force-confdef\"; \"--force-confold\"; };\n\
             APT::Keep-Downloaded-Packages \"true\";\nBinary::apt::APT::Keep-Downloaded-Packages \"true\";\n",
        );
        if let Some(l) = locked {
            crate::build::archive::write_local_repo(&l.repo_dir, &l.debs, &l.lock, LOCKED_REPO)?;
            mounts.bind(&l.repo_dir, &rd.mount_point(LOCKED_REPO)?, false)?;
            mounts.bind(&l.debs, &rd.mount_point(format!("{LOCKED_REPO}/debs"))?, false)?;
            conf += &format!(
                "Dir::Etc::SourceList \"{LOCKED_REPO}/sources.list\";\nDir::Etc::SourceParts \"{LOCKED_REPO}/parts\";\n"
            );
            tracing::info!(
                "locked build: apt installs only from the {} locked packages of {}",
                l.lock.packages.len(),
                l.lock_path.display()
            );
        }
        let saved_initramfs = if rd.exists(INITRAMFS_CONF)? {
            Some(rd.read(INITRAMFS_CONF)?)
        } else {
            None
        };
        let mandb_flag = rd.exists(MANDB_FLAG)?;
        write_build_settings(rd, &conf, saved_initramfs.as_deref(), mandb_flag)?;
        for o in overrides {
            if o.uri.starts_with("file://") {
                let host = PathBuf::from(o.uri.trim_start_matches("file://"));
                if !host.is_dir() {
                    user_bail!("--repo-override {}: {} is not a directory", o.id, host.display());
                }
            }
            if let Some(k) = &o.key
                && !k.is_file()
            {
                user_bail!("--repo-override {}: key {} not found", o.id, k.display());
            }
        }
        // Local repositories are bind-mounted into the session's /run.
        for o in overrides.iter().filter(|o| o.uri.starts_with("file://")) {
            let host = PathBuf::from(o.uri.trim_start_matches("file://"));
            mounts.bind(&host, &rd.mount_point(o.mount_point())?, false)?;
        }
        Ok(Apt {
            s,
            rd,
            archives_host,
            _cache_lock: cache_lock,
            saved_initramfs,
            mandb_flag,
            overrides: overrides.to_vec(),
            configured: vec![],
            downloaded: 0,
            locked: locked.is_some(),
            base_installed,
            lists_host: lists,
            conf,
        })
    }

    /// Take the build-time settings out of the image and unlist the repositories no
    /// stage so far has named (`keep`), so that the root is what it would be in any
    /// build that ran the same stages (a layer, `build/layers.rs`); [`Apt::resume`]
    /// puts them back.
    pub fn suspend(&self, keep: &[String]) -> Result<()> {
        remove_build_settings(self.rd, self.saved_initramfs.as_deref(), self.mandb_flag)?;
        for repo in self.configured.iter().filter(|r| !keep.contains(&r.id)) {
            for p in [
                format!("/etc/apt/sources.list.d/{}.list", repo.id),
                format!("/etc/apt/keyrings/{}.asc", repo.id),
                format!("/etc/apt/keyrings/{}.gpg", repo.id),
            ] {
                if self.rd.exists(&p)? {
                    self.rd.remove_file(&p)?;
                }
            }
        }
        Ok(())
    }

    /// Undo [`Apt::suspend`].
    pub fn resume(&self, def: &ImageDef) -> Result<()> {
        write_build_settings(self.rd, &self.conf, self.saved_initramfs.as_deref(), self.mandb_flag)?;
        for repo in &self.configured {
            let (uri, key) = self.source(def, repo);
            self.write_repo(repo, &uri, &key)?;
        }
        Ok(())
    }

    /// The sha256 of every `InRelease` and `Release` file of the package indexes, by
    /// file name: the state of the repositories this build's apt read.
    pub fn releases(&self) -> Result<BTreeMap<String, String>> {
        let mut out = BTreeMap::new();
        let rd = std::fs::read_dir(&self.lists_host)
            .with_context(|| format!("reading package indexes {}", self.lists_host.display()))?;
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.ends_with("_InRelease") || name.ends_with("_Release") {
                let sha = crate::disk::checksum::sha256_file(&e.path(), None)?;
                out.insert(name, crate::disk::checksum::hex(&sha));
            }
        }
        Ok(out)
    }

    fn get(&mut self, args: &[&str]) -> Result<String> {
        let out = self.s.cmd("apt-get").args(["-y", "-q"]).args(args).run()?;
        let text = out.stdout_str();
        self.downloaded += fetched_bytes(&text);
        Ok(text)
    }

    /// Configure a repository (overridden for this build if asked); false when it was
    /// configured already.
    pub fn add_repository(&mut self, def: &ImageDef, repo: &Repository) -> Result<bool> {
        if self.configured.iter().any(|r| r.id == repo.id) {
            return Ok(false);
        }
        let (uri, key) = self.source(def, repo);
        self.write_repo(repo, &uri, &key)?;
        self.configured.push(repo.clone());
        Ok(true)
    }

    /// Where this build takes a repository from: its override, or the definition's.
    fn source(&self, def: &ImageDef, repo: &Repository) -> (String, PathBuf) {
        let ov = self.overrides.iter().find(|o| o.id == repo.id);
        match ov {
            Some(o) => {
                let uri = if o.uri.starts_with("file://") {
                    format!("file://{}", o.mount_point())
                } else {
                    o.uri.clone()
                };
                tracing::info!(
                    "repository {}: using {} for this build (image keeps {})",
                    repo.id,
                    o.uri,
                    repo.uri
                );
                (uri, o.key.clone().unwrap_or_else(|| def.project_root.join(&repo.key)))
            }
            None => (repo.uri.clone(), def.project_root.join(&repo.key)),
        }
    }

    /// Overridden repositories whose list the image already has (it was built from an
    /// image made with the same definition) point at the override from the start.
    pub fn redirect_present_overrides(&mut self, def: &ImageDef) -> Result<()> {
        let ids: Vec<String> = self.overrides.iter().map(|o| o.id.clone()).collect();
        for id in ids {
            let present = self.rd.exists(format!("/etc/apt/sources.list.d/{id}.list"))?
                || self.rd.exists(format!("/etc/apt/sources.list.d/{id}.sources"))?;
            if let (true, Some(repo)) = (present, def.repository(&id)) {
                if self.rd.exists(format!("/etc/apt/sources.list.d/{id}.sources"))? {
                    self.rd.remove_file(format!("/etc/apt/sources.list.d/{id}.sources"))?;
                }
                tracing::info!("repository {id}: already listed in the base image; redirected to the override");
                self.add_repository(def, repo)?;
            }
        }
        Ok(())
    }

    fn write_repo(&self, repo: &Repository, uri: &str, key: &Path) -> Result<()> {
        let data =
            std::fs::read(key).with_context(|| format!("reading key {} of repository {}", key.display(), repo.id))?;
        let armored = data.starts_with(b"-----BEGIN");
        let keyfile = format!("/etc/apt/keyrings/{}.{}", repo.id, if armored { "asc" } else { "gpg" });
        self.rd.create_dir_all("/etc/apt/keyrings", 0o755)?;
        for ext in ["asc", "gpg"] {
            let p = format!("/etc/apt/keyrings/{}.{ext}", repo.id);
            if self.rd.exists(&p)? {
                self.rd.remove_file(&p)?;
            }
        }
        self.rd.write_file(&keyfile, &data, 0o644)?;
        let line = format!(
            "deb [signed-by={keyfile}] {uri} {} {}\n",
            repo.suite,
            repo.components.join(" ")
        );
        self.rd.write_file(
            format!("/etc/apt/sources.list.d/{}.list", repo.id),
            line.trim_end().as_bytes(),
            0o644,
        )?;
        Ok(())
    }

    /// apt-get update, failing on any index it could not fetch (apt itself only warns
    /// and carries on with stale or missing lists, which would turn a network outage
    /// into a misleading "package not found" later).
    pub fn update(&mut self) -> Result<()> {
        const WHAT: &str = "apt-get update in the image failed (network down or a repository unreachable?)";
        let out = self.s.cmd("apt-get").args(["-q", "update"]).run().context(WHAT)?;
        let text = out.stdout_str();
        self.downloaded += fetched_bytes(&text);
        let failed: Vec<&str> = text
            .lines()
            .chain(out.stderr.lines())
            .filter(|l| l.starts_with("Err:") || l.starts_with("W: Failed to fetch") || l.starts_with("E: "))
            .collect();
        if !failed.is_empty() {
            anyhow::bail!(
                "{WHAT}:\n    {}",
                failed.iter().take(8).cloned().collect::<Vec<_>>().join("\n    ")
            );
        }
        Ok(())
    }

    /// Remove packages and their configuration; packages that depend on them (meta
    /// packages) go too.
    pub fn purge(&mut self, names: &[String]) -> Result<()> {
        let mut args = vec!["purge"];
        args.extend(names.iter().map(String::as_str));
        self.get(&args).context("apt-get purge in the image")?;
        Ok(())
    }

    pub fn full_upgrade(&mut self) -> Result<()> {
        self.get(&["full-upgrade"])
            .context("apt-get full-upgrade in the image")?;
        Ok(())
    }

    /// Install a stage's packages: pool pins are fetched (sha256-checked) into the
    /// cache and installed as files; `name=version` pins are checked to exist first.
    pub fn install(&mut self, specs: &[PackageSpec]) -> Result<()> {
        if specs.is_empty() {
            return Ok(());
        }
        // A locked build has every locked version, pool pins too, in its local repository.
        let locked = self.locked;
        let by_pool = move |p: &&PackageSpec| p.pool.is_some() && !locked;
        self.check_available(specs.iter().filter(|p| !by_pool(p)))
            .map_err(|e| {
                if locked {
                    e.context("the lock does not have it: the definition changed since the lock was made; run `kiln lock --update`")
                } else {
                    e
                }
            })?;
        let mut args: Vec<String> = vec!["install".into()];
        let pool: Vec<&PackageSpec> = specs.iter().filter(by_pool).collect();
        if !pool.is_empty() {
            let mirror = archive_mirror(self.rd)?;
            for p in &pool {
                args.push(self.fetch_pool(&mirror, p)?);
            }
        }
        for p in specs.iter().filter(|p| !by_pool(p)) {
            args.push(match &p.version {
                Some(v) => format!("{}={v}", p.name),
                None => p.name.clone(),
            });
        }
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        self.get(&argv).context("installing packages in the image")?;
        self.verify_pins(specs)
    }

    fn fetch_pool(&mut self, mirror: &str, p: &PackageSpec) -> Result<String> {
        let pin = p.pool.as_ref().unwrap();
        let file = pin.path.rsplit('/').next().unwrap();
        let inside = format!("{ARCHIVES}/{file}");
        let host = self.archives_host.join(file);
        let have = host.is_file()
            && crate::disk::checksum::hex(&crate::disk::checksum::sha256_file(&host, None)?) == pin.sha256;
        if !have {
            let url = format!("{}/{}", mirror.trim_end_matches('/'), pin.path);
            tracing::info!("fetching pinned {} from {url}", p.name);
            let res = self
                .s
                .cmd("/usr/lib/apt/apt-helper")
                .args(["download-file", &url, &inside, &format!("SHA256:{}", pin.sha256)])
                .run();
            if let Err(e) = res {
                let _ = std::fs::remove_file(&host);
                user_bail!(
                    "{}: the pin {}={} can't be satisfied: {url} could not be fetched with sha256 {} ({e:#}); \
                     check the pool path and checksum — kiln never installs another version in its place",
                    p.origin,
                    p.name,
                    p.version.as_deref().unwrap_or(""),
                    pin.sha256
                );
            }
            self.downloaded += std::fs::metadata(&host).map(|m| m.len()).unwrap_or(0);
        }
        Ok(inside)
    }

    fn check_available<'b>(&mut self, specs: impl Iterator<Item = &'b PackageSpec>) -> Result<()> {
        let specs: Vec<&PackageSpec> = specs.collect();
        if specs.is_empty() {
            return Ok(());
        }
        let out = self
            .s
            .cmd("apt-cache")
            .arg("policy")
            .args(specs.iter().map(|p| p.name.as_str()))
            .run()?;
        let policy = parse_policy(&out.stdout_str());
        for p in specs {
            let Some(versions) = policy.get(&p.name) else {
                user_bail!(
                    "{}: package `{}` is not in the image's repositories; check the name or add its repository",
                    p.origin,
                    p.name
                );
            };
            if let Some(v) = &p.version {
                if !versions.iter().any(|x| x == v) {
                    user_bail!(
                        "{}: pinned version {}={v} is not in the image's repositories (available: {}); \
                         kiln never installs another version in its place",
                        p.origin,
                        p.name,
                        if versions.is_empty() {
                            "none".to_string()
                        } else {
                            versions.join(", ")
                        }
                    );
                }
            } else if versions.is_empty() {
                user_bail!(
                    "{}: package `{}` has no installable version in the image's repositories",
                    p.origin,
                    p.name
                );
            }
        }
        Ok(())
    }

    /// Every pinned package must be installed at exactly its pinned version.
    fn verify_pins(&mut self, specs: &[PackageSpec]) -> Result<()> {
        let pinned: Vec<&PackageSpec> = specs.iter().filter(|p| p.version.is_some()).collect();
        if pinned.is_empty() {
            return Ok(());
        }
        let installed = self.installed_versions(pinned.iter().map(|p| p.name.as_str()))?;
        for p in pinned {
            let want = p.version.as_deref().unwrap();
            match installed.get(&p.name) {
                Some(v) if v == want => {}
                Some(v) => anyhow::bail!("{}: {} is installed at {v}, not the pinned {want}", p.origin, p.name),
                None => anyhow::bail!("{}: {} is not installed after apt-get install", p.origin, p.name),
            }
        }
        Ok(())
    }

    pub fn installed_versions<'b>(&self, names: impl Iterator<Item = &'b str>) -> Result<BTreeMap<String, String>> {
        let names: Vec<&str> = names.collect();
        let out = self
            .s
            .cmd("dpkg-query")
            .args(["-W", "-f", "${Package}\\t${Version}\\t${db:Status-Status}\\n"])
            .args(&names)
            .run();
        // dpkg-query exits 1 when one of the names is unknown; the output still lists the rest.
        let text = match out {
            Ok(o) => o.stdout_str(),
            Err(_) => self
                .s
                .cmd("dpkg-query")
                .args(["-W", "-f", "${Package}\\t${Version}\\t${db:Status-Status}\\n"])
                .run()?
                .stdout_str(),
        };
        Ok(text
            .lines()
            .filter_map(|l| {
                let mut f = l.split('\t');
                let (n, v, st) = (f.next()?, f.next()?, f.next()?);
                (st == "installed" && names.contains(&n)).then(|| (n.to_string(), v.to_string()))
            })
            .collect())
    }

    /// Hold packages, and keep pinned versions preferred over anything newer.
    pub fn hold(&mut self, names: &[String], pins: &[&PackageSpec]) -> Result<()> {
        if !pins.is_empty() {
            let mut prefs = String::from("# Written by kiln: pinned versions of the image definition.\n");
            for p in pins {
                prefs += &format!(
                    "\nPackage: {}\nPin: version {}\nPin-Priority: 1001\n",
                    p.name,
                    p.version.as_deref().unwrap()
                );
            }
            let path = "/etc/apt/preferences.d/kiln-pins";
            let old = if self.rd.exists(path)? {
                self.rd.read_to_string(path)?
            } else {
                String::new()
            };
            let merged = if old.is_empty() {
                prefs
            } else {
                format!("{old}{}", prefs.split_once('\n').unwrap().1)
            };
            self.rd.write_file(path, merged.as_bytes(), 0o644)?;
        }
        if !names.is_empty() {
            self.s
                .cmd("apt-mark")
                .arg("hold")
                .args(names)
                .run()
                .context("apt-mark hold")?;
        }
        Ok(())
    }

    /// Undo the build-time settings, put the definition's repositories back in place of
    /// any override, and regenerate the initramfs once per kernel.
    pub fn finish(self, def: &ImageDef) -> Result<()> {
        for repo in &self.configured {
            self.write_repo(repo, &repo.uri, &def.project_root.join(&repo.key))?;
        }
        remove_build_settings(self.rd, self.saved_initramfs.as_deref(), self.mandb_flag)?;
        if self.saved_initramfs.is_some() {
            self.s
                .cmd("update-initramfs")
                .args(["-u", "-k", "all"])
                .run()
                .context("regenerating the initramfs")?;
        }
        Ok(())
    }
}

/// The build-time settings (module docs) in the image.
fn write_build_settings(rd: &RootDir, conf: &str, initramfs: Option<&[u8]>, mandb_flag: bool) -> Result<()> {
    rd.write_file(APT_CONF, conf.as_bytes(), 0o644)?;
    rd.create_dir_all("/etc/dpkg/dpkg.cfg.d", 0o755)?;
    rd.write_file(DPKG_CONF, b"force-unsafe-io\n", 0o644)?;
    if let Some(orig) = initramfs {
        let text = String::from_utf8_lossy(orig).replace("update_initramfs=yes", "update_initramfs=no");
        rd.write_file(INITRAMFS_CONF, text.as_bytes(), 0o644)?;
    }
    if mandb_flag && rd.exists(MANDB_FLAG)? {
        rd.remove_file(MANDB_FLAG)?;
    }
    Ok(())
}

/// The image's own settings back in place of the build-time ones.
fn remove_build_settings(rd: &RootDir, initramfs: Option<&[u8]>, mandb_flag: bool) -> Result<()> {
    rd.remove_file(APT_CONF)?;
    rd.remove_file(DPKG_CONF)?;
    if mandb_flag {
        rd.write_file(MANDB_FLAG, b"", 0o644)?;
    }
    if let Some(orig) = initramfs {
        rd.write_file(INITRAMFS_CONF, orig, 0o644)?;
    }
    Ok(())
}

/// How long a build waits for another build (or a dying one) to release the shared
/// package cache before it gives up.
pub const CACHE_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(600);

/// Take the shared package cache for this build: kiln's own lock (builds take turns),
/// then apt's locks in the cache, which a build that is being killed may hold for a
/// moment longer. Waits at most [`CACHE_LOCK_WAIT`], saying for whom.
fn lock_cache(archives: &Path, lists: &Path) -> Result<std::fs::File> {
    use std::io::{Read, Seek, Write};
    use std::os::unix::io::AsRawFd;
    let path = archives.join(".kiln-lock");
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    let deadline = std::time::Instant::now() + CACHE_LOCK_WAIT;
    let mut told = false;
    while unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        crate::host::cancel::check()?;
        let mut holder = String::new();
        let _ = f.rewind().and_then(|_| f.read_to_string(&mut holder));
        let holder = holder.trim();
        if !told {
            tracing::info!(
                "the package cache {} is in use by another kiln build (pid {}); waiting up to {} s for it",
                archives.display(),
                if holder.is_empty() { "?" } else { holder },
                CACHE_LOCK_WAIT.as_secs()
            );
            told = true;
        }
        if std::time::Instant::now() > deadline {
            crate::user_bail!(
                "the package cache {} is still in use by another kiln build (pid {}) after {} s; wait for it to \
                 finish, or use another --cache-dir",
                archives.display(),
                if holder.is_empty() { "?" } else { holder },
                CACHE_LOCK_WAIT.as_secs()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
    let _ = f
        .set_len(0)
        .and_then(|_| f.rewind())
        .and_then(|_| write!(f, "{}", crate::host::supervisor::host_pid()));
    // apt's own locks: held only by a build that was just killed and is still dying.
    for lock in [archives.join("lock"), lists.join("lock")] {
        let mut told = false;
        while let Some(pid) = fcntl_lock_holder(&lock) {
            crate::host::cancel::check()?;
            if !told {
                tracing::info!(
                    "waiting for {} (held by pid {pid}, a build that is ending)",
                    lock.display()
                );
                told = true;
            }
            if std::time::Instant::now() > deadline {
                crate::user_bail!(
                    "{} is still locked (pid {pid}, 0 = in another PID namespace) after {} s; end that process \
                     (`kiln doctor --fix` finds leftover build processes) or use another --cache-dir",
                    lock.display(),
                    CACHE_LOCK_WAIT.as_secs()
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(250));
        }
    }
    Ok(f)
}

/// The PID holding a POSIX write lock on `path` (apt's and dpkg's kind), if any.
fn fcntl_lock_holder(path: &Path) -> Option<i32> {
    use std::os::unix::io::AsRawFd;
    let f = std::fs::OpenOptions::new().read(true).write(true).open(path).ok()?;
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    if unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETLK, &mut fl) } != 0 {
        return None;
    }
    (fl.l_type != libc::F_UNLCK as libc::c_short).then_some(fl.l_pid)
}

/// `apt-cache policy` → package → versions in its version table.
fn parse_policy(text: &str) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut cur: Option<String> = None;
    let mut in_table = false;
    for line in text.lines() {
        if !line.starts_with(' ') && line.ends_with(':') {
            let name = line.trim_end_matches(':').to_string();
            out.entry(name.clone()).or_default();
            cur = Some(name);
            in_table = false;
        } else if line.trim_start().starts_with("Version table:") {
            in_table = true;
        } else if in_table {
            // "     1.30.0-1.1 500" or " *** 1.30.0-1.1 500"
            let t = line.trim_start().trim_start_matches("***").trim_start();
            let indent = line.len() - line.trim_start().len();
            if indent < 8
                && !t.is_empty()
                && let (Some(c), Some(v)) = (&cur, t.split_whitespace().next())
            {
                out.get_mut(c).unwrap().push(v.to_string());
            }
        }
    }
    out
}

/// Bytes apt reports as fetched ("Fetched 12.3 MB in 2s (5 MB/s)").
fn fetched_bytes(text: &str) -> u64 {
    text.lines()
        .filter_map(|l| l.strip_prefix("Fetched "))
        .filter_map(|rest| {
            let mut w = rest.split_whitespace();
            let n: f64 = w.next()?.replace(',', "").parse().ok()?;
            let mult = match w.next()? {
                "B" => 1.0,
                "kB" => 1e3,
                "MB" => 1e6,
                "GB" => 1e9,
                _ => return None,
            };
            Some((n * mult) as u64)
        })
        .sum()
}

/// The Ubuntu archive mirror the image itself is configured with: the first `deb` line
/// for the release's own suite in /etc/apt/sources.list (or a deb822 .sources file).
pub fn archive_mirror(rd: &RootDir) -> Result<String> {
    let codename = crate::image::os_release::parse_os_release(&rd.read_to_string("/etc/os-release")?)
        .get("VERSION_CODENAME")
        .cloned()
        .unwrap_or_default();
    let mut texts = Vec::new();
    if rd.exists("/etc/apt/sources.list")? {
        texts.push(rd.read_to_string("/etc/apt/sources.list")?);
    }
    if let Some(m) = texts.iter().find_map(|t| mirror_from_list(t, &codename)) {
        return Ok(m);
    }
    if rd.exists("/etc/apt/sources.list.d")? {
        for n in rd.read_dir("/etc/apt/sources.list.d")? {
            if n.ends_with(".sources") {
                let t = rd.read_to_string(format!("/etc/apt/sources.list.d/{n}"))?;
                if let Some(m) = mirror_from_deb822(&t, &codename) {
                    return Ok(m);
                }
            }
        }
    }
    user_bail!(
        "the image's apt sources have no `deb` line for suite {codename}; a pool pin needs the archive mirror the image is configured with"
    )
}

fn mirror_from_list(text: &str, codename: &str) -> Option<String> {
    text.lines().find_map(|l| {
        let l = l.trim();
        let rest = l.strip_prefix("deb ")?;
        let rest = if rest.trim_start().starts_with('[') {
            rest.split_once(']')?.1
        } else {
            rest
        };
        let mut w = rest.split_whitespace();
        let (uri, suite) = (w.next()?, w.next()?);
        (suite == codename).then(|| uri.to_string())
    })
}

fn mirror_from_deb822(text: &str, codename: &str) -> Option<String> {
    for para in text.split("\n\n") {
        let field = |k: &str| {
            para.lines()
                .find_map(|l| l.strip_prefix(k).map(|v| v.trim().to_string()))
        };
        let (Some(uris), Some(suites)) = (field("URIs:"), field("Suites:")) else {
            continue;
        };
        if suites.split_whitespace().any(|s| s == codename) {
            return uris.split_whitespace().next().map(str::to_string);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_parsing() {
        let t = "kubelet:\n  Installed: (none)\n  Candidate: 1.30.0-1.1\n  Version table:\n     1.30.1-1.1 500\n        500 file:/run/kiln/repos/kubernetes  Packages\n     1.30.0-1.1 500\n        500 file:/x  Packages\nnvidia-dkms-565-server:\n  Installed: (none)\n  Candidate: 565.57.01-0ubuntu0.22.04.5\n  Version table:\n *** 565.57.01-0ubuntu0.22.04.5 500\n        500 http://a jammy-updates/restricted amd64 Packages\n";
        let p = parse_policy(t);
        assert_eq!(p["kubelet"], ["1.30.1-1.1", "1.30.0-1.1"]);
        assert_eq!(p["nvidia-dkms-565-server"], ["565.57.01-0ubuntu0.22.04.5"]);
        assert!(!p.contains_key("missing"));
    }

    #[test]
    fn fetched() {
        assert_eq!(fetched_bytes("Get:1 x\nFetched 12.5 MB in 2s (5 MB/s)\n"), 12_500_000);
        assert_eq!(fetched_bytes("Fetched 1,234 kB in 1s\n"), 1_234_000);
    }

    #[test]
    fn mirrors() {
        let l = "# comment\ndeb [arch=amd64] http://mirror.example/ubuntu jammy main restricted\ndeb http://mirror.example/ubuntu jammy-updates main\n";
        assert_eq!(mirror_from_list(l, "jammy").unwrap(), "http://mirror.example/ubuntu");
        assert_eq!(mirror_from_list(l, "noble"), None);
        let d = "Types: deb\nURIs: http://m.example/ubuntu/\nSuites: noble noble-updates\nComponents: main\n";
        assert_eq!(mirror_from_deb822(d, "noble").unwrap(), "http://m.example/ubuntu/");
    }

    #[test]
    fn overrides() {
        let o: RepoOverride = "kubernetes=file:///srv/repo,key=/srv/k.asc".parse().unwrap();
        assert_eq!(o.id, "kubernetes");
        assert_eq!(o.uri, "file:///srv/repo");
        assert_eq!(o.key.as_deref(), Some(Path::new("/srv/k.asc")));
        assert!("nouri".parse::<RepoOverride>().is_err());
        assert!("a=b,bogus=1".parse::<RepoOverride>().is_err());
        // Two local directories for one repository id (two channels of a variant) get
        // their own mount point, so apt's shared index cache keeps them apart.
        let other: RepoOverride = "kubernetes=file:///srv/repo-v1.29".parse().unwrap();
        assert!(o.mount_point().starts_with("/run/kiln/repos/kubernetes-"));
        assert_ne!(o.mount_point(), other.mount_point());
        assert_eq!(o.mount_point(), o.clone().mount_point());
    }
}
