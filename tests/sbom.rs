//! The SBOM every build writes (`NAME.spdx.json`) and `kiln diff`, on the shared seed
//! images (tests/common: built once per kiln binary, reused here; no image is built for
//! these tests). The SBOM is checked with the SPDX project's own validator (`pyspdxtools`
//! from PyPI's `spdx-tools`, in the venv `.ci/run` makes) and against `dpkg-query` run
//! on a read-only mount of the image; `kiln diff` against changes the test makes with
//! dpkg and the kernel's ext4 on a loop-mounted copy.

mod common;
use common::*;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The root filesystem of an image mounted by the test (read-only or not), unmounted and
/// detached on drop.
struct Mounted {
    dir: tempfile::TempDir,
    dev: String,
}

impl Mounted {
    fn new(image: &Path, writable: bool) -> Mounted {
        let (offset, size) = partition(image, 1);
        let mut args = vec!["--find", "--show"];
        if !writable {
            args.push("--read-only");
        }
        let (offset, size) = (offset.to_string(), size.to_string());
        args.extend(["--offset", &offset, "--sizelimit", &size, image.to_str().unwrap()]);
        let dev = sh("losetup", &args).trim().to_string();
        let dir = scratch("mnt");
        let opts = if writable { "rw" } else { "ro,noload" };
        sh("mount", &["-t", "ext4", "-o", opts, &dev, dir.path().to_str().unwrap()]);
        Mounted { dir, dev }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
        let _ = Command::new("losetup").args(["-d", &self.dev]).status();
    }
}

/// The SPDX project's validator, installed by .ci/run.
fn pyspdxtools() -> PathBuf {
    let p = cache().join("venv/bin/pyspdxtools");
    assert!(
        p.exists(),
        "{} is missing: .ci/run installs spdx-tools into $KILN_TEST_CACHE/venv",
        p.display()
    );
    p
}

/// (name, version, arch) of every installed package, as dpkg-query lists them from the
/// image's database.
fn dpkg_query_installed(root: &Path) -> BTreeSet<(String, String, String)> {
    let admindir = format!("--admindir={}", root.join("var/lib/dpkg").display());
    let out = sh(
        "dpkg-query",
        &[
            &admindir,
            "-W",
            "-f",
            "${db:Status-Abbrev}\t${Package}\t${Version}\t${Architecture}\n",
        ],
    );
    out.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            // `ii `, `hi `: installed (selection install or hold); `rc` and the like are not.
            (f[0].as_bytes().get(1) == Some(&b'i')).then(|| (f[1].into(), f[2].into(), f[3].into()))
        })
        .collect()
}

fn check_sbom(raw: &Path, name: &str) {
    let out = raw.parent().unwrap();
    let file = out.join(format!("{name}.spdx.json"));
    // Listed in SHA256SUMS with its sha256 (tests/images.rs checks the whole file, the
    // 20 GB image included).
    let sums = std::fs::read_to_string(out.join("SHA256SUMS")).unwrap();
    let digest = sh("sha256sum", &[file.to_str().unwrap()]);
    let digest = digest.split_whitespace().next().unwrap();
    assert!(sums.contains(&format!("{digest}  {name}.spdx.json\n")), "{sums}");

    let v = Command::new(pyspdxtools()).arg("-i").arg(&file).output().unwrap();
    assert!(
        v.status.success(),
        "pyspdxtools rejects {}:\n{}{}",
        file.display(),
        String::from_utf8_lossy(&v.stdout),
        String::from_utf8_lossy(&v.stderr)
    );

    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    assert_eq!(doc["spdxVersion"], "SPDX-2.3");
    let pkgs = doc["packages"].as_array().unwrap();
    let image = &pkgs[0];
    assert_eq!(image["name"], name);
    let listed: BTreeSet<(String, String, String)> = pkgs[1..]
        .iter()
        .map(|p| {
            let purl = p["externalRefs"][0]["referenceLocator"].as_str().unwrap();
            let arch = purl.split("arch=").nth(1).unwrap().split('&').next().unwrap();
            assert!(purl.ends_with("&distro=ubuntu-22.04"), "{purl}");
            (
                p["name"].as_str().unwrap().to_string(),
                p["versionInfo"].as_str().unwrap().to_string(),
                arch.to_string(),
            )
        })
        .collect();
    assert_eq!(listed.len(), pkgs.len() - 1, "one element per package");
    let m = Mounted::new(raw, false);
    let want = dpkg_query_installed(m.path());
    assert_eq!(
        listed,
        want,
        "SBOM and dpkg-query differ: only in the SBOM {:?}, only in dpkg-query {:?}",
        listed.difference(&want).collect::<Vec<_>>(),
        want.difference(&listed).collect::<Vec<_>>()
    );
    drop(m);

    // Facts of real Ubuntu packages: supplier, purl, the declared license from DEP-5.
    let bash = pkgs.iter().find(|p| p["name"] == "bash").unwrap();
    assert_eq!(
        bash["supplier"],
        "Organization: Ubuntu Developers (ubuntu-devel-discuss@lists.ubuntu.com)"
    );
    let with_license = pkgs
        .iter()
        .filter(|p| p["licenseDeclared"].as_str().is_some_and(|l| l != "NOASSERTION"))
        .count();
    assert!(with_license * 3 > pkgs.len(), "only {with_license} declared licenses");
    let rels = doc["relationships"].as_array().unwrap();
    let count = |t: &str| rels.iter().filter(|r| r["relationshipType"] == t).count();
    assert_eq!(count("DESCRIBES"), 1);
    assert_eq!(count("CONTAINS"), pkgs.len() - 1);
    assert!(count("DEPENDS_ON") > pkgs.len(), "{}", count("DEPENDS_ON"));
    eprintln!(
        "{name}: {} packages, {with_license} with a declared license, {} relationships, {} bytes",
        pkgs.len() - 1,
        rels.len(),
        std::fs::metadata(&file).unwrap().len()
    );

    // The build knew where each .deb came from: most packages carry its sha256 (those the
    // base had at a version that left the archive may not).
    let with_checksum = doc["packages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p.get("checksums").is_some())
        .count();
    assert!(
        with_checksum * 2 > pkgs.len(),
        "only {with_checksum} packages have a .deb checksum"
    );

    // `kiln sbom` on the finished image writes the same document, but for the time and
    // the .debs' checksums and download locations, which only the build's records know.
    let d = scratch("sbom");
    let again = d.path().join("again.spdx.json");
    let o = run_kiln(&[
        "sbom",
        raw.to_str().unwrap(),
        "--name",
        name,
        "--out",
        again.to_str().unwrap(),
    ]);
    assert!(o.status.success());
    let mut other: serde_json::Value = serde_json::from_slice(&std::fs::read(&again).unwrap()).unwrap();
    other["creationInfo"]["created"] = doc["creationInfo"]["created"].clone();
    let mut doc = doc.clone();
    for d in [&mut doc, &mut other] {
        for p in d["packages"].as_array_mut().unwrap() {
            let p = p.as_object_mut().unwrap();
            p.remove("checksums");
            p.insert("downloadLocation".into(), "NOASSERTION".into());
        }
    }
    assert_eq!(other, doc);
}

#[test]
fn gpu_ready_sbom_validates_and_lists_the_installed_packages() {
    require_root!();
    check_sbom(&gpu_ready_seed(), GPU_READY);
}

#[test]
fn nvidia_sbom_validates_and_lists_the_installed_packages() {
    require_root!();
    check_sbom(&nvidia_seed(), NVIDIA);
}

fn kiln_diff(a: &Path, b: &Path) -> serde_json::Value {
    let started = std::time::Instant::now();
    let o = run_kiln(&["diff", "--json", a.to_str().unwrap(), b.to_str().unwrap()]);
    assert!(o.status.success());
    eprintln!("kiln diff took {:.1} s", started.elapsed().as_secs_f64());
    serde_json::from_slice(&o.stdout).unwrap()
}

fn paths(v: &serde_json::Value) -> BTreeSet<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|f| f["path"].as_str().unwrap().to_string())
        .collect()
}

