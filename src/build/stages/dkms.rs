//! DKMS modules built once: the DKMS build cache.
//!
//! While a stage's packages install, the image's kernel headers (the
//! `/lib/modules/K/build` links) are hidden, so a DKMS package's postinst only adds its
//! module ("kernel headers ... not installed": build skipped). kiln then builds every
//! added module for every image kernel itself ([`build_modules`]): from the cache when an
//! entry matches everything that decides the module's bytes ([`Inputs`]), else with
//! `dkms build`, storing the result. Either way `dkms install` then puts the modules
//! where DKMS puts them and runs depmod, and the initramfs stage runs later for both, so
//! the image is what a compile produces: `dkms status` says installed, the `.ko` files
//! are the compiled bytes (vermagic, srcversion and signature included).
//!
//! A cache entry is `<cache>/dkms/<key>/`: DKMS's built tree for one module, version,
//! kernel and architecture (`module/*.ko`, `log/make.log`) and `manifest.json` with the
//! inputs and every file's size and sha256. An entry is written under a temporary name
//! and renamed into place; one that fails its checksums is removed and rebuilt, never
//! installed. Signing keys never enter the cache: only the certificate's fingerprint is
//! part of the key.

use crate::build::stages::chroot::{KCFLAGS, Session};
use crate::build::stages::signing::{DKMS3_CERT, DKMS3_KEY, MOK_CERT, MOK_DIR, MOK_KEY};
use crate::host::rootdir::{Metadata, RootDir};
use crate::image::kernels::bootable_kernels;
use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

const DKMS_TREE: &str = "/var/lib/dkms";
const MANIFEST: &str = "manifest.json";
/// Bumped when the entry layout or the meaning of a key changes.
const FORMAT: &str = "kiln-dkms-cache-1";

/// Everything that decides the bytes of a DKMS-built module: the cache key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inputs {
    pub module: String,
    pub version: String,
    pub kernel: String,
    pub arch: String,
    /// sha256 over the module's source tree (`/usr/src/MODULE-VERSION`: names, modes,
    /// link targets, contents), which pins the DKMS package's exact contents.
    pub source_sha256: String,
    /// The kernel headers package and its version (`linux-headers-K=V`).
    pub headers: String,
    /// `gcc --version` and `ld.bfd --version`, first lines.
    pub compiler: String,
    pub linker: String,
    /// The dkms tool's package version (it applies patches, strips, signs).
    pub dkms: String,
    /// Extra compiler flags kiln sets for module builds.
    pub kcflags: String,
    /// sha256 of the signing certificate when DKMS signs modules (`MOK.der`), else empty.
    pub signing_cert_sha256: String,
}

impl Inputs {
    pub fn key(&self) -> String {
        let mut h = Sha256::new();
        h.update(FORMAT.as_bytes());
        h.update(serde_json::to_vec(self).expect("inputs serialize"));
        crate::disk::checksum::hex(&h.finalize().into())
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Manifest {
    format: String,
    inputs: Inputs,
    /// Path below the built tree → file.
    files: BTreeMap<String, CachedFile>,
}

#[derive(Debug, Serialize, Deserialize)]
struct CachedFile {
    size: u64,
    sha256: String,
    mode: u32,
}

/// The DKMS build cache in `<cache>/dkms`.
pub struct Cache {
    dir: PathBuf,
}

/// How each module was had, for the log and the tests.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Report {
    /// `MODULE/VERSION for KERNEL` installed from the cache.
    pub hits: Vec<String>,
    /// Compiled (and stored when a cache is in use).
    pub compiled: Vec<String>,
    /// Entries that failed their checksums and were removed.
    pub corrupt: Vec<String>,
}

impl Cache {
    pub fn new(cache_dir: &Path) -> Cache {
        Cache {
            dir: cache_dir.join("dkms"),
        }
    }

    fn entry(&self, inputs: &Inputs) -> PathBuf {
        self.dir.join(inputs.key())
    }

