//! The pinned base of a definition (`[base]`): downloaded once into the cache, checked,
//! and reused with no network access at all.
//!
//! `<cache>/bases/<sha256>` is only ever a file whose sha256 was checked against both the
//! definition and a `SHA256SUMS` whose OpenPGP signature was made by the key the
//! definition names (file and fingerprint). Until then the download lives in
//! `<sha256>.partial`, which a later run resumes (HTTP Range); a complete download with
//! the wrong sha256 is deleted, so nothing else is ever left in the cache.

use crate::definition::BaseSpec;
use crate::disk::checksum::sum_for;
use crate::error::user;
use crate::host::download::{self, DownloadError, Policy};
use anyhow::{Context, Result};
use pgp::composed::{Deserializable, DetachedSignature, SignedPublicKey};
use pgp::types::KeyDetails;
use std::fs::File;
use std::path::{Path, PathBuf};

/// Where the pinned base with this sha256 lives in the cache.
pub fn cached(cache_dir: &Path, sha256: &str) -> PathBuf {
    cache_dir.join("bases").join(sha256)
}

/// Where its download in progress lives.
pub fn partial(cache_dir: &Path, sha256: &str) -> PathBuf {
    cache_dir.join("bases").join(format!("{sha256}.partial"))
}

/// How much disk the cache's `bases/` may use (allocated bytes, so a sparse raw
/// counts what it holds) unless `KILN_BASE_CACHE_MAX` says otherwise: room for the
/// downloaded cloud image, its raw form and a few more bases.
pub const DEFAULT_BASE_CACHE_MAX: u64 = 16 << 30;

/// `KILN_BASE_CACHE_MAX` (bytes, or with a KiB/MiB/GiB suffix), else the default.
pub fn base_cache_max() -> Result<u64> {
    match std::env::var("KILN_BASE_CACHE_MAX") {
        Ok(v) if !v.trim().is_empty() => crate::definition::parse_size(v.trim()).ok_or_else(|| {
            crate::error::user(format!(
                "KILN_BASE_CACHE_MAX = `{v}` is not a size (bytes, or a number with KiB, MiB or GiB)"
            ))
        }),
        _ => Ok(DEFAULT_BASE_CACHE_MAX),
    }
}

/// What [`prune`] removed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Pruned {
    pub files: usize,
    pub bytes: u64,
}

/// Keep the cache's `bases/` (downloaded bases and their converted raw and tar forms)
/// within `max` allocated bytes: the files of `in_use` are marked used now (their
/// modification time), then the least recently used others go until the rest fit. A
/// base in use is never removed, even when it alone is over the budget. Holds the
/// directory's lock, so it never removes a file another kiln is downloading.
pub fn prune(cache_dir: &Path, in_use: &[&Path], max: u64) -> Result<Pruned> {
    use std::os::unix::fs::MetadataExt;
    let dir = cache_dir.join("bases");
    if !dir.is_dir() {
        return Ok(Pruned::default());
    }
    let _lock = crate::host::dirlock::DirLock::acquire(&dir, "pruning the base cache")?;
    let now = std::time::SystemTime::now();
    for p in in_use {
        if p.starts_with(&dir) {
            File::options()
                .write(true)
                .open(p)
                .and_then(|f| f.set_modified(now))
                .with_context(|| format!("marking {} as used", p.display()))?;
        }
    }
    let mut entries = Vec::new();
    for e in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        let e = e?;
        let m = e.metadata()?;
        if m.is_file() {
            entries.push((m.modified()?, m.blocks() * 512, e.path()));
        }
    }
    let mut total: u64 = entries.iter().map(|e| e.1).sum();
    entries.sort();
    let mut pruned = Pruned::default();
    for (_, bytes, path) in entries {
        if total <= max {
            break;
        }
        if in_use.iter().any(|p| *p == path) {
            continue;
        }
        std::fs::remove_file(&path).with_context(|| format!("removing {} from the base cache", path.display()))?;
        tracing::info!(
            "removed {} from the base cache ({}; the cache keeps {} at most, KILN_BASE_CACHE_MAX)",
            path.display(),
            crate::host::progress::human_size(bytes),
            crate::host::progress::human_size(max)
        );
        total -= bytes;
        pruned.files += 1;
        pruned.bytes += bytes;
    }
    Ok(pruned)
}

