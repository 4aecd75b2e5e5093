//! Shared fixtures for the root integration tests: the kiln binary, the cached Ubuntu
//! 22.04 base (`kiln bootstrap`), its qcow2 "cloud image", the stand-in repositories, and a
//! small root tarball for disk-layer tests. Expensive fixtures are built once, under a
//! file lock, in $KILN_TEST_CACHE (default /var/cache/kiln-tests) and reused across runs.
#![allow(dead_code)]

use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn kiln() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_kiln"))
}

pub fn project() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn is_root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

/// Fail, never skip, when not root: integration tests need loop devices and mounts.
#[macro_export]
macro_rules! require_root {
    () => {
        assert!(
            common::is_root(),
            "this test needs root (loop devices, mounts); run the tests as root, e.g. `sudo ci/test.sh`"
        );
    };
}

pub fn cache() -> PathBuf {
    let c = PathBuf::from(std::env::var("KILN_TEST_CACHE").unwrap_or_else(|_| "/var/cache/kiln-tests".into()));
    std::fs::create_dir_all(&c).unwrap();
    c
}

/// A scratch directory on the same disk as the cache (not tmpfs: images are GBs sparse).
pub fn scratch(tag: &str) -> tempfile::TempDir {
    let d = cache().join("scratch");
    std::fs::create_dir_all(&d).unwrap();
    tempfile::Builder::new()
        .prefix(&format!("{tag}-"))
        .tempdir_in(d)
        .unwrap()
}

pub struct Lock(File);
impl Drop for Lock {
    fn drop(&mut self) {
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

pub fn lock(name: &str) -> Lock {
    let f = File::create(cache().join(format!("{name}.lock"))).unwrap();
    assert_eq!(unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) }, 0);
    Lock(f)
}

pub fn short_hash(paths: &[&str]) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for p in paths {
        std::fs::read(project().join(p)).unwrap().hash(&mut h);
    }
    format!("{:016x}", h.finish())
}

fn run_ok(cmd: &mut Command) {
    let st = cmd.status().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(st.success(), "{cmd:?} failed: {st}");
}

/// What the base fixture is made from: `kiln bootstrap`'s source, its package list and
/// the archive keyring (the fixture's cache key).
pub const BASE_INPUTS: [&str; 3] = [
    "src/build/bootstrap.rs",
    "package-lists/jammy-cloudimg.list",
    "keys/ubuntu-archive-keyring.gpg",
];

/// The cached Ubuntu 22.04 root tarball, made by `kiln bootstrap --suite jammy` and keyed
/// by [`BASE_INPUTS`].
pub fn base_tarball() -> PathBuf {
    suite_tarball("jammy")
}

/// The cached Ubuntu 24.04 root tarball (`kiln bootstrap --suite noble`), the base of the
/// `ubuntu=24.04` variants.
pub fn noble_tarball() -> PathBuf {
    suite_tarball("noble")
}

/// The cached root tarball of `kiln bootstrap --suite SUITE`, keyed like [`BASE_INPUTS`]
/// with the suite's package list.
fn suite_tarball(suite: &str) -> PathBuf {
    let list = format!("package-lists/{suite}-cloudimg.list");
    let inputs = [BASE_INPUTS[0], list.as_str(), BASE_INPUTS[2]];
    let p = cache().join(format!("base-{suite}-{}.tar", short_hash(&inputs)));
    let _l = lock(if suite == "jammy" { "base" } else { "base-noble" });
    if !p.exists() {
        let started = std::time::Instant::now();
        run_ok(
            Command::new(kiln())
                .args(["bootstrap", "--suite", suite, "--out"])
                .arg(&p)
                .current_dir(project()),
        );
        eprintln!(
            "kiln bootstrap made {} in {:.0} s",
            p.display(),
            started.elapsed().as_secs_f64()
        );
    }
    p
}