/// A copy of the GPU-ready seed with one package purged (dpkg) and one file changed
/// (the kernel's ext4): `kiln diff` reports exactly that; the seed and its qcow2 do not
/// differ.
#[test]
fn diff_finds_a_purged_package_and_a_changed_file() {
    require_root!();
    let seed = gpu_ready_seed();
    let same = kiln_diff(&seed, &gpu_ready_qcow2());
    for section in ["packages", "files"] {
        for kind in ["added", "removed", "changed"] {
            assert_eq!(same[section][kind], serde_json::json!([]), "{section} {kind}: {same}");
        }
    }

    let d = scratch("diff");
    let copy = d.path().join("copy.raw");
    copy_sparse(&seed, &copy);
    let (pigz_paths, info_files) = {
        let m = Mounted::new(&copy, true);
        let root = m.path();
        let list = std::fs::read_to_string(root.join("var/lib/dpkg/info/pigz.list")).unwrap();
        let info: BTreeSet<String> = std::fs::read_dir(root.join("var/lib/dpkg/info"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("pigz."))
            .map(|n| format!("/var/lib/dpkg/info/{n}"))
            .collect();
        sh("dpkg", &[&format!("--root={}", root.display()), "--purge", "pigz"]);
        let mut issue = std::fs::read_to_string(root.join("etc/issue")).unwrap();
        issue.push_str("changed by the kiln diff test\n");
        std::fs::write(root.join("etc/issue"), issue).unwrap();
        // What dpkg removed: the package's paths that are gone now (shared directories stay).
        let gone: BTreeSet<String> = list
            .lines()
            .filter(|p| *p != "/." && std::fs::symlink_metadata(root.join(p.trim_start_matches('/'))).is_err())
            .map(String::from)
            .collect();
        (gone, info)
    };
    assert!(pigz_paths.contains("/usr/bin/pigz") && !info_files.is_empty());

    let diff = kiln_diff(&seed, &copy);
    let p = &diff["packages"];
    assert_eq!(p["added"], serde_json::json!([]));
    assert_eq!(p["changed"], serde_json::json!([]));
    let removed: Vec<&str> = p["removed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["name"].as_str().unwrap())
        .collect();
    assert_eq!(removed, ["pigz"]);

    let f = &diff["files"];
    assert_eq!(paths(&f["added"]), BTreeSet::new());
    let want_removed: BTreeSet<String> = pigz_paths.union(&info_files).cloned().collect();
    assert_eq!(paths(&f["removed"]), want_removed);
    let changed = f["changed"].as_array().unwrap();
    assert_eq!(
        paths(&f["changed"]),
        ["/etc/issue", "/var/lib/dpkg/status", "/var/lib/dpkg/status-old"]
            .map(String::from)
            .into(),
        "dpkg rewrites its status (and keeps the old one); the test changed /etc/issue"
    );
    let issue = changed.iter().find(|c| c["path"] == "/etc/issue").unwrap();
    assert_eq!(issue["changed"], serde_json::json!(["size", "sha256"]));
    assert_ne!(issue["a"]["sha256"], issue["b"]["sha256"]);

    let o = run_kiln(&["diff", seed.to_str().unwrap(), copy.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("  - pigz ") && text.contains("  ~ /etc/issue  size") && text.contains("  - /usr/bin/pigz"),
        "{text}"
    );
    assert_no_leaks(d.path());
}
