//! `kiln diff A B`: what changed between two images (raw or qcow2), read offline
//! without mounting ([`RootFs`]): the installed packages (from both dpkg databases),
//! then every file of the root filesystems — type, mode, owner, size, the sha256 of a
//! regular file's contents, a symlink's target.
//!
//! Both images are read at once, each on its own thread (an ext4 root is not `Send`,
//! so each thread opens its own), and every regular file is hashed: a rebuilt image can
//! change a file's contents without changing its size. A directory's size is ext4's
//! allocation, not content, and is not compared.

use crate::image::dpkg;
use crate::image::open::{FileKind, FileMeta, RootFs};
use anyhow::{Context, Result, anyhow};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// An installed package as the diff shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackageEntry {
    pub name: String,
    pub arch: String,
    pub version: String,
}

/// A package whose version (or architecture) differs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackageChange {
    pub name: String,
    pub arch: String,
    pub from: String,
    pub to: String,
}

/// One file of an image's root.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub path: String,
    pub kind: FileKind,
    /// Permission bits, octal (`0755`, `4755`).
    pub mode: String,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    /// Lower-case hex sha256 of a regular file's contents.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// A symlink's target, as stored.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

/// A path present in both images with different properties.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileChange {
    pub path: String,
    /// What differs, in this order: `kind`, `mode`, `owner`, `size`, `sha256`, `target`.
    pub changed: Vec<String>,
    pub a: FileEntry,
    pub b: FileEntry,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackageDiff {
    pub added: Vec<PackageEntry>,
    pub removed: Vec<PackageEntry>,
    pub changed: Vec<PackageChange>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileDiff {
    pub added: Vec<FileEntry>,
    pub removed: Vec<FileEntry>,
    pub changed: Vec<FileChange>,
}

/// `kiln diff --json` prints this.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageDiff {
    pub a: String,
    pub b: String,
    pub packages: PackageDiff,
    pub files: FileDiff,
}

impl ImageDiff {
    /// Nothing differs.
    pub fn is_empty(&self) -> bool {
        self.packages == PackageDiff::default() && self.files == FileDiff::default()
    }
}

/// Everything the diff needs from one image.
struct Manifest {
    /// Installed packages by `name:arch`.
    packages: BTreeMap<String, PackageEntry>,
    files: BTreeMap<String, FileEntry>,
}

/// `kiln diff A B [--json]`.
pub fn cmd_diff(a: &Path, b: &Path, json: bool) -> Result<()> {
    let d = diff_images(a, b)?;
    let text = if json {
        let mut s = serde_json::to_string_pretty(&d).context("serialising the diff")?;
        s.push('\n');
        s
    } else {
        render(&d)
    };
    crate::host::progress::print_stdout(&text)
}

/// Compare two images, reading both at once.
pub fn diff_images(a: &Path, b: &Path) -> Result<ImageDiff> {
    let bars = indicatif::MultiProgress::new();
    let (ma, mb) = std::thread::scope(|s| {
        let spawn = |path: &Path| {
            let bar = bars.add(crate::host::progress::bytes(0, &format!("hashing {}", path.display())));
            let path = path.to_path_buf();
            s.spawn(move || {
                let m = manifest(&path, &bar);
                bar.finish_and_clear();
                m
            })
        };
        let (ta, tb) = (spawn(a), spawn(b));
        let join = |t: std::thread::ScopedJoinHandle<'_, Result<Manifest>>| {
            t.join().unwrap_or_else(|_| Err(anyhow!("reading an image panicked")))
        };
        (join(ta), join(tb))
    });
    let (ma, mb) = (ma?, mb?);
    Ok(ImageDiff {
        a: a.display().to_string(),
        b: b.display().to_string(),
        packages: diff_packages(&ma.packages, &mb.packages),
        files: diff_files(&ma.files, &mb.files),
    })
}