/// The qcow2 "cloud image" made from the base tarball (tests/fixtures/make-cloud-image.sh).
pub fn cloud_qcow2() -> PathBuf {
    let base = base_tarball();
    let mut inputs = BASE_INPUTS.to_vec();
    inputs.push("tests/fixtures/make-cloud-image.sh");
    let p = cache().join(format!("cloud-jammy-{}.qcow2", short_hash(&inputs)));
    let _l = lock("cloud");
    if !p.exists() {
        run_ok(
            Command::new(project().join("tests/fixtures/make-cloud-image.sh"))
                .arg(&base)
                .arg(&p),
        );
    }
    p
}

/// The signed stand-in repositories for the two upstream repositories this machine
/// can't reach (tests/fixtures/make-standin-repo.sh).
pub fn standin_repos() -> PathBuf {
    let p = cache().join(format!(
        "standin-{}",
        short_hash(&["tests/fixtures/make-standin-repo.sh"])
    ));
    let _l = lock("standin");
    if !p.join("kubernetes/InRelease").exists() {
        run_ok(Command::new(project().join("tests/fixtures/make-standin-repo.sh")).arg(&p));
    }
    p
}

/// `kiln build` arguments for the NVIDIA image on the GPU-ready seed's qcow2 into `out`,
/// with the stand-in repositories, `--timings` and `extra`.
#[allow(dead_code)]
pub fn nvidia_build_args(out: &Path, extra: &[&str]) -> Vec<String> {
    let def = project().join(format!("images/{NVIDIA}.toml"));
    let mut args: Vec<String> = vec![
        "build".into(),
        def.to_string_lossy().into(),
        "--base".into(),
        gpu_ready_qcow2().to_string_lossy().into(),
        "--out".into(),
        out.to_string_lossy().into(),
        "--timings".into(),
    ];
    args.extend(standin_overrides(&["kubernetes", "nvidia-container-toolkit"]));
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// `--repo-override` flags pointing the given third-party repositories at the stand-ins:
/// `ID` is the stand-in directory of that name, `ID=DIR` another one (the
/// `kubernetes=kubernetes-v1.29` channel of a variant).
pub fn standin_overrides(ids: &[&str]) -> Vec<String> {
    let r = standin_repos();
    ids.iter()
        .flat_map(|spec| {
            let (id, dir) = spec.split_once('=').unwrap_or((spec, spec));
            [
                "--repo-override".to_string(),
                format!(
                    "{id}=file://{},key={}",
                    r.join(dir).display(),
                    r.join(dir).join("standin.asc").display()
                ),
            ]
        })
        .collect()
}

/// `kiln verify IMAGE --def DEF --json` (plus `extra`), asserting that every check
/// passed; the report.
#[allow(dead_code)]
pub fn verify_passes(raw: &Path, def: &Path, extra: &[&str]) -> kiln::image::verify::VerifyReport {
    let mut args = vec![
        "verify",
        raw.to_str().unwrap(),
        "--def",
        def.to_str().unwrap(),
        "--json",
    ];
    args.extend(extra);
    let o = run_kiln(&args);
    let v: kiln::image::verify::VerifyReport = serde_json::from_slice(&o.stdout).expect("verify --json output");
    let failed: Vec<_> = v.checks.iter().filter(|c| !c.ok).collect();
    assert!(failed.is_empty(), "{}: failed checks: {failed:#?}", raw.display());
    assert!(
        o.status.success() && v.passed,
        "kiln verify of {} failed",
        raw.display()
    );
    v
}

pub fn run_kiln(args: &[&str]) -> Output {
    run_kiln_env(args, &[])
}

/// [`run_kiln`] with more environment variables (`PATH` with a tool of the venv, ...).
pub fn run_kiln_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let out = Command::new(kiln())
        .args(args)
        .env("KILN_CACHE_DIR", cache().join("kiln-cache"))
        .env("RUST_BACKTRACE", "0")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    eprintln!(
        "$ kiln {}\n--- stdout\n{}--- stderr\n{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A small root tarball made by the test: enough of an Ubuntu root for the disk layer and
/// the payload (os-release, dpkg status with kubelet, a kernel), with a symlink, a hard
/// link, a setuid file, an xattr and a device node to check the unpacker.
pub fn small_tarball(dir: &Path, xz: bool) -> PathBuf {
    let mut b = tar::Builder::new(Vec::new());
    let mut add = |path: &str, data: &[u8], mode: u32, kind: tar::EntryType, link: Option<&str>| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h.set_size(data.len() as u64);
        if let Some(l) = link {
            h.set_link_name(l).unwrap();
        }
        if kind == tar::EntryType::Char {
            h.set_device_major(1).unwrap();
            h.set_device_minor(3).unwrap();
        }
        h.set_cksum();
        b.append_data(&mut h, path, data).unwrap();
    };
    use tar::EntryType as E;
    for d in [
        "./",
        "./etc/",
        "./usr/",
        "./usr/lib/",
        "./usr/lib/modules/",
        "./usr/lib/modules/5.15.0-204-generic/",
        "./usr/bin/",
        "./boot/",
        "./var/",
        "./var/lib/",
        "./var/lib/dpkg/",
        "./dev/",
        "./root/",
        "./var/log/",
        "./etc/ssh/",
    ] {
        add(d, b"", 0o755, E::Directory, None);
    }
    add("./lib", b"", 0o777, E::Symlink, Some("usr/lib"));
    add(
        "./etc/os-release",
        b"PRETTY_NAME=\"Ubuntu 22.04.5 LTS\"\nNAME=\"Ubuntu\"\nVERSION_ID=\"22.04\"\nVERSION=\"22.04.5 LTS (Jammy Jellyfish)\"\nVERSION_CODENAME=jammy\nID=ubuntu\nID_LIKE=debian\nUBUNTU_CODENAME=jammy\n",
        0o644,
        E::Regular,
        None,
    );
    add(
        "./etc/machine-id",
        b"0123456789abcdef0123456789abcdef\n",
        0o444,
        E::Regular,
        None,
    );
    add("./etc/ssh/ssh_host_ed25519_key", b"secret", 0o600, E::Regular, None);
    add("./root/.bash_history", b"history", 0o600, E::Regular, None);
    add("./var/log/syslog", b"old log lines\n", 0o640, E::Regular, None);
    add(
        "./etc/fstab",
        b"LABEL=cloudimg-rootfs / ext4 defaults 0 1\n/swap.img none swap sw 0 0\n",
        0o644,
        E::Regular,
        None,
    );
    add(
        "./boot/vmlinuz-5.15.0-204-generic",
        b"not really a kernel",
        0o600,
        E::Regular,
        None,
    );
    add("./usr/bin/su", b"#!/bin/sh\n", 0o4755, E::Regular, None);
    add("./usr/bin/su-hardlink", b"", 0o4755, E::Link, Some("./usr/bin/su"));
    add("./dev/null", b"", 0o666, E::Char, None);
    add("./var/lib/dpkg/arch", b"amd64\n", 0o644, E::Regular, None);
    add(
        "./var/lib/dpkg/status",
        b"Package: base-files\nStatus: install ok installed\nArchitecture: amd64\nVersion: 12ubuntu4.7\n\n\
Package: kubelet\nStatus: hold ok installed\nArchitecture: amd64\nVersion: 1.30.0-1.1\n\n\
Package: linux-image-5.15.0-204-generic\nStatus: install ok installed\nArchitecture: amd64\nVersion: 5.15.0-204.214\n\n",
        0o644,
        E::Regular,
        None,
    );
    let data = b.into_inner().unwrap();
    let (name, bytes) = if xz {
        let mut e = xz2::write::XzEncoder::new(Vec::new(), 1);
        std::io::Write::write_all(&mut e, &data).unwrap();
        ("small-root.tar.xz", e.finish().unwrap())
    } else {
        ("small-root.tar", data)
    };
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

/// A definition with no provisioning stages: just the disk layer and the artifacts.
pub fn disk_only_def(dir: &Path, name: &str, size: &str) -> PathBuf {
    // Definitions name package lists etc. relative to the project root (the parent of
    // images/), so a test project gets its own images/ directory.
    let images = dir.join("images");
    std::fs::create_dir_all(&images).unwrap();
    let p = images.join(format!("{name}.toml"));
    std::fs::write(
        &p,
        format!("name = \"{name}\"\ndescription = \"disk layer test\"\ndisk_size = \"{size}\"\nbootloader = false\n[payload]\nuri = \"https://bucket.example/images/{{name}}.raw\"\n"),
    )
    .unwrap();
    p
}

/// Run a program and return stdout, asserting success.
pub fn sh(prog: &str, args: &[&str]) -> String {
    let out = Command::new(prog)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{prog}: {e}"));
    assert!(
        out.status.success(),
        "{prog} {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Partition `n`'s (offset, size) in bytes, read with sgdisk (independent of kiln).
pub fn partition(image: &Path, n: u32) -> (u64, u64) {
    let info = sh("sgdisk", &["-i", &n.to_string(), image.to_str().unwrap()]);
    let num = |key: &str| -> u64 {
        info.lines()
            .find(|l| l.starts_with(key))
            .unwrap()
            .split_whitespace()
            .nth(2)
            .unwrap()
            .parse()
            .unwrap()
    };
    let (first, last) = (num("First sector:"), num("Last sector:"));
    (first * 512, (last - first + 1) * 512)
}

/// A read-only loop device over a byte range, detached on drop (for e2fsck/fsck).
pub struct TestLoop(pub String);
impl TestLoop {
    pub fn new(image: &Path, offset: u64, size: u64) -> TestLoop {
        let dev = sh(
            "losetup",
            &[
                "--find",
                "--show",
                "--read-only",
                "--offset",
                &offset.to_string(),
                "--sizelimit",
                &size.to_string(),
                image.to_str().unwrap(),
            ],
        );
        TestLoop(dev.trim().to_string())
    }
}
impl Drop for TestLoop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

/// Nothing of kiln's left on the host: no loop device backed by a file under `dir`, no
/// mount under it.
pub fn assert_no_leaks(dir: &Path) {
    let d = dir.to_string_lossy().to_string();
    let loops = sh("losetup", &["-a"]);
    assert!(!loops.lines().any(|l| l.contains(&d)), "loop devices leaked:\n{loops}");
    let mi = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mi.lines().any(|l| l.contains(&d)), "mounts leaked:\n{mi}");
}

/// A seed image (`images/DEF.toml`) built from `base` with the stand-in repositories
/// named in `repos`, shared by every test binary and kept across runs in
/// `$KILN_TEST_CACHE/images/`: rebuilt only when the kiln binary, the definition tree
/// (images/, package-lists/, overlays/, hooks/, keys/) or the base changes. Older builds
/// of the same definition are removed. Returns the raw image.
pub fn seed_image(def: &str, base: &Path, repos: &[&str]) -> PathBuf {
    seed_variant(def, &[], base, repos)
}

/// [`seed_image`] for a variant: `kiln build images/DEF.toml --set NAME=VALUE...`, cached
/// per variant like the seeds (each variant built once per run and reused by the verify
/// and boot tests). Returns the raw image, named as the variant names itself.
pub fn seed_variant(def: &str, sets: &[&str], base: &Path, repos: &[&str]) -> PathBuf {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    std::fs::read(kiln()).unwrap().hash(&mut h);
    let mut files = Vec::new();
    for d in ["images", "package-lists", "overlays", "hooks", "keys"] {
        collect_files(&project().join(d), &mut files);
    }
    files.sort();
    for f in &files {
        f.hash(&mut h);
        std::fs::read(f).unwrap().hash(&mut h);
    }
    let md = std::fs::metadata(base).unwrap();
    (base, md.len(), md.modified().unwrap()).hash(&mut h);
    repos.hash(&mut h);
    sets.hash(&mut h);
    // The default variant keeps the seed's plain name (DEF-HASH); others are DEF+N=V-HASH.
    let tag: String = std::iter::once(def.to_string())
        .chain(sets.iter().map(|s| format!("+{s}")))
        .collect();
    let key = format!("{tag}-{:016x}", h.finish());
    let images = cache().join("images");
    std::fs::create_dir_all(&images).unwrap();
    let _l = lock(&format!("image-{tag}"));
    let dir = images.join(&key);
    let built = |dir: &Path| -> Option<PathBuf> {
        let rd = std::fs::read_dir(dir).ok()?;
        rd.flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == "raw") && p.with_extension("json").is_file())
    };
    if built(&dir).is_none() {
        for e in std::fs::read_dir(&images).unwrap().flatten() {
            let n = e.file_name().to_string_lossy().to_string();
            let older = n
                .strip_prefix(&format!("{tag}-"))
                .is_some_and(|h| h.len() == 16 && h.chars().all(|c| c.is_ascii_hexdigit()));
            if older && n != key {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
        let d = project().join("images").join(format!("{def}.toml"));
        let mut args: Vec<String> = vec![
            "build".into(),
            d.to_string_lossy().into(),
            "--base".into(),
            base.to_string_lossy().into(),
        ];
        for s in sets {
            args.extend(["--set".into(), s.to_string()]);
        }
        args.extend([
            "--out".into(),
            dir.to_string_lossy().into(),
            "--force".into(),
            "--timings".into(),
        ]);
        args.extend(standin_overrides(repos));
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = run_kiln(&argv);
        assert!(o.status.success(), "building {tag} from {} failed", base.display());
        assert_no_leaks(&dir);
    }
    built(&dir).unwrap_or_else(|| panic!("no image in {}", dir.display()))
}

pub const GPU_READY: &str = "ubuntu-2204-gpu-ready-nodriver";
pub const NVIDIA: &str = "ubuntu-2204-nvidia-565-firmware1";

/// The GPU-ready seed image, built from the root tarball (so with kiln's bootloader).
pub fn gpu_ready_seed() -> PathBuf {
    seed_image(GPU_READY, &base_tarball(), &["kubernetes"])
}

/// The GPU-ready seed image as a qcow2 "cloud disk" (uncompressed qemu-img convert,
/// kept next to the raw): the base the NVIDIA image is built on, as the spec layers it.
pub fn gpu_ready_qcow2() -> PathBuf {
    let raw = gpu_ready_seed();
    let q = raw.with_extension("qcow2");
    let _l = lock(&format!("image-{GPU_READY}-qcow2"));
    if !q.exists() {
        let partial = q.with_extension("qcow2.partial");
        sh(
            "qemu-img",
            &[
                "convert",
                "-f",
                "raw",
                "-O",
                "qcow2",
                raw.to_str().unwrap(),
                partial.to_str().unwrap(),
            ],
        );
        std::fs::rename(&partial, &q).unwrap();
    }
    q
}

/// The NVIDIA seed image, built on the GPU-ready image's qcow2: a cloud-disk base
/// whose disk and root kiln grows from 20 to 25 GB, keeping its bootloader.
pub fn nvidia_seed() -> PathBuf {
    seed_image(NVIDIA, &gpu_ready_qcow2(), &["kubernetes", "nvidia-container-toolkit"])
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            collect_files(&p, out);
        } else {
            out.push(p);
        }
    }
}

/// Copy an image keeping it sparse (`cp --sparse=always`).
pub fn copy_sparse(from: &Path, to: &Path) {
    sh("cp", &["--sparse=always", from.to_str().unwrap(), to.to_str().unwrap()]);
}

/// What a build left in its output directory besides its log (NAME.build.log, which
/// every build that got as far as its output directory writes, failed or not).
pub fn leftovers(out: &Path) -> Vec<String> {
    std::fs::read_dir(out)
        .map(|r| {
            r.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| !n.ends_with(".build.log"))
                .collect()
        })
        .unwrap_or_default()
}

/// `kiln build DEF --base BASE --out OUT` with the tests' shared package cache.
pub fn build_cmd(def: &Path, base: &Path, out: &Path) -> Command {
    let mut c = Command::new(kiln());
    c.arg("build")
        .arg(def)
        .arg("--base")
        .arg(base)
        .arg("--out")
        .arg(out)
        .env("KILN_CACHE_DIR", cache().join("kiln-cache"))
        .env("RUST_BACKTRACE", "0");
    c
}