/// The outcome of [`ensure`].
#[derive(Debug)]
pub struct Fetched {
    pub path: PathBuf,
    pub sha256: String,
    /// False when the cached file was used (no network access).
    pub downloaded: bool,
    pub bytes: u64,
}

/// Replace the scheme, host and any path prefix up to `/releases/` of `url` by `mirror`
/// (`https://mirror.example/ubuntu-cloud` + `https://cloud-images.ubuntu.com/releases/jammy/x`
/// = `https://mirror.example/ubuntu-cloud/releases/jammy/x`). A URL without `/releases/`
/// keeps its whole path.
pub fn mirror_url(url: &str, mirror: Option<&str>) -> String {
    let Some(mirror) = mirror.map(|m| m.trim_end_matches('/')).filter(|m| !m.is_empty()) else {
        return url.to_string();
    };
    let tail = match url.find("/releases/") {
        Some(i) => &url[i..],
        None => {
            let after_scheme = url.find("://").map(|i| i + 3).unwrap_or(0);
            url[after_scheme..]
                .find('/')
                .map(|i| &url[after_scheme + i..])
                .unwrap_or("/")
        }
    };
    format!("{mirror}{tail}")
}

/// Load the signing key from `path` and check that its fingerprint is `fingerprint`.
pub fn load_key(path: &Path, fingerprint: &str) -> Result<SignedPublicKey> {
    let f = File::open(path).map_err(|e| user(format!("cannot read the base signing key {}: {e}", path.display())))?;
    let (keys, _) = SignedPublicKey::from_reader_many(f).map_err(|e| {
        user(format!(
            "base signing key {}: not an OpenPGP public key: {e}",
            path.display()
        ))
    })?;
    let mut seen = Vec::new();
    for k in keys {
        let k = k.map_err(|e| user(format!("base signing key {}: {e}", path.display())))?;
        let fp = format!("{:X}", k.fingerprint());
        if fp == fingerprint {
            return Ok(k);
        }
        seen.push(fp);
    }
    Err(user(format!(
        "base signing key {} has fingerprint {}, but the definition demands {}; the key file is not the one \
         the definition trusts",
        path.display(),
        if seen.is_empty() {
            "(none)".to_string()
        } else {
            seen.join(", ")
        },
        spaced(fingerprint)
    )))
}

