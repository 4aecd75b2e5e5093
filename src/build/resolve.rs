//! What a build resolved, read from apt inside the session at the end of provisioning
//! (while the package indexes are still mounted): every installed package with the
//! repository, pool path, size and sha256 the indexes give for its exact version, and
//! every repository apt read with the Release file it used. A lock writes this down
//! (`build::lock`); every build returns it in its report.
//!
//! Sources: `dpkg-query` (installed packages), `apt-get indextargets` (which Packages
//! file and which InRelease belong to which repository), the Packages files themselves
//! (deb822, read with `deb822-fast`), and for a package no index lists (a pool pin, a
//! file install) the .deb apt kept in the package cache.

use crate::build::lock::{LockedPackage, LockedRepository, Resolution};
use crate::build::stages::apt::RepoOverride;
use crate::build::stages::chroot::Session;
use crate::definition::ImageDef;
use crate::host::rootdir::RootDir;
use anyhow::{Context, Result};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// (name, version, architecture) of an installed package.
pub type Installed = (String, String, String);

/// Installed packages of the image (dpkg's status `installed` only).
pub fn installed(s: &Session) -> Result<BTreeSet<Installed>> {
    let out = s
        .cmd("dpkg-query")
        .args([
            "-W",
            "-f",
            "${Package}\\t${Version}\\t${Architecture}\\t${db:Status-Status}\\n",
        ])
        .run()
        .context("listing the image's installed packages (dpkg-query)")?;
    Ok(out
        .stdout_str()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            (f.len() == 4 && f[3] == "installed").then(|| (f[0].to_string(), f[1].to_string(), f[2].to_string()))
        })
        .collect())
}

/// One `apt-get indextargets` line for a Packages index.
#[derive(Debug, Clone, PartialEq)]
struct Target {
    filename: String,
    repo_uri: String,
    suite: String,
    component: String,
    metakey: String,
}

const TARGET_FORMAT: &str = "$(FILENAME)|$(REPO_URI)|$(RELEASE)|$(COMPONENT)|$(IDENTIFIER)|$(METAKEY)|$(TARGET_OF)";

fn parse_targets(text: &str) -> Vec<Target> {
    text.lines()
        .filter_map(|l| {
            // A field apt has no value for stays `$(NAME)`.
            let f: Vec<&str> = l.split('|').map(|x| if x.starts_with("$(") { "" } else { x }).collect();
            (f.len() == 7 && f[4] == "Packages" && f[6] == "deb").then(|| Target {
                filename: f[0].to_string(),
                repo_uri: f[1].to_string(),
                suite: f[2].to_string(),
                component: f[3].to_string(),
                metakey: f[5].to_string(),
            })
        })
        .collect()
}

/// apt's list file name prefix shared by a target's index and its Release files
/// (`.../archive.ubuntu.com_ubuntu_dists_jammy_` for `main/binary-amd64/Packages`).
fn list_prefix(t: &Target) -> Option<String> {
    let mut f = t.filename.as_str();
    for ext in [".lz4", ".gz", ".xz", ".zst", ".bz2", ".lzma"] {
        f = f.strip_suffix(ext).unwrap_or(f);
    }
    f.strip_suffix(&t.metakey.replace('/', "_")).map(str::to_string)
}

/// URIs compared the way apt writes them (`file:/x/` and `file:///x` are the same).
fn norm_uri(u: &str) -> String {
    match u.strip_prefix("file:") {
        Some(p) => format!("file:/{}", p.trim_start_matches('/').trim_end_matches('/')),
        None => u.trim_end_matches('/').to_string(),
    }
}

/// The definition's repository a (URI, suite) belongs to: its id, the URI to record and
/// its suite.
fn definition_repo(
    def: &ImageDef,
    overrides: &[RepoOverride],
    uri: &str,
    suite: &str,
) -> Option<(String, String, String)> {
    let uri = norm_uri(uri);
    def.repositories.iter().find_map(|r| {
        if r.suite.trim_end_matches('/') != suite.trim_end_matches('/') {
            return None;
        }
        match overrides.iter().find(|o| o.id == r.id) {
            Some(o) => {
                let inside = if o.uri.starts_with("file://") {
                    format!("file:{}", o.mount_point())
                } else {
                    o.uri.clone()
                };
                (norm_uri(&inside) == uri).then(|| (r.id.clone(), o.uri.clone(), r.suite.clone()))
            }
            None => (norm_uri(&r.uri) == uri).then(|| (r.id.clone(), r.uri.clone(), r.suite.clone())),
        }
    })
}