/// Read an image's installed packages and every file, hashing regular files.
fn manifest(image: &Path, bar: &indicatif::ProgressBar) -> Result<Manifest> {
    let root = RootFs::open(image)?;
    let packages = dpkg::read_status(&root)?
        .into_iter()
        .filter(|p| p.is_installed())
        .map(|p| {
            (
                format!("{}:{}", p.name, p.arch),
                PackageEntry {
                    name: p.name,
                    arch: p.arch,
                    version: p.version,
                },
            )
        })
        .collect();
    let walked = root.walk()?;
    let total: u64 = walked
        .iter()
        .filter(|(_, m)| m.kind == FileKind::Regular)
        .map(|(_, m)| m.size)
        .sum();
    bar.set_length(total);
    let mut files = BTreeMap::new();
    for (path, meta) in walked {
        crate::host::cancel::check()?;
        let sha256 = match meta.kind {
            FileKind::Regular => Some(crate::disk::checksum::hex(&root.sha256(&path, Some(bar))?)),
            _ => None,
        };
        let target = match meta.kind {
            FileKind::Symlink => Some(root.read_link(&path)?),
            _ => None,
        };
        files.insert(path.clone(), entry(path, &meta, sha256, target));
    }
    Ok(Manifest { packages, files })
}

fn entry(path: String, m: &FileMeta, sha256: Option<String>, target: Option<String>) -> FileEntry {
    FileEntry {
        path,
        kind: m.kind,
        mode: format!("{:04o}", m.mode & 0o7777),
        uid: m.uid,
        gid: m.gid,
        size: m.size,
        sha256,
        target,
    }
}

fn diff_packages(a: &BTreeMap<String, PackageEntry>, b: &BTreeMap<String, PackageEntry>) -> PackageDiff {
    let mut d = PackageDiff::default();
    for (k, pa) in a {
        match b.get(k) {
            None => d.removed.push(pa.clone()),
            Some(pb) if pb.version != pa.version => d.changed.push(PackageChange {
                name: pa.name.clone(),
                arch: pa.arch.clone(),
                from: pa.version.clone(),
                to: pb.version.clone(),
            }),
            Some(_) => {}
        }
    }
    d.added = b
        .iter()
        .filter(|(k, _)| !a.contains_key(*k))
        .map(|(_, p)| p.clone())
        .collect();
    d
}

fn diff_files(a: &BTreeMap<String, FileEntry>, b: &BTreeMap<String, FileEntry>) -> FileDiff {
    let mut d = FileDiff::default();
    for (path, fa) in a {
        let Some(fb) = b.get(path) else {
            d.removed.push(fa.clone());
            continue;
        };
        let mut changed = Vec::new();
        if fa.kind != fb.kind {
            changed.push("kind");
        }
        if fa.mode != fb.mode {
            changed.push("mode");
        }
        if (fa.uid, fa.gid) != (fb.uid, fb.gid) {
            changed.push("owner");
        }
        let is_dir = fa.kind == FileKind::Directory && fb.kind == FileKind::Directory;
        if fa.size != fb.size && !is_dir {
            changed.push("size");
        }
        if fa.sha256 != fb.sha256 {
            changed.push("sha256");
        }
        if fa.target != fb.target {
            changed.push("target");
        }
        if !changed.is_empty() {
            d.changed.push(FileChange {
                path: path.clone(),
                changed: changed.into_iter().map(String::from).collect(),
                a: fa.clone(),
                b: fb.clone(),
            });
        }
    }
    d.added = b
        .iter()
        .filter(|(k, _)| !a.contains_key(*k))
        .map(|(_, f)| f.clone())
        .collect();
    d
}

/// The human form: a summary line per section, then `+`, `-`, `~` lines.
pub fn render(d: &ImageDiff) -> String {
    let mut s = format!("--- {}\n+++ {}\n", d.a, d.b);
    let p = &d.packages;
    s.push_str(&format!(
        "\nPackages: {} added, {} removed, {} changed\n",
        p.added.len(),
        p.removed.len(),
        p.changed.len()
    ));
    for x in &p.added {
        s.push_str(&format!("  + {} {} ({})\n", x.name, x.version, x.arch));
    }
    for x in &p.removed {
        s.push_str(&format!("  - {} {} ({})\n", x.name, x.version, x.arch));
    }
    for x in &p.changed {
        s.push_str(&format!("  ~ {} {} -> {} ({})\n", x.name, x.from, x.to, x.arch));
    }
    let f = &d.files;
    s.push_str(&format!(
        "\nFiles: {} added, {} removed, {} changed\n",
        f.added.len(),
        f.removed.len(),
        f.changed.len()
    ));
    for x in &f.added {
        s.push_str(&format!("  + {}  {}\n", x.path, describe(x)));
    }
    for x in &f.removed {
        s.push_str(&format!("  - {}  {}\n", x.path, describe(x)));
    }
    for c in &f.changed {
        let what: Vec<String> = c
            .changed
            .iter()
            .map(|k| match k.as_str() {
                "kind" => format!("type {:?} -> {:?}", c.a.kind, c.b.kind).to_lowercase(),
                "mode" => format!("mode {} -> {}", c.a.mode, c.b.mode),
                "owner" => format!("owner {}:{} -> {}:{}", c.a.uid, c.a.gid, c.b.uid, c.b.gid),
                "size" => format!("size {} -> {}", c.a.size, c.b.size),
                "target" => format!(
                    "target {} -> {}",
                    c.a.target.as_deref().unwrap_or("-"),
                    c.b.target.as_deref().unwrap_or("-")
                ),
                other => other.to_string(),
            })
            .collect();
        s.push_str(&format!("  ~ {}  {}\n", c.path, what.join(", ")));
    }
    if d.is_empty() {
        s.push_str("\nThe images have the same packages and files.\n");
    }
    s
}