    /// Install a cached build of `inputs` as the built tree `tree` in the image. `Ok(false)`
    /// on a miss; an entry that fails its checks is removed (and reported) and is a miss.
    /// Every file is checked before any is copied.
    pub fn load(&self, inputs: &Inputs, rd: &RootDir, tree: &str, report: &mut Report) -> Result<bool> {
        let entry = self.entry(inputs);
        if !entry.is_dir() {
            return Ok(false);
        }
        let manifest = match check_entry(&entry, inputs) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(
                    "DKMS cache entry {} is damaged ({e:#}); removing it and compiling instead",
                    entry.display()
                );
                report.corrupt.push(entry.display().to_string());
                std::fs::remove_dir_all(&entry)
                    .with_context(|| format!("removing damaged DKMS cache entry {}", entry.display()))?;
                return Ok(false);
            }
        };
        if rd.exists(tree)? {
            rd.remove_dir_all(tree)?;
        }
        for (rel, f) in &manifest.files {
            let inside = format!("{tree}/{rel}");
            if let Some(parent) = Path::new(&inside).parent() {
                rd.create_dir_all(parent, 0o755)?;
            }
            let mut src = std::fs::File::open(entry.join(rel))
                .with_context(|| format!("reading {}", entry.join(rel).display()))?;
            let mut dst = rd.create_file(&inside, f.mode)?;
            std::io::copy(&mut src, &mut dst).with_context(|| format!("writing {}", rd.describe(&inside)))?;
        }
        Ok(true)
    }

    /// Store the built tree `tree` of the image as the entry for `inputs` (written under a
    /// temporary name, then renamed into place; an entry already there is kept).
    pub fn store(&self, inputs: &Inputs, rd: &RootDir, tree: &str) -> Result<()> {
        let entry = self.entry(inputs);
        if entry.is_dir() {
            return Ok(());
        }
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("creating DKMS cache directory {}", self.dir.display()))?;
        let tmp = self.dir.join(format!(".tmp-{}-{}", inputs.key(), std::process::id()));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)?;
        }
        let res = (|| -> Result<()> {
            let mut files = BTreeMap::new();
            for (rel, md) in walk(rd, tree)?.into_iter().filter(|(_, md)| md.is_file()) {
                let inside = format!("{tree}/{rel}");
                let dst = tmp.join(&rel);
                std::fs::create_dir_all(dst.parent().unwrap())?;
                let mut src = rd.open_file(&inside)?;
                let mut out = std::fs::File::create(&dst).with_context(|| format!("creating {}", dst.display()))?;
                let (size, sha256) = copy_hashing(&mut src, &mut out)
                    .with_context(|| format!("copying {} to {}", rd.describe(&inside), dst.display()))?;
                out.sync_all()?;
                files.insert(
                    rel,
                    CachedFile {
                        size,
                        sha256,
                        mode: md.mode() & 0o7777,
                    },
                );
            }
            if !files.keys().any(|f| f.ends_with(".ko")) {
                bail!("{} holds no .ko file", rd.describe(tree));
            }
            let manifest = Manifest {
                format: FORMAT.into(),
                inputs: inputs.clone(),
                files,
            };
            let mut f = std::fs::File::create(tmp.join(MANIFEST))?;
            f.write_all(&serde_json::to_vec_pretty(&manifest)?)?;
            f.sync_all()?;
            Ok(())
        })();
        if let Err(e) = res {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e.context(format!("storing {} in the DKMS cache", rd.describe(tree))));
        }
        if let Err(e) = std::fs::rename(&tmp, &entry) {
            // Another build stored the same entry first.
            let _ = std::fs::remove_dir_all(&tmp);
            if !entry.is_dir() {
                return Err(e).with_context(|| format!("renaming {} into place", tmp.display()));
            }
        }
        Ok(())
    }
}

/// The entry's manifest, after checking that it is for `inputs` and that every file has
/// its recorded size and sha256.
fn check_entry(entry: &Path, inputs: &Inputs) -> Result<Manifest> {
    let text = std::fs::read(entry.join(MANIFEST)).context("no readable manifest.json")?;
    let m: Manifest = serde_json::from_slice(&text).context("manifest.json does not parse")?;
    if m.format != FORMAT || &m.inputs != inputs {
        bail!("its manifest is for other inputs");
    }
    if !m.files.keys().any(|f| f.ends_with(".ko")) {
        bail!("it holds no .ko file");
    }
    for (rel, f) in &m.files {
        let p = entry.join(rel);
        let mut file = std::fs::File::open(&p).with_context(|| format!("{rel} is missing"))?;
        let (size, got) = copy_hashing(&mut file, &mut std::io::sink())?;
        if size != f.size {
            bail!("{rel} has {size} bytes, the manifest says {}", f.size);
        }
        if got != f.sha256 {
            bail!("{rel} has sha256 {got}, the manifest says {}", f.sha256);
        }
    }
    Ok(m)
}

