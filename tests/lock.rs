//! Locks, fetch and offline builds (issue #11) with real apt and real packages: the real
//! Ubuntu 22.04 base (`kiln bootstrap`, cached), the real Ubuntu archive (pigz and the
//! base's upgrades), and a TEST-ONLY signed repository (tests/fixtures/make-lock-repo.sh)
//! that publishes a STAND-IN `kubelet` in two versions, as an upstream point release does.
//!
//! One small definition (4 GiB, no bootloader, one install stage and a full-upgrade
//! stage), built four times in one test so the builds are shared: the lock, a locked
//! build after the newer version appeared, an unlocked build, and a locked offline build
//! inside a network namespace with only loopback. The failure cases (a missing or
//! damaged .deb in the archive, a lock made with an override used without it) stop
//! before anything is written and cost no build.

mod common;
use common::*;
use kiln::build::lock::LockFile;
use std::path::{Path, PathBuf};
use std::process::Command;

const OLD: &str = "1.30.0-1.1";
const NEW: &str = "1.30.1-1.1";

fn make_repo(dir: &Path, versions: &[&str]) {
    let st = Command::new(project().join("tests/fixtures/make-lock-repo.sh"))
        .arg(dir)
        .arg("kubelet")
        .args(versions)
        .status()
        .unwrap();
    assert!(st.success(), "make-lock-repo.sh failed");
}

/// A project with one definition: the stand-in kubelet from the test repository and pigz
/// from the Ubuntu archive, then a full-upgrade (which must not move a locked version).
fn project_dir(d: &Path) -> PathBuf {
    for sub in ["images", "package-lists", "keys"] {
        std::fs::create_dir_all(d.join(sub)).unwrap();
    }
    std::fs::copy(
        project().join("keys/kubernetes-v1.30.asc"),
        d.join("keys/kubernetes-v1.30.asc"),
    )
    .unwrap();
    std::fs::write(d.join("package-lists/locktest.list"), "kubelet\npigz\n").unwrap();
    let def = d.join("images/locktest.toml");
    std::fs::write(
        &def,
        "name = \"locktest\"\ndescription = \"lock test\"\ndisk_size = \"4G\"\nbootloader = false\n\
         [payload]\nuri = \"https://x/{name}.raw\"\n\
         [[repository]]\nid = \"locktest\"\nuri = \"https://locktest.example.invalid/deb/\"\nsuite = \"/\"\nkey = \"keys/kubernetes-v1.30.asc\"\n\
         [[stage]]\nname = \"tools\"\nrepositories = [\"locktest\"]\npackages = [\"locktest\"]\n\
         [[stage]]\nname = \"upgrade\"\nfull_upgrade = true\n",
    )
    .unwrap();
    def
}

fn kiln_in(args: &[&str], netns: bool) -> std::process::Output {
    let mut c = if netns {
        let mut c = Command::new("unshare");
        c.arg("--net").arg(kiln());
        c
    } else {
        Command::new(kiln())
    };
    let out = c
        .args(args)
        .env("KILN_CACHE_DIR", cache().join("kiln-cache"))
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    eprintln!(
        "$ {}kiln {}\n--- stdout\n{}--- stderr (tail)\n{}",
        if netns { "unshare --net " } else { "" },
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        tail(&String::from_utf8_lossy(&out.stderr), 40)
    );
    out
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n") + "\n"
}

/// (name, version, arch) of every installed package, read from the image offline.
fn packages(raw: &Path) -> Vec<(String, String, String)> {
    let root = kiln::image::open::RootFs::open(raw).unwrap();
    let mut v: Vec<_> = kiln::image::dpkg::read_status(&root)
        .unwrap()
        .into_iter()
        .filter(|p| p.is_installed())
        .map(|p| (p.name, p.version, p.arch))
        .collect();
    v.sort();
    v
}

