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
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

/// Where the pinned base with this sha256 lives in the cache.
pub fn cached(cache_dir: &Path, sha256: &str) -> PathBuf {
    cache_dir.join("bases").join(sha256)
}

/// Where its download in progress lives.
pub fn partial(cache_dir: &Path, sha256: &str) -> PathBuf {
    cache_dir.join("bases").join(format!("{sha256}.partial"))
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

/// Holds an exclusive lock on the cache's `bases/` directory while fetching (two builds
/// sharing a cache download a base once). The directory itself is locked, so no lock
/// file is left behind.
struct Lock(File);
impl Drop for Lock {
    fn drop(&mut self) {
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

fn lock(path: &Path) -> Result<Lock> {
    let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        tracing::info!(
            "another kiln is fetching this base; waiting for it ({})",
            path.display()
        );
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(std::io::Error::last_os_error()).with_context(|| format!("locking {}", path.display()));
        }
    }
    Ok(Lock(f))
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
    let _lock = lock(dir)?;
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
}