/// The Release file of a repository as apt stored it (InRelease, else Release with
/// Release.gpg), read inside the image; for a `file:` repository whose lists apt did
/// not copy, from the repository itself.
fn release_record(rd: &RootDir, t: &Target) -> Result<(String, Vec<u8>, Option<Vec<u8>>)> {
    let mut candidates = Vec::new();
    if let Some(p) = list_prefix(t) {
        candidates.push(p);
    }
    if let Some(path) = t.repo_uri.strip_prefix("file:") {
        let dir = format!("/{}/", path.trim_start_matches('/').trim_end_matches('/'));
        candidates.push(if t.suite.is_empty() || t.suite.ends_with('/') {
            format!("{dir}{}", t.suite.trim_start_matches("./").trim_start_matches('/'))
        } else {
            format!("{dir}dists/{}/", t.suite)
        });
    }
    for prefix in &candidates {
        let inr = format!("{prefix}InRelease");
        if rd.exists(&inr)? {
            return Ok(("InRelease".into(), rd.read(&inr)?, None));
        }
        let rel = format!("{prefix}Release");
        if rd.exists(&rel)? {
            let gpg = format!("{prefix}Release.gpg");
            let sig = if rd.exists(&gpg)? { Some(rd.read(&gpg)?) } else { None };
            return Ok(("Release".into(), rd.read(&rel)?, sig));
        }
    }
    anyhow::bail!(
        "no InRelease or Release file for {} {} in the image's apt lists (looked at {})",
        t.repo_uri,
        t.suite,
        candidates.join(", ")
    )
}

/// Fingerprints (or key ids) of the signatures on a Release file.
fn signers(release: &[u8], detached: Option<&[u8]>) -> Vec<String> {
    use pgp::composed::{CleartextSignedMessage, Deserializable, DetachedSignature};
    let sigs: Vec<pgp::packet::Signature> = match detached {
        None => CleartextSignedMessage::from_string(&String::from_utf8_lossy(release))
            .map(|(m, _)| m.signatures().to_vec())
            .unwrap_or_default(),
        Some(d) => DetachedSignature::from_reader_many(d)
            .map(|(it, _)| it.flatten().map(|s| s.signature).collect())
            .unwrap_or_default(),
    };
    let mut out: Vec<String> = sigs
        .iter()
        .map(|s| match s.issuer_fingerprint().first() {
            Some(f) => format!("{f:X}"),
            None => s.issuer_key_id().first().map(hex::encode_upper).unwrap_or_default(),
        })
        .filter(|s| !s.is_empty())
        .collect();
    out.sort();
    out.dedup();
    out
}

fn release_date(release: &[u8]) -> String {
    String::from_utf8_lossy(release)
        .lines()
        .find_map(|l| l.strip_prefix("Date:").map(|d| d.trim().to_string()))
        .unwrap_or_default()
}

/// Index records of the wanted (name, version, arch) from one Packages file:
/// (filename, size, sha256). Read paragraph by paragraph: an index can be 60 MB.
fn scan_packages(
    index: impl std::io::BufRead,
    want: &BTreeSet<Installed>,
    out: &mut BTreeMap<Installed, (String, u64, String)>,
) {
    for para in deb822_fast::Deb822::iter_paragraphs_from_reader(index).flatten() {
        let (Some(n), Some(v), Some(a)) = (para.get("Package"), para.get("Version"), para.get("Architecture")) else {
            continue;
        };
        let key = (n.to_string(), v.to_string(), a.to_string());
        if want.contains(&key) && !out.contains_key(&key) {
            out.insert(
                key,
                (
                    para.get("Filename").unwrap_or_default().to_string(),
                    para.get("Size").and_then(|s| s.parse().ok()).unwrap_or(0),
                    para.get("SHA256").unwrap_or_default().to_ascii_lowercase(),
                ),
            );
        }
    }
}