/// Copy `src` to `dst`, returning the byte count and the sha256 of what was copied.
fn copy_hashing(src: &mut impl Read, dst: &mut impl Write) -> std::io::Result<(u64, String)> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = src.read(&mut buf)?;
        if n == 0 {
            break;
        }
        size += n as u64;
        h.update(&buf[..n]);
        dst.write_all(&buf[..n])?;
    }
    Ok((size, crate::disk::checksum::hex(&h.finalize().into())))
}

fn sha256_hex(data: &[u8]) -> String {
    crate::disk::checksum::hex(&Sha256::digest(data).into())
}

/// Every entry below `dir` in the image, as (path relative to it, its lstat), sorted by
/// path.
fn walk(rd: &RootDir, dir: &str) -> Result<Vec<(String, Metadata)>> {
    let mut out = Vec::new();
    let mut stack = vec![String::new()];
    while let Some(rel) = stack.pop() {
        let here = if rel.is_empty() {
            dir.to_string()
        } else {
            format!("{dir}/{rel}")
        };
        for name in rd.read_dir(&here)? {
            let r = if rel.is_empty() { name } else { format!("{rel}/{name}") };
            let md = rd.symlink_metadata(format!("{dir}/{r}"))?;
            if md.is_dir() {
                stack.push(r.clone());
            }
            out.push((r, md));
        }
    }
    out.sort_by(|x, y| x.0.cmp(&y.0));
    Ok(out)
}

/// sha256 over a source tree in the image: every entry's relative path, type and mode,
/// a symlink's target, a file's contents; in sorted order.
fn tree_sha256(rd: &RootDir, dir: &str) -> Result<String> {
    let mut h = Sha256::new();
    for (r, md) in walk(rd, dir)? {
        let p = format!("{dir}/{r}");
        h.update(r.as_bytes());
        h.update([0]);
        h.update(format!("{:o}", md.mode()).as_bytes());
        h.update([0]);
        if md.is_symlink() {
            h.update(rd.read_link(&p)?.as_os_str().as_encoded_bytes());
        } else if md.is_file() {
            let (_, file_sha) = copy_hashing(&mut rd.open_file(&p)?, &mut std::io::sink())?;
            h.update(file_sha.as_bytes());
        }
        h.update([0]);
    }
    Ok(crate::disk::checksum::hex(&h.finalize().into()))
}

/// What DKMS must not see while a stage's packages install and kiln builds modules,
/// hidden by [`Hidden::hide`] and put back by [`Hidden::restore`] (or, should that not
/// run, when dropped):
/// - with the DKMS cache, the image kernels' header links (`/lib/modules/K/build`), so
///   that no package script compiles a module ([`build_modules`] does);
/// - when the image holds no Machine Owner Key's private half (`MOK.priv`; a build
///   with `--module-signing-key` puts one there, `stages/signing.rs`),
///   `/var/lib/shim-signed/mok`: Ubuntu's DKMS (jammy's 2.8 and noble's 3.0) would
///   otherwise generate a throwaway key pair there (noble's even deletes a lone
///   `MOK.der` to do so) and sign with it, leaving the private key in the image (and
///   making every compile's bytes unique). Modules are signed only with the user's key.
///
/// Upstream DKMS 3's own key pair, `/var/lib/dkms/mok.key` and `mok.pub` (used only
/// where `framework.conf` configures it on Ubuntu), cannot be hidden before it exists:
/// one made during the build is removed when the guard is restored.
pub struct Hidden<'a> {
    rd: &'a RootDir,
    links: Vec<(String, PathBuf)>,
    mok: bool,
    /// Whether `/var/lib/dkms/mok.key` was there before (then it is the image's own).
    dkms3_key: bool,
}

const MOK_HIDDEN: &str = "/var/lib/shim-signed/.kiln-hidden-mok";