fn version_of(pk: &[(String, String, String)], name: &str) -> String {
    pk.iter()
        .find(|p| p.0 == name)
        .map(|p| p.1.clone())
        .unwrap_or_else(|| panic!("{name} not installed"))
}

#[test]
fn locked_builds_install_exactly_the_lock_online_and_offline() {
    require_root!();
    let d = scratch("lock");
    let def = project_dir(d.path());
    let defs = def.to_str().unwrap();
    let repo = d.path().join("repo");
    make_repo(&repo, &[OLD]);
    let ov = format!(
        "locktest=file://{},key={}",
        repo.display(),
        repo.join("standin.asc").display()
    );
    let base = base_tarball();
    let bases = base.to_str().unwrap();
    let lock_file = d.path().join("images/locktest.lock");

    // 1. The lock: the base, the repositories, every installed package, the override.
    let o = kiln_in(&["lock", defs, "--base", bases, "--repo-override", &ov], false);
    assert!(o.status.success(), "kiln lock failed");
    let lock = LockFile::load(&lock_file).unwrap();
    let kubelet = lock.packages.iter().find(|p| p.name == "kubelet").unwrap();
    assert_eq!(kubelet.version, OLD);
    assert_eq!(kubelet.repository, "locktest");
    let deb = repo.join(format!("kubelet_{OLD}_all.deb"));
    assert_eq!(kubelet.sha256, sh("sha256sum", &[deb.to_str().unwrap()])[..64]);
    let pigz = lock.packages.iter().find(|p| p.name == "pigz").unwrap();
    assert!(pigz.filename.starts_with("pool/universe/p/pigz/"), "{pigz:?}");
    assert!(!pigz.in_base && pigz.sha256.len() == 64, "{pigz:?}");
    assert!(lock.packages.iter().any(|p| p.name == "libc6" && p.in_base));
    assert_eq!(lock.base.size, std::fs::metadata(&base).unwrap().len());
    assert!(lock.base.url.is_none());
    assert_eq!(lock.overrides.len(), 1);
    let r = lock.repository("locktest").unwrap();
    assert!(
        r.uri.contains(repo.to_str().unwrap()) && r.fingerprints.len() == 1,
        "{r:?}"
    );
    assert!(
        lock.repositories
            .iter()
            .any(|r| r.suite == "jammy-updates" && !r.fingerprints.is_empty())
    );
    assert!(lock.source_date_epoch > 1_600_000_000);
    let text = std::fs::read_to_string(&lock_file).unwrap();
    assert!(text.contains("Made with --repo-override"), "{text}");

    // 2. A newer version appears: the lock is stale, a locked build keeps the old one
    //    (through full-upgrade too), an unlocked build takes the new one.
    make_repo(&repo, &[OLD, NEW]);
    let o = kiln_in(&["lock", "--check", defs], false);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stdout).contains("repository locktest has a new InRelease"));
    let locked_out = d.path().join("locked");
    let o = kiln_in(
        &[
            "build",
            defs,
            "--locked",
            "--base",
            bases,
            "--repo-override",
            &ov,
            "--out",
            locked_out.to_str().unwrap(),
        ],
        false,
    );
    assert!(o.status.success(), "locked build failed");
    let locked_pk = packages(&locked_out.join("locktest.raw"));
    assert_eq!(version_of(&locked_pk, "kubelet"), OLD);
    let lock_pk: Vec<_> = lock
        .packages
        .iter()
        .map(|p| (p.name.clone(), p.version.clone(), p.architecture.clone()))
        .collect();
    assert_eq!(locked_pk, lock_pk, "the locked build's packages are not the lock's");
    // It ships its lock, listed in SHA256SUMS, and its SBOM is dated by the lock.
    assert_eq!(std::fs::read_to_string(locked_out.join("locktest.lock")).unwrap(), text);
    let sums = std::fs::read_to_string(locked_out.join("SHA256SUMS")).unwrap();
    let lock_sum = sh("sha256sum", &[lock_file.to_str().unwrap()])[..64].to_string();
    assert!(sums.contains(&format!("{lock_sum}  locktest.lock")), "{sums}");
    let sbom: serde_json::Value =
        serde_json::from_slice(&std::fs::read(locked_out.join("locktest.spdx.json")).unwrap()).unwrap();
    let created = chrono::DateTime::from_timestamp(lock.source_date_epoch as i64, 0)
        .unwrap()
        .format("%Y-%m-%dT%H:%M:%SZ")
        .to_string();
    assert_eq!(sbom["creationInfo"]["created"], created.as_str());
    let fresh_out = d.path().join("fresh");
    let o = kiln_in(
        &[
            "build",
            defs,
            "--base",
            bases,
            "--repo-override",
            &ov,
            "--out",
            fresh_out.to_str().unwrap(),
        ],
        false,
    );
    assert!(o.status.success(), "unlocked build failed");
    assert_eq!(version_of(&packages(&fresh_out.join("locktest.raw")), "kubelet"), NEW);

    // 3. A lock made with an override is refused without it (before anything is written).
    let o = kiln_in(
        &[
            "build",
            defs,
            "--locked",
            "--base",
            bases,
            "--out",
            d.path().join("no-ov").to_str().unwrap(),
        ],
        false,
    );
    assert_eq!(o.status.code(), Some(2));
    let err = stderr(&o);
    assert!(
        err.contains("--repo-override locktest=file://") && err.contains("this build has none"),
        "{err}"
    );
    assert!(!d.path().join("no-ov").exists());

    // 4. kiln fetch, then a locked offline build with only loopback networking.
    let archive = d.path().join("archive");
    let o = kiln_in(
        &["fetch", defs, "--archive", archive.to_str().unwrap(), "--base", bases],
        false,
    );
    assert!(o.status.success(), "kiln fetch failed");
    for f in ["debs/pigz_2.6-1_amd64.deb", "locktest.lock"] {
        assert!(archive.join(f).is_file(), "{f} not in the archive");
    }
    assert!(archive.join("base").join(base.file_name().unwrap()).is_file());
    assert!(archive.join(format!("debs/kubelet_{OLD}_all.deb")).is_file());
    assert!(!archive.join(format!("debs/kubelet_{NEW}_all.deb")).exists());
    let offline_out = d.path().join("offline");
    let offline = |archive: &Path, out: &Path| {
        kiln_in(
            &[
                "build",
                defs,
                "--locked",
                "--offline",
                "--archive",
                archive.to_str().unwrap(),
                "--repo-override",
                &ov,
                "--out",
                out.to_str().unwrap(),
            ],
            true,
        )
    };
    let o = offline(&archive, &offline_out);
    assert!(o.status.success(), "locked offline build failed");
    let offline_pk = packages(&offline_out.join("locktest.raw"));
    assert_eq!(offline_pk, locked_pk, "two locked builds differ in their packages");

    // 5. One .deb missing from the archive: fails before anything is written, naming it.
    let broken = d.path().join("broken");
    sh("cp", &["-a", archive.to_str().unwrap(), broken.to_str().unwrap()]);
    let gone = broken.join(format!("debs/kubelet_{OLD}_all.deb"));
    std::fs::remove_file(&gone).unwrap();
    let out = d.path().join("out-missing");
    let o = offline(&broken, &out);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains(gone.to_str().unwrap()), "{}", stderr(&o));
    assert!(!out.exists(), "the failed build wrote {}", out.display());

    // 6. A .deb with a wrong sha256 is refused.
    std::fs::copy(repo.join(format!("kubelet_{NEW}_all.deb")), &gone).unwrap();
    let o = offline(&broken, &out);
    assert_eq!(o.status.code(), Some(2));
    let err = stderr(&o);
    assert!(
        err.contains(gone.to_str().unwrap()) && err.contains("sha256") && err.contains("refusing"),
        "{err}"
    );
    assert!(!out.exists());
    assert_no_leaks(d.path());
}