/// Everything a build resolved (see the module documentation). `base` is what the
/// base had before provisioning; `archives_host` the host side of the package cache.
pub fn resolve(
    s: &Session,
    rd: &RootDir,
    def: &ImageDef,
    overrides: &[RepoOverride],
    base: &BTreeSet<Installed>,
    archives_host: &Path,
) -> Result<Resolution> {
    let installed = installed(s)?;
    let out = s
        .cmd("apt-get")
        .args(["indextargets", "--format", TARGET_FORMAT])
        .run()
        .context("apt-get indextargets")?;
    let targets = parse_targets(&out.stdout_str());
    // Repositories, in apt's order (the first listing a version wins).
    let mut repos: Vec<LockedRepository> = Vec::new();
    let mut target_repo: Vec<usize> = Vec::new();
    for t in &targets {
        let (id, uri, suite) = definition_repo(def, overrides, &t.repo_uri, &t.suite).unwrap_or_else(|| {
            let suite = if t.suite.is_empty() {
                "/".to_string()
            } else {
                t.suite.clone()
            };
            (
                t.suite.trim_end_matches('/').replace('/', "-"),
                t.repo_uri.clone(),
                suite,
            )
        });
        let idx = match repos
            .iter()
            .position(|r| r.id == id && norm_uri(&r.uri) == norm_uri(&uri))
        {
            Some(i) => i,
            None => {
                let (release_file, bytes, sig) = release_record(rd, t)?;
                let mut id = if id.is_empty() { "repository".to_string() } else { id };
                if repos.iter().any(|r| r.id == id) {
                    id = format!("{id}-{}", repos.len());
                }
                repos.push(LockedRepository {
                    id,
                    uri,
                    suite,
                    components: vec![],
                    fingerprints: signers(&bytes, sig.as_deref()),
                    release_file,
                    release_sha256: crate::disk::checksum::hex(&sha256(&bytes)),
                    release_date: release_date(&bytes),
                });
                repos.len() - 1
            }
        };
        if !t.component.is_empty() && !repos[idx].components.contains(&t.component) {
            repos[idx].components.push(t.component.clone());
        }
        target_repo.push(idx);
    }
    // Index records of the installed versions.
    let mut found: BTreeMap<Installed, (String, u64, String)> = BTreeMap::new();
    let mut repo_of: BTreeMap<Installed, usize> = BTreeMap::new();
    for (t, &ri) in targets.iter().zip(&target_repo) {
        if !rd.exists(&t.filename)? {
            tracing::debug!("index {} not in the lists; skipped", t.filename);
            continue;
        }
        let index = std::io::BufReader::new(rd.open_file(&t.filename)?);
        let before: BTreeSet<Installed> = found.keys().cloned().collect();
        scan_packages(index, &installed, &mut found);
        for k in found.keys() {
            if !before.contains(k) {
                repo_of.insert(k.clone(), ri);
            }
        }
    }
    // What no index lists: pool pins and file installs, from the package cache.
    let pool: BTreeMap<(String, String), String> = def
        .stages
        .iter()
        .flat_map(|st| &st.packages)
        .filter_map(|p| Some(((p.name.clone(), p.version.clone()?), p.pool.as_ref()?.path.clone())))
        .collect();
    let mirror = crate::build::stages::apt::archive_mirror(rd).ok().map(|m| norm_uri(&m));
    let mut packages = Vec::new();
    let mut unknown = Vec::new();
    for key in &installed {
        let (name, version, arch) = key;
        let in_base = base.contains(key);
        let rec = match found.get(key) {
            Some((filename, size, sha)) => LockedPackage {
                name: name.clone(),
                version: version.clone(),
                architecture: arch.clone(),
                repository: repos[repo_of[key]].id.clone(),
                filename: filename.clone(),
                size: *size,
                sha256: sha.clone(),
                in_base,
            },
            None => {
                let cached = archives_host.join(format!("{name}_{}_{arch}.deb", version.replace(':', "%3a")));
                let pool_path = pool.get(&(name.clone(), version.clone()));
                let pool_file = pool_path.map(|p| archives_host.join(p.rsplit('/').next().unwrap()));
                let file = [pool_file, Some(cached)].into_iter().flatten().find(|f| f.is_file());
                let (size, sha) = match &file {
                    Some(f) => (
                        std::fs::metadata(f)?.len(),
                        crate::disk::checksum::hex(&crate::disk::checksum::sha256_file(f, None)?),
                    ),
                    None => (0, String::new()),
                };
                if sha.is_empty() && !in_base {
                    unknown.push(format!("{name}={version}"));
                }
                let repository = match (pool_path, &mirror) {
                    (Some(_), Some(m)) => repos
                        .iter()
                        .find(|r| norm_uri(&r.uri) == *m)
                        .map(|r| r.id.clone())
                        .unwrap_or_default(),
                    _ => String::new(),
                };
                LockedPackage {
                    name: name.clone(),
                    version: version.clone(),
                    architecture: arch.clone(),
                    repository,
                    filename: pool_path.cloned().unwrap_or_default(),
                    size,
                    sha256: sha,
                    in_base,
                }
            }
        };
        packages.push(rec);
    }
    if !unknown.is_empty() {
        tracing::warn!(
            "{} installed package(s) are in no repository index and not in the package cache: {}",
            unknown.len(),
            unknown.join(", ")
        );
    }
    packages.sort();
    Ok(Resolution {
        repositories: repos,
        packages,
    })
}

/// A locked build must end with exactly the lock's packages: otherwise fail with a
/// table of (package, locked version, version installed).
pub fn check_against_lock(installed: &BTreeSet<Installed>, locked: &crate::build::archive::LockedSource) -> Result<()> {
    let diff = lock_difference(installed, &locked.lock.packages);
    if diff.is_empty() {
        tracing::info!(
            "the image has exactly the {} packages of {}",
            installed.len(),
            locked.lock_path.display()
        );
        return Ok(());
    }
    let mut table = format!("{:<40} {:<36} {}\n", "package", "locked", "installed");
    for (n, want, got) in &diff {
        table += &format!("    {n:<40} {want:<36} {got}\n");
    }
    crate::user_bail!(
        "the build did not end with the packages of {} ({} differ):\n    {table}the definition or its hooks changed \
         since the lock was made; run `kiln lock --update`",
        locked.lock_path.display(),
        diff.len()
    );
}