fn spaced(fp: &str) -> String {
    fp.as_bytes()
        .chunks(4)
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Check that `sig` (binary or armored) is a valid signature of `data` by `key` (its
/// primary key or one of its subkeys). The error says why not.
pub fn verify_signature(data: &[u8], sig: &[u8], key: &SignedPublicKey) -> std::result::Result<(), String> {
    let (sigs, _) = DetachedSignature::from_reader_many(sig).map_err(|e| {
        format!(
            "the signature file is not an OpenPGP signature ({})",
            one_line(&e.to_string())
        )
    })?;
    let ours: Vec<String> = std::iter::once((
        format!("{:X}", key.fingerprint()),
        hex::encode_upper(key.legacy_key_id()),
    ))
    .chain(
        key.public_subkeys
            .iter()
            .map(|k| (format!("{:X}", k.fingerprint()), hex::encode_upper(k.legacy_key_id()))),
    )
    .flat_map(|(f, k)| [f, k])
    .collect();
    let mut why = Vec::new();
    for s in sigs {
        let s = s.map_err(|e| format!("the signature file is damaged ({})", one_line(&e.to_string())))?;
        let mut last = match s.verify(&key.primary_key, data) {
            Ok(()) => return Ok(()),
            Err(e) => one_line(&e.to_string()),
        };
        for sub in &key.public_subkeys {
            match s.verify(&sub.key, data) {
                Ok(()) => return Ok(()),
                Err(e) => last = one_line(&e.to_string()),
            }
        }
        let issuers: Vec<String> = s
            .signature
            .issuer_fingerprint()
            .iter()
            .map(|f| format!("{f:X}"))
            .chain(s.signature.issuer_key_id().iter().map(hex::encode_upper))
            .collect();
        if issuers.iter().any(|i| ours.contains(i)) {
            why.push(format!(
                "a signature by the trusted key, but not of this SHA256SUMS: the file was changed after signing ({last})"
            ));
        } else if !issuers.is_empty() {
            why.push(format!("signed by {}, not by the trusted key", issuers.join(" / ")));
        } else {
            why.push(last);
        }
    }
    if why.is_empty() {
        return Err("the signature file holds no signature".into());
    }
    Err(why.join("; "))
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn file_name(url: &str) -> &str {
    url.rsplit('/').next().unwrap_or(url)
}

/// What a failed fetch says: the URL, what failed, that the cache holds at most a
/// resumable partial file, and the two ways forward.
fn failed(spec: &BaseSpec, url: &str, what: &str, partial: Option<&Path>) -> anyhow::Error {
    let left = match partial.filter(|p| p.exists()) {
        Some(p) => format!(
            "\nthe cache keeps only the resumable partial download {} (the next run continues it)",
            p.display()
        ),
        None => "\nnothing was left in the cache".to_string(),
    };
    user(format!(
        "cannot get the base pinned by {}\n  URL:    {url}\n  failed: {what}{left}\n\
         ways forward:\n  \
         - pass a base you already have: kiln build DEF --base FILE --out DIR (the cloud image {}, or a root tarball)\n  \
         - or make a root tarball from the Ubuntu archive (no cloud-image host needed): \
         kiln bootstrap --suite jammy --out jammy-root.tar, then kiln build DEF --base jammy-root.tar --out DIR",
        spec.origin.display(),
        file_name(&spec.url),
    ))
}

fn download_failed(spec: &BaseSpec, e: &DownloadError, partial: Option<&Path>) -> anyhow::Error {
    let mut what = e.failure.to_string();
    if e.attempts > 1 {
        what.push_str(&format!(", after {} attempts", e.attempts));
    }
    failed(spec, &e.url, &what, partial)
}

/// Make sure the pinned base is in the cache: reuse it (no network), or fetch the signed
/// `SHA256SUMS`, check its signature and its line for the image against the definition,
/// download the image (resuming a partial download) and check its sha256. `mirror`
/// replaces the host (see [`mirror_url`]); the checks are the same.
pub fn ensure(spec: &BaseSpec, cache_dir: &Path, mirror: Option<&str>, policy: &Policy) -> Result<Fetched> {
    let dest = cached(cache_dir, &spec.sha256);
    let from_cache = |dest: PathBuf| -> Result<Fetched> {
        tracing::info!("using the cached base {} ({})", dest.display(), file_name(&spec.url));
        let bytes = dest.metadata()?.len();
        Ok(Fetched {
            path: dest,
            sha256: spec.sha256.clone(),
            downloaded: false,
            bytes,
        })
    };
    if dest.is_file() {
        return from_cache(dest);
    }
    let dir = dest.parent().unwrap();
    std::fs::create_dir_all(dir).with_context(|| format!("creating cache directory {}", dir.display()))?;
    // Two builds sharing a cache download a base once.
    let _lock = crate::host::dirlock::DirLock::acquire(dir, "fetching this base")?;
    // Another build may have fetched it while we waited for the lock.
    if dest.is_file() {
        return from_cache(dest);
    }
    let part = partial(cache_dir, &spec.sha256);
    let key = load_key(&spec.key, &spec.fingerprint)?;
    let (url, sums_url, sig_url) = (
        mirror_url(&spec.url, mirror),
        mirror_url(&spec.sha256sums, mirror),
        mirror_url(&spec.signature, mirror),
    );
    let started = std::time::Instant::now();
    let sums =
        download::fetch_bytes(&sums_url, policy, 16 << 20).map_err(|e| download_failed(spec, &e, Some(&part)))?;
    let sig = download::fetch_bytes(&sig_url, policy, 1 << 20).map_err(|e| download_failed(spec, &e, Some(&part)))?;
    verify_signature(&sums, &sig, &key).map_err(|why| {
        failed(
            spec,
            &sums_url,
            &format!(
                "signature: {sig_url} is not a valid signature of SHA256SUMS by the key {} ({}): {why}",
                spaced(&spec.fingerprint),
                spec.key.display()
            ),
            Some(&part),
        )
    })?;
    tracing::info!("{sums_url}: good signature by {}", spaced(&spec.fingerprint));
    let name = file_name(&spec.url);
    let listed = sum_for(&String::from_utf8_lossy(&sums), name).ok_or_else(|| {
        failed(
            spec,
            &sums_url,
            &format!("checksum: the signed SHA256SUMS has no line for {name}"),
            Some(&part),
        )
    })?;
    if listed != spec.sha256 {
        return Err(failed(
            spec,
            &sums_url,
            &format!(
                "checksum: the signed SHA256SUMS lists {listed} for {name}, the definition pins {}",
                spec.sha256
            ),
            Some(&part),
        ));
    }
    let bytes =
        download::fetch_to_file(&url, &part, policy, "base").map_err(|e| download_failed(spec, &e, Some(&part)))?;
    let got = crate::disk::checksum::hex(&crate::disk::checksum::sha256_file(&part, None)?);
    if got != spec.sha256 {
        let _ = std::fs::remove_file(&part);
        return Err(failed(
            spec,
            &url,
            &format!(
                "checksum: the downloaded file has sha256 {got}, the definition and the signed SHA256SUMS say {}; \
                 the download was deleted",
                spec.sha256
            ),
            None,
        ));
    }
    std::fs::rename(&part, &dest).with_context(|| format!("renaming {} to {}", part.display(), dest.display()))?;
    let secs = started.elapsed().as_secs_f64();
    tracing::info!(
        "fetched the base {} ({}) in {secs:.1} s, signature and sha256 verified",
        dest.display(),
        crate::host::progress::human_size(bytes)
    );
    Ok(Fetched {
        path: dest,
        sha256: got,
        downloaded: true,
        bytes,
    })
}

/// `kiln fetch-base DEF`: only the base step of a build.
pub fn cmd_fetch_base(
    def: &Path,
    sets: &[crate::definition::Setting],
    cache_dir: &Path,
    mirror: Option<&str>,
) -> Result<()> {
    let d = crate::definition::load_with(def, sets)?;
    let Some(spec) = &d.base else {
        crate::user_bail!(
            "image definition {} has no [base] table: there is no pinned base to fetch; pass --base FILE to kiln build",
            d.file.display()
        );
    };
    let started = std::time::Instant::now();
    let f = ensure(spec, cache_dir, mirror, &Policy::from_env())?;
    println!(
        "{} {} ({}, sha256 {}) in {:.1} s",
        if f.downloaded { "fetched" } else { "cached" },
        f.path.display(),
        crate::host::progress::human_size(f.bytes),
        f.sha256,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirror_replaces_host_and_prefix() {
        let u =
            "https://cloud-images.ubuntu.com/releases/jammy/release-20250516/ubuntu-22.04-server-cloudimg-amd64.img";
        assert_eq!(mirror_url(u, None), u);
        assert_eq!(
            mirror_url(u, Some("http://127.0.0.1:8080/ubuntu-cloud/")),
            "http://127.0.0.1:8080/ubuntu-cloud/releases/jammy/release-20250516/ubuntu-22.04-server-cloudimg-amd64.img"
        );
        assert_eq!(
            mirror_url("https://h.example/a/b.img", Some("file:///srv/m")),
            "file:///srv/m/a/b.img"
        );
    }

    #[test]
    fn sums_lines() {
        let a = "a".repeat(64);
        let b = "B".repeat(64);
        let text = format!("{a} *ubuntu-22.04-server-cloudimg-amd64.img\n{b}  other.img\n");
        assert_eq!(sum_for(&text, "ubuntu-22.04-server-cloudimg-amd64.img"), Some(a));
        assert_eq!(sum_for(&text, "other.img"), Some("b".repeat(64)));
        assert_eq!(sum_for(&text, "missing.img"), None);
    }

    /// The shipped Ubuntu key loads and has the fingerprint the definitions pin; any other
    /// fingerprint is refused.
    #[test]
    fn shipped_key_has_its_fingerprint() {
        let key = Path::new(env!("CARGO_MANIFEST_DIR")).join("keys/ubuntu-cloudimage-keyring.asc");
        let k = load_key(&key, "D2EB44626FDDC30B513D5BB71A5D6C4C7DB87C81").unwrap();
        assert_eq!(
            format!("{:X}", k.fingerprint()),
            "D2EB44626FDDC30B513D5BB71A5D6C4C7DB87C81"
        );
        let e = load_key(&key, &"0".repeat(40)).unwrap_err();
        assert_eq!(crate::error::exit_code(&e), 2);
        assert!(
            e.to_string().contains("D2EB44626FDDC30B513D5BB71A5D6C4C7DB87C81"),
            "{e}"
        );
        assert!(verify_signature(b"data", b"not a signature", &k).is_err());
    }

    /// A real `SHA256SUMS` and `SHA256SUMS.gpg` released by Ubuntu's image publisher with
    /// the shipped key (tests/fixtures/README.md): the signature verifies; one changed
    /// byte of the list does not.
    #[test]
    fn real_ubuntu_signature_verifies() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let dir = root.join("tests/fixtures/ubuntu-signed-sha256sums");
        let key = load_key(
            &root.join("keys/ubuntu-cloudimage-keyring.asc"),
            "D2EB44626FDDC30B513D5BB71A5D6C4C7DB87C81",
        )
        .unwrap();
        let sums = std::fs::read(dir.join("SHA256SUMS")).unwrap();
        let sig = std::fs::read(dir.join("SHA256SUMS.gpg")).unwrap();
        verify_signature(&sums, &sig, &key).unwrap();
        let mut altered = sums.clone();
        altered[0] = if altered[0] == b'a' { b'b' } else { b'a' };
        assert!(verify_signature(&altered, &sig, &key).is_err());
        assert_eq!(
            sum_for(
                &String::from_utf8(sums).unwrap(),
                "ubuntu-jammy-core-cloudimg-amd64-root.tar.gz"
            )
            .as_deref(),
            Some("a151ab932c0e81faab3ac5219d9aa7f2c6edd56b139290c1d67b39078b144a4d")
        );
    }

    #[test]
    fn prune_removes_least_recently_used_but_never_a_base_in_use() {
        let d = tempfile::tempdir().unwrap();
        let bases = d.path().join("bases");
        std::fs::create_dir_all(&bases).unwrap();
        let t0 = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
        let mk = |name: &str, kib: usize, age: u64| {
            let p = bases.join(name);
            std::fs::write(&p, vec![1u8; kib << 10]).unwrap();
            File::options()
                .write(true)
                .open(&p)
                .unwrap()
                .set_modified(t0 + std::time::Duration::from_secs(age))
                .unwrap();
            p
        };
        let oldest = mk("a.raw", 64, 1);
        let used = mk("b", 64, 2);
        let newer = mk("c.tar", 64, 3);
        let newest = mk("d.raw", 64, 4);
        // Room for two: the oldest goes; the base in use (old, but used now) stays.
        let p = prune(d.path(), &[&used], 128 << 10).unwrap();
        assert_eq!(p.files, 2, "{p:?}");
        assert!(!oldest.exists() && !newer.exists());
        assert!(used.exists() && newest.exists());
        // A budget smaller than the base in use keeps it anyway.
        prune(d.path(), &[&used], 0).unwrap();
        assert!(used.exists() && !newest.exists());
        // No cache yet: nothing to do.
        let empty = tempfile::tempdir().unwrap();
        assert_eq!(prune(empty.path(), &[], 0).unwrap(), Pruned::default());
    }
}