impl<'a> Hidden<'a> {
    pub fn hide(rd: &'a RootDir, headers: bool) -> Result<Hidden<'a>> {
        let mut h = Hidden {
            rd,
            links: Vec::new(),
            mok: false,
            dkms3_key: rd.lstat(DKMS3_KEY)?.is_some(),
        };
        if headers {
            for k in bootable_kernels(rd)? {
                let link = format!("/lib/modules/{k}/build");
                if rd.lstat(&link)?.is_some_and(|m| m.is_symlink()) {
                    let target = rd.read_link(&link)?;
                    rd.remove_file(&link)?;
                    h.links.push((link, target));
                }
            }
        }
        if rd.is_dir(MOK_DIR)? && rd.lstat(MOK_KEY)?.is_none() {
            rd.rename(MOK_DIR, MOK_HIDDEN)?;
            h.mok = true;
        }
        Ok(h)
    }

    /// Put the header links back (before kiln builds the modules).
    pub fn restore_headers(&mut self) -> Result<()> {
        while let Some((link, target)) = self.links.pop() {
            // A package that (re)installed the headers meanwhile made the link again.
            if self.rd.lstat(&link)?.is_none() {
                self.rd
                    .symlink(&target, &link)
                    .with_context(|| format!("restoring kernel headers link {link}"))?;
            }
        }
        Ok(())
    }

    pub fn restore(mut self) -> Result<()> {
        self.put_back()
    }

    fn put_back(&mut self) -> Result<()> {
        self.restore_headers()?;
        if std::mem::take(&mut self.mok) {
            if self.rd.exists(MOK_DIR)? {
                // Made again meanwhile (by a package, or by DKMS with a throwaway key pair
                // in it): never kept; the image's own, keyless directory goes back.
                tracing::warn!("{MOK_DIR} was made again during the build; removed (it may hold a throwaway key)");
                self.rd.remove_dir_all(MOK_DIR)?;
            }
            self.rd.rename(MOK_HIDDEN, MOK_DIR)?;
        }
        if !self.dkms3_key && self.rd.lstat(DKMS3_KEY)?.is_some() {
            self.dkms3_key = true;
            tracing::warn!("DKMS generated a throwaway key pair {DKMS3_KEY}, {DKMS3_CERT} during the build; removed");
            for p in [DKMS3_KEY, DKMS3_CERT] {
                if self.rd.lstat(p)?.is_some() {
                    self.rd.remove_file(p)?;
                }
            }
        }
        Ok(())
    }
}

impl Drop for Hidden<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.put_back() {
            tracing::error!("{e:#}");
        }
    }
}