/// `regular 0644 0:0 1234 B`, `symlink -> target`.
fn describe(f: &FileEntry) -> String {
    let kind = format!("{:?}", f.kind).to_lowercase();
    match (&f.kind, &f.target) {
        (FileKind::Symlink, Some(t)) => format!("symlink -> {t}"),
        (FileKind::Regular, _) => format!("{kind} {} {}:{} {} B", f.mode, f.uid, f.gid, f.size),
        _ => format!("{kind} {} {}:{}", f.mode, f.uid, f.gid),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::inspect::test_images::{self, images};

    #[test]
    fn an_image_and_its_qcow2_do_not_differ() {
        let d = diff_images(&images().raw, &images().qcow2).unwrap();
        assert!(d.is_empty(), "{}", render(&d));
        assert!(render(&d).contains("same packages and files"));
    }

    #[test]
    fn differences_are_found_and_shown() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let w = |p: &str, text: &str| {
            let p = root.join(p);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        };
        // The test image's tree, changed: a package upgraded, one removed, one added; a
        // file's contents changed (same size), one removed, one added, a symlink moved.
        let status = test_images::DPKG_STATUS
            .replace("Version: 1.30.0-1.1\nDepends", "Version: 1.30.1-1.1\nDepends")
            .replace("Package: bash\n", "Package: zsh\n");
        w("var/lib/dpkg/status", &status);
        w("etc/kiln-secret", "9876543210");
        w("usr/bin/new", "new file");
        w("usr/lib/os-release", test_images::OS_RELEASE);
        std::os::unix::fs::symlink("../usr/lib/os-release-moved", root.join("etc/os-release")).unwrap();
        let raw = dir.path().join("b.raw");
        test_images::image_from_tree(&root, &raw);

        let d = diff_images(&images().raw, &raw).unwrap();
        assert_eq!(
            d.packages.changed,
            [PackageChange {
                name: "kubelet".into(),
                arch: "amd64".into(),
                from: "1.30.0-1.1".into(),
                to: "1.30.1-1.1".into()
            }]
        );
        let names = |v: &[PackageEntry]| v.iter().map(|p| p.name.clone()).collect::<Vec<_>>();
        assert_eq!(names(&d.packages.added), ["zsh"]);
        assert_eq!(names(&d.packages.removed), ["bash"]);
        let changed: BTreeMap<&str, Vec<String>> = d
            .files
            .changed
            .iter()
            .map(|c| (c.path.as_str(), c.changed.clone()))
            .collect();
        assert_eq!(changed["/etc/kiln-secret"], ["mode", "sha256"], "{changed:?}");
        assert_eq!(changed["/etc/os-release"], ["size", "target"], "{changed:?}");
        assert!(changed["/var/lib/dpkg/status"].contains(&"sha256".to_string()));
        assert!(d.files.added.iter().any(|f| f.path == "/usr/bin/new" && f.size == 8));
        assert!(d.files.removed.iter().any(|f| f.path == "/usr/bin/true"));
        let text = render(&d);
        for want in [
            "  ~ kubelet 1.30.0-1.1 -> 1.30.1-1.1 (amd64)",
            "  + zsh 5.1-6ubuntu1.1 (amd64)",
            "  ~ /etc/kiln-secret  mode 0640 -> 0644, sha256",
            "  + /usr/bin/new  regular 0644",
            "target ../usr/lib/os-release -> ../usr/lib/os-release-moved",
        ] {
            assert!(text.contains(want), "{want:?} missing from:\n{text}");
        }
        let json: ImageDiff = serde_json::from_str(&serde_json::to_string(&d).unwrap()).unwrap();
        assert_eq!(json, d);
    }
}