/// (package:arch, locked version or "-", installed version or "-") for every difference.
pub fn lock_difference(installed: &BTreeSet<Installed>, lock: &[LockedPackage]) -> Vec<(String, String, String)> {
    let have: BTreeMap<(String, String), String> = installed
        .iter()
        .map(|(n, v, a)| ((n.clone(), a.clone()), v.clone()))
        .collect();
    let want: BTreeMap<(String, String), String> = lock.iter().map(|p| (p.key(), p.version.clone())).collect();
    let mut out = Vec::new();
    for (k, v) in &want {
        match have.get(k) {
            Some(h) if h == v => {}
            h => out.push((
                format!("{}:{}", k.0, k.1),
                v.clone(),
                h.cloned().unwrap_or_else(|| "-".into()),
            )),
        }
    }
    for (k, h) in &have {
        if !want.contains_key(k) {
            out.push((format!("{}:{}", k.0, k.1), "-".into(), h.clone()));
        }
    }
    out.sort();
    out
}

fn sha256(data: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(data).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_and_prefixes() {
        let t = parse_targets(
            "/var/lib/apt/lists/archive.ubuntu.com_ubuntu_dists_jammy_main_binary-amd64_Packages|http://archive.ubuntu.com/ubuntu/|jammy|main|Packages|main/binary-amd64/Packages|deb\n\
             /var/lib/apt/lists/archive.ubuntu.com_ubuntu_dists_jammy_main_i18n_Translation-en|http://archive.ubuntu.com/ubuntu/|jammy|main|Translations|main/i18n/Translation-en|deb\n\
             /var/lib/apt/lists/_run_kiln_repos_kubernetes_Packages.lz4|file:/run/kiln/repos/kubernetes/|/||Packages|Packages|deb\n",
        );
        assert_eq!(t.len(), 2);
        assert_eq!(
            list_prefix(&t[0]).unwrap(),
            "/var/lib/apt/lists/archive.ubuntu.com_ubuntu_dists_jammy_"
        );
        assert_eq!(
            list_prefix(&t[1]).unwrap(),
            "/var/lib/apt/lists/_run_kiln_repos_kubernetes_"
        );
        assert_eq!(norm_uri("file:///run/x/"), norm_uri("file:/run/x"));
    }

    #[test]
    fn packages_scan_and_release_fields() {
        let idx = "Package: a\nVersion: 1\nArchitecture: amd64\nFilename: pool/a_1_amd64.deb\nSize: 3\nSHA256: AB\nDescription: x\n more\n\n\
                   Package: a\nVersion: 2\nArchitecture: amd64\nFilename: pool/a_2_amd64.deb\nSize: 4\nSHA256: cd\n\n";
        let want: BTreeSet<Installed> = [("a".into(), "2".into(), "amd64".into())].into();
        let mut out = BTreeMap::new();
        scan_packages(idx.as_bytes(), &want, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(
            out.values().next().unwrap(),
            &("pool/a_2_amd64.deb".to_string(), 4, "cd".to_string())
        );
        assert_eq!(
            release_date(b"Origin: x\nDate: Thu, 04 Dec 2024 00:00:00 UTC\nSHA256:\n"),
            "Thu, 04 Dec 2024 00:00:00 UTC"
        );
        assert!(signers(b"not signed", None).is_empty());
    }

    #[test]
    fn differences_from_the_lock() {
        let lp = |n: &str, v: &str| LockedPackage {
            name: n.into(),
            version: v.into(),
            architecture: "amd64".into(),
            repository: String::new(),
            filename: String::new(),
            size: 0,
            sha256: String::new(),
            in_base: false,
        };
        let inst = |v: &[(&str, &str)]| -> BTreeSet<Installed> {
            v.iter()
                .map(|(n, v)| (n.to_string(), v.to_string(), "amd64".to_string()))
                .collect()
        };
        let lock = [lp("a", "1"), lp("b", "1")];
        assert!(lock_difference(&inst(&[("a", "1"), ("b", "1")]), &lock).is_empty());
        assert_eq!(
            lock_difference(&inst(&[("a", "2"), ("c", "1")]), &lock),
            [
                ("a:amd64".to_string(), "1".to_string(), "2".to_string()),
                ("b:amd64".into(), "1".into(), "-".into()),
                ("c:amd64".into(), "-".into(), "1".into()),
            ]
        );
    }
}