/// Build every DKMS module the image has added, for every image kernel with headers,
/// that is not built yet (from the cache when it has the build; a compile is stored in
/// it), and `dkms install` whatever is not installed. Runs while [`Hidden`] keeps a
/// keyless image's MOK directory out of DKMS's sight.
pub fn build_modules(session: &Session, rd: &RootDir, cache: Option<&Cache>) -> Result<Report> {
    let mut report = Report::default();
    if !rd.is_dir(DKMS_TREE)? {
        return Ok(report);
    }
    let arch = std::env::consts::ARCH;
    let status = crate::image::dpkg::parse_dpkg_status(&rd.read_to_string("/var/lib/dpkg/status")?);
    let pkg_version = |name: &str| {
        status
            .iter()
            .find(|p| p.name == name && p.is_installed())
            .map(|p| p.version.clone())
    };
    let mut tools: Option<(String, String)> = None;
    for module in rd.read_dir(DKMS_TREE)? {
        let mdir = format!("{DKMS_TREE}/{module}");
        if !rd.is_dir(&mdir)? {
            continue;
        }
        for version in rd.read_dir(&mdir)? {
            let vdir = format!("{mdir}/{version}");
            let source = format!("{vdir}/source");
            if version.starts_with("kernel-") || !rd.lstat(&source)?.is_some_and(|m| m.is_symlink()) {
                continue;
            }
            let target = rd.read_link(&source)?;
            let source_dir = Path::new(&vdir).join(target).to_string_lossy().into_owned();
            if !rd.is_dir(&source_dir)? {
                tracing::warn!("DKMS module {module}/{version}: its source {source_dir} is gone; skipped");
                continue;
            }
            let mut source_sha: Option<String> = None;
            for kernel in bootable_kernels(rd)? {
                if !rd.exists(format!("/lib/modules/{kernel}/build/include"))? {
                    continue;
                }
                let what = format!("{module}/{version} for {kernel}");
                let tree = format!("{vdir}/{kernel}/{arch}");
                let built = rd.is_dir(format!("{tree}/module"))?;
                let inputs = match cache {
                    Some(_) => {
                        if source_sha.is_none() {
                            source_sha = Some(tree_sha256(rd, &source_dir)?);
                        }
                        if tools.is_none() {
                            tools = Some(compiler_and_linker(session)?);
                        }
                        let (compiler, linker) = tools.clone().unwrap();
                        let headers = format!("linux-headers-{kernel}");
                        Some(Inputs {
                            module: module.clone(),
                            version: version.clone(),
                            kernel: kernel.clone(),
                            arch: arch.into(),
                            source_sha256: source_sha.clone().unwrap(),
                            headers: format!("{headers}={}", pkg_version(&headers).unwrap_or_default()),
                            compiler,
                            linker,
                            dkms: pkg_version("dkms").unwrap_or_default(),
                            kcflags: KCFLAGS.into(),
                            signing_cert_sha256: if rd.exists(MOK_KEY)? && rd.exists(MOK_CERT)? {
                                sha256_hex(&rd.read(MOK_CERT)?)
                            } else {
                                String::new()
                            },
                        })
                    }
                    None => None,
                };
                if !built {
                    let hit = match (cache, &inputs) {
                        (Some(c), Some(i)) => c.load(i, rd, &tree, &mut report)?,
                        _ => false,
                    };
                    if hit {
                        tracing::info!(
                            "DKMS {what}: installed from the build cache (key {})",
                            inputs.as_ref().unwrap().key()
                        );
                        report.hits.push(what.clone());
                    } else {
                        tracing::info!("DKMS {what}: compiling");
                        session
                            .cmd("dkms")
                            .args(["build", "-m", &module, "-v", &version, "-k", &kernel, "-a", arch])
                            .run()
                            .with_context(|| format!("building DKMS module {what}"))?;
                        report.compiled.push(what.clone());
                        if let (Some(c), Some(i)) = (cache, &inputs) {
                            c.store(i, rd, &tree)?;
                        }
                    }
                }
                let installed = format!("{mdir}/kernel-{kernel}-{arch}");
                if rd.lstat(&installed)?.is_none() {
                    session
                        .cmd("dkms")
                        .args(["install", "-m", &module, "-v", &version, "-k", &kernel, "-a", arch])
                        .run()
                        .with_context(|| format!("installing DKMS module {what}"))?;
                }
            }
        }
    }
    Ok(report)
}

fn compiler_and_linker(session: &Session) -> Result<(String, String)> {
    let first = |prog: &str| -> Result<String> {
        let out = session
            .cmd(prog)
            .arg("--version")
            .run()
            .with_context(|| format!("`{prog} --version` in the image (for the DKMS cache key)"))?;
        Ok(out.stdout_str().lines().next().unwrap_or_default().trim().to_string())
    };
    Ok((first("gcc")?, first("ld.bfd")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs() -> Inputs {
        Inputs {
            module: "nvidia-srv".into(),
            version: "565.57.01".into(),
            kernel: "5.15.0-204-generic".into(),
            arch: "x86_64".into(),
            source_sha256: "aa".into(),
            headers: "linux-headers-5.15.0-204-generic=5.15.0-204.214".into(),
            compiler: "gcc (Ubuntu 11.4.0-1ubuntu1~22.04.2) 11.4.0".into(),
            linker: "GNU ld (GNU Binutils for Ubuntu) 2.38".into(),
            dkms: "2.8.7-2ubuntu2.2".into(),
            kcflags: "-g0".into(),
            signing_cert_sha256: String::new(),
        }
    }

    /// A different kernel, driver version, driver source, headers build, compiler,
    /// linker or signing certificate is a different key (a miss).
    #[test]
    fn every_input_changes_the_key() {
        let base = inputs();
        let k = base.key();
        assert_eq!(k, inputs().key(), "the key is deterministic");
        let variants: Vec<(&str, Change)> = vec![
            ("kernel", |i| i.kernel = "5.15.0-205-generic".into()),
            ("driver version", |i| i.version = "565.57.02".into()),
            ("driver source", |i| i.source_sha256 = "bb".into()),
            ("headers", |i| {
                i.headers = "linux-headers-5.15.0-204-generic=5.15.0-204.215".into()
            }),
            ("compiler", |i| {
                i.compiler = "gcc (Ubuntu 12.3.0-1ubuntu1~22.04) 12.3.0".into()
            }),
            ("linker", |i| {
                i.linker = "GNU ld (GNU Binutils for Ubuntu) 2.38.50".into()
            }),
            ("module", |i| i.module = "nvidia".into()),
            ("signing certificate", |i| i.signing_cert_sha256 = "cc".into()),
            ("dkms", |i| i.dkms = "3.0.3".into()),
            ("kcflags", |i| i.kcflags = String::new()),
        ];
        for (what, change) in variants {
            let mut i = inputs();
            change(&mut i);
            assert_ne!(i.key(), k, "changing the {what} must change the key");
        }
    }

    type Damage<'a> = (&'a str, Box<dyn Fn() + 'a>);
    type Change = fn(&mut Inputs);

    /// A built tree stored and loaded again is the same; a truncated, altered or missing
    /// file, or a manifest for other inputs, is detected, removed and never installed.
    #[test]
    fn entries_round_trip_and_damage_is_detected() {
        let cache_dir = tempfile::tempdir().unwrap();
        let cache = Cache::new(cache_dir.path());
        let image = tempfile::tempdir().unwrap();
        let rd = RootDir::open(image.path()).unwrap();
        let tree = "/var/lib/dkms/nvidia-srv/565.57.01/5.15.0-204-generic/x86_64";
        rd.create_dir_all(format!("{tree}/module"), 0o755).unwrap();
        rd.create_dir_all(format!("{tree}/log"), 0o755).unwrap();
        let ko = vec![7u8; 300_000];
        rd.write_file(format!("{tree}/module/nvidia.ko"), &ko, 0o644).unwrap();
        rd.write_file(format!("{tree}/log/make.log"), b"make ok\n", 0o644)
            .unwrap();
        let i = inputs();
        cache.store(&i, &rd, tree).unwrap();

        let load_into_fresh = |report: &mut Report| {
            let other = tempfile::tempdir().unwrap();
            let rd2 = RootDir::open(other.path()).unwrap();
            let hit = cache.load(&i, &rd2, tree, report).unwrap();
            let got = rd2.read(format!("{tree}/module/nvidia.ko")).ok();
            (hit, got)
        };
        let mut report = Report::default();
        let (hit, got) = load_into_fresh(&mut report);
        assert!(hit);
        assert_eq!(got.as_deref(), Some(&ko[..]));

        let entry = cache.entry(&i);
        let ko_file = entry.join("module/nvidia.ko");
        let damages: Vec<Damage> = vec![
            (
                "truncated",
                Box::new(|| {
                    std::fs::OpenOptions::new()
                        .write(true)
                        .open(&ko_file)
                        .unwrap()
                        .set_len(1000)
                        .unwrap()
                }),
            ),
            (
                "altered",
                Box::new(|| {
                    let mut d = std::fs::read(&ko_file).unwrap();
                    d[5] ^= 1;
                    std::fs::write(&ko_file, d).unwrap()
                }),
            ),
            ("missing", Box::new(|| std::fs::remove_file(&ko_file).unwrap())),
            (
                "manifest",
                Box::new(|| std::fs::write(entry.join(MANIFEST), b"{not json").unwrap()),
            ),
        ];
        for (what, damage) in damages {
            cache.store(&i, &rd, tree).unwrap();
            damage();
            let mut report = Report::default();
            let (hit, got) = load_into_fresh(&mut report);
            assert!(!hit, "{what}: a damaged entry must be a miss");
            assert_eq!(got, None, "{what}: nothing of a damaged entry is installed");
            assert_eq!(report.corrupt.len(), 1, "{what}: reported");
            assert!(!entry.exists(), "{what}: the damaged entry is removed");
        }
        // A different input is a plain miss, and an empty tree is never stored.
        let mut other = inputs();
        other.kernel = "6.8.0-1-generic".into();
        let mut report = Report::default();
        let rd3_dir = tempfile::tempdir().unwrap();
        let rd3 = RootDir::open(rd3_dir.path()).unwrap();
        assert!(!cache.load(&other, &rd3, tree, &mut report).unwrap());
        assert!(report.corrupt.is_empty());
        rd3.create_dir_all(format!("{tree}/module"), 0o755).unwrap();
        assert!(cache.store(&other, &rd3, tree).is_err());
        assert!(!cache.entry(&other).exists());
    }
}
