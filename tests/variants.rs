//! The variants of the spec's compatibility matrix (issue #16), built from the two
//! definitions with `--set`, each verified against its own expectations and booted
//! through UEFI:
//!
//! - `driver=550`: Ubuntu 22.04 + NVIDIA 550.163.01 (DKMS), on the GPU-ready seed's
//!   qcow2 like the 565 seed;
//! - `kubernetes=1.29`: the GPU-ready image with the v1.29 channel (stand-in repository
//!   `kubernetes-v1.29`, tests/fixtures/make-standin-repo.sh);
//! - `ubuntu=24.04`: the GPU-ready image built from a noble root (`kiln bootstrap
//!   --suite noble`).
//!
//! - `modules=precompiled`: the NVIDIA image with Canonical's precompiled, signed
//!   modules (linux-modules-nvidia-565-server-5.15.0-191-generic) instead of DKMS, from
//!   the jammy root tarball: the kernel pinned to 5.15.0-191-generic, no compiler.
//!
//! Each variant is built once (tests/common `seed_variant`, cached like the seeds) and
//! shared by its verify and boot tests. Under TCG one UEFI boot takes about 2 minutes.
//! The tests are named so that libtest (which runs them in name order) starts the
//! three boot tests first: with --test-threads=2 two variants build at once.

mod common;
use common::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Instant;

const NVIDIA_550: &[&str] = &["driver=550"];
const K8S_129: &[&str] = &["kubernetes=1.29"];
const NOBLE: &[&str] = &["ubuntu=24.04"];
const PRECOMPILED: &[&str] = &["modules=precompiled"];
/// The kernel Canonical's 565 modules are built for (package-lists/nvidia-565-server-precompiled.list).
const PINNED_KERNEL: &str = "5.15.0-191-generic";
/// The signer Canonical's precompiled modules carry (`modinfo -F signer`).
const CANONICAL_SIGNER: &str = "Canonical Ltd. Kernel Module Signing";

fn timed(what: &str, f: impl FnOnce() -> PathBuf) -> PathBuf {
    let t0 = Instant::now();
    let p = f();
    eprintln!(
        "variant {what}: image ready in {:.1} s ({})",
        t0.elapsed().as_secs_f64(),
        p.display()
    );
    p
}

fn nvidia_550() -> &'static PathBuf {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        let base = gpu_ready_qcow2();
        timed("driver=550", || {
            seed_variant(NVIDIA, NVIDIA_550, &base, &["kubernetes", "nvidia-container-toolkit"])
        })
    })
}

fn k8s_129() -> &'static PathBuf {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        let base = base_tarball();
        timed("kubernetes=1.29", || {
            seed_variant(GPU_READY, K8S_129, &base, &["kubernetes=kubernetes-v1.29"])
        })
    })
}

fn noble() -> &'static PathBuf {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        let base = noble_tarball();
        timed("ubuntu=24.04", || {
            seed_variant(GPU_READY, NOBLE, &base, &["kubernetes"])
        })
    })
}

fn precompiled() -> &'static PathBuf {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        let base = base_tarball();
        timed("modules=precompiled", || {
            seed_variant(NVIDIA, PRECOMPILED, &base, &["kubernetes", "nvidia-container-toolkit"])
        })
    })
}

fn def(name: &str) -> String {
    project()
        .join("images")
        .join(format!("{name}.toml"))
        .to_string_lossy()
        .into_owned()
}

fn with_sets<'a>(mut args: Vec<&'a str>, sets: &'a [&'a str]) -> Vec<&'a str> {
    for s in sets {
        args.extend(["--set", s]);
    }
    args
}

/// `kiln verify IMAGE --def DEF --set ... --json`: the report and whether kiln passed it.
fn verify(image: &Path, def_name: &str, sets: &[&str]) -> (Value, bool) {
    let d = def(def_name);
    let args = with_sets(vec!["verify", image.to_str().unwrap(), "--def", &d, "--json"], sets);
    let o = run_kiln(&args);
    let v: Value = serde_json::from_slice(&o.stdout).expect("verify --json output");
    (v, o.status.success())
}

/// Verify passes against the variant's own expectations; returns (passed, total) and
/// the check named `name`'s `found`.
fn verify_passes(image: &Path, def_name: &str, sets: &[&str], name: &str) -> String {
    let (v, ok) = verify(image, def_name, sets);
    let checks = v["checks"].as_array().unwrap();
    let failed: Vec<&Value> = checks.iter().filter(|c| c["ok"] != true).collect();
    assert!(failed.is_empty() && ok, "failed checks: {failed:#?}");
    assert!(checks.len() >= 20, "too few checks: {v}");
    eprintln!(
        "verify {} --set {sets:?}: {} of {} checks passed",
        image.display(),
        checks.len() - failed.len(),
        checks.len()
    );
    let c = checks
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no check {name:?}"));
    c["found"].as_str().unwrap().to_string()
}

fn inspect(image: &Path) -> Value {
    let o = run_kiln(&["inspect", "--json", image.to_str().unwrap()]);
    assert!(o.status.success());
    serde_json::from_slice(&o.stdout).unwrap()
}

fn payload(image: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(image.with_extension("json")).unwrap()).unwrap()
}

/// `kiln boot-test IMAGE --def DEF --set ... --firmware uefi --once --json`: one UEFI
/// boot, every check of the variant's `[expect]` passing; returns the checks.
fn boots_through_uefi(image: &Path, def_name: &str, sets: &[&str]) -> Vec<Value> {
    let t0 = Instant::now();
    let d = def(def_name);
    let args = with_sets(
        vec![
            "boot-test",
            image.to_str().unwrap(),
            "--def",
            &d,
            "--firmware",
            "uefi",
            "--once",
            "--json",
        ],
        sets,
    );
    let o = run_kiln(&args);
    let v: Value = serde_json::from_slice(&o.stdout).expect("boot-test --json output");
    let boots = v["boots"].as_array().unwrap();
    assert_eq!(boots.len(), 1, "{v}");
    let b = &boots[0];
    assert_eq!(b["firmware"], "uefi");
    assert!(b["error"].is_null(), "{}\n{:#}", b["error"], b["serial_tail"]);
    let checks = b["checks"].as_array().unwrap().clone();
    let failed: Vec<&Value> = checks.iter().filter(|c| c["ok"] != true).collect();
    assert!(failed.is_empty(), "failed checks {failed:#?}");
    assert!(o.status.success() && v["passed"] == true, "{v}");
    eprintln!(
        "boot-test {} --set {sets:?} (UEFI): {} checks passed, {:.1} s",
        image.display(),
        checks.len(),
        t0.elapsed().as_secs_f64()
    );
    checks
}

fn found<'a>(checks: &'a [Value], name: &str) -> &'a str {
    checks
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no check {name:?} in {checks:?}"))["found"]
        .as_str()
        .unwrap()
}

/// 22.04 + NVIDIA 550.163.01: the pool-pinned .1 packages (not the index's transitional
/// .2 that pulls in 570), nvidia.ko 550.163.01 built by DKMS, a name and payload that say
/// 550; the 565 expectations (the default variant) reject it.
#[test]
fn verify_550_variant_against_its_own_expectations() {
    require_root!();
    let img = nvidia_550();
    assert_eq!(
        img.file_name().unwrap(),
        "ubuntu-2204-nvidia-550-firmware1.raw",
        "the name says the variant"
    );
    let facts = inspect(img);
    let pk = facts["packages"].as_object().unwrap();
    assert_eq!(pk["nvidia-driver-550-server"]["version"], "550.163.01-0ubuntu0.22.04.1");
    assert_eq!(pk["nvidia-dkms-550-server"]["held"], true);
    assert!(
        !pk.keys()
            .any(|k| k.contains("565") || k.contains("570") || k.contains("580")),
        "another branch installed: {:?}",
        pk.keys().collect::<Vec<_>>()
    );
    let p = payload(img);
    assert_eq!(p["metadata"]["name"], "ubuntu-2204-nvidia-550-firmware1");
    assert_eq!(p["spec"]["gpu"]["driver"], "550.163.01");
    let driver = verify_passes(img, NVIDIA, NVIDIA_550, "package nvidia-driver-550-server");
    assert!(driver.starts_with("550.163.01-0ubuntu0.22.04.1"), "{driver}");
    // Checked against the default variant (565), the same image fails.
    let (v, ok) = verify(img, NVIDIA, &[]);
    assert!(!ok && v["passed"] == false, "{v}");
}

/// 22.04 + Kubernetes 1.29: kubelet/kubeadm/kubectl 1.29.15-1.1 from the v1.29 channel,
/// held; the repository the image keeps is the v1.29 one.
#[test]
fn verify_k8s_129_variant_against_its_own_expectations() {
    require_root!();
    let img = k8s_129();
    assert_eq!(img.file_name().unwrap(), "ubuntu-2204-gpu-ready-nodriver-k8s1.29.raw");
    let facts = inspect(img);
    for k in ["kubelet", "kubeadm", "kubectl"] {
        assert_eq!(facts["packages"][k]["version"], "1.29.15-1.1", "{k}");
        assert_eq!(facts["packages"][k]["held"], true, "{k} not held");
    }
    let p = payload(img);
    assert_eq!(p["spec"]["softwareVersions"]["kubernetes"], "v1.29.15");
    let repo = verify_passes(img, GPU_READY, K8S_129, "repository kubernetes");
    assert!(repo.contains("https://pkgs.k8s.io/core:/stable:/v1.29/deb/"), "{repo}");
    let (_, ok) = verify(img, GPU_READY, &[]);
    assert!(!ok, "the 1.30 expectations accepted a 1.29 image");
}

/// 24.04 (noble) GPU-ready, from a noble root: os-release, kernel headers for its
/// kernel, containerd/runc from noble, Kubernetes 1.30.
#[test]
fn verify_noble_variant_against_its_own_expectations() {
    require_root!();
    let img = noble();
    assert_eq!(img.file_name().unwrap(), "ubuntu-2404-gpu-ready-nodriver.raw");
    let facts = inspect(img);
    assert_eq!(facts["os_release"]["VERSION_ID"], "24.04", "{}", facts["os_release"]);
    for k in facts["kernels"].as_array().unwrap() {
        let v = k["version"].as_str().unwrap();
        assert!(
            facts["packages"][format!("linux-headers-{v}")].is_object(),
            "no headers for kernel {v}"
        );
    }
    let p = payload(img);
    assert_eq!(p["spec"]["os"]["codename"], "noble");
    let os = verify_passes(img, GPU_READY, NOBLE, "os release");
    assert!(os.contains("noble"), "{os}");
    let (_, ok) = verify(img, GPU_READY, &[]);
    assert!(!ok, "the 22.04 expectations accepted a 24.04 image");
}

#[test]
fn boot_550_variant_through_uefi() {
    require_root!();
    let checks = boots_through_uefi(nvidia_550(), NVIDIA, NVIDIA_550);
    assert_eq!(found(&checks, "nvidia modinfo version"), "550.163.01");
}

#[test]
fn boot_k8s_129_variant_through_uefi() {
    require_root!();
    let checks = boots_through_uefi(k8s_129(), GPU_READY, K8S_129);
    assert!(found(&checks, "kubelet version").contains("1.29.15"));
}

#[test]
fn boot_noble_variant_through_uefi() {
    require_root!();
    let checks = boots_through_uefi(noble(), GPU_READY, NOBLE);
    assert!(
        found(&checks, "kernel").contains("6.8.0"),
        "{}",
        found(&checks, "kernel")
    );
}

/// 22.04 + NVIDIA 565 from Canonical's precompiled, signed modules: the kernel pinned to
/// 5.15.0-191-generic (the only one in the image), no compiler, DKMS or headers, every
/// NVIDIA module signed by Canonical (`modinfo -F signer`) with the pinned kernel's
/// vermagic and version 565.57.01; the build warned that the kernel is not the newest;
/// the DKMS (default) expectations reject the image.
#[test]
fn verify_precompiled_variant_against_its_own_expectations() {
    require_root!();
    let img = precompiled();
    assert_eq!(
        img.file_name().unwrap(),
        "ubuntu-2204-nvidia-565-firmware1-precompiled.raw"
    );
    let facts = inspect(img);
    let kernels: Vec<&str> = facts["kernels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["version"].as_str().unwrap())
        .collect();
    assert_eq!(kernels, [PINNED_KERNEL], "the pinned kernel alone");
    let pk = facts["packages"].as_object().unwrap();
    assert_eq!(
        pk[&format!("linux-modules-nvidia-565-server-{PINNED_KERNEL}")]["version"],
        "5.15.0-191.201+1"
    );
    let compilers: Vec<&String> = pk
        .keys()
        .filter(|n| {
            ["build-essential", "dkms", "gcc", "g++", "cpp", "clang"].contains(&n.as_str())
                || n.starts_with("linux-headers-")
                || n.ends_with("-dkms")
                || ["gcc-1", "g++-1", "cpp-1"]
                    .iter()
                    .any(|p| n.starts_with(p) && !n.ends_with("-base"))
        })
        .collect();
    assert!(compilers.is_empty(), "compiler packages in the image: {compilers:?}");
    assert!(
        !pk.keys().any(|k| k.contains("580")),
        "the 580 branch came in: {:?}",
        pk.keys().collect::<Vec<_>>()
    );
    let p = payload(img);
    assert_eq!(p["metadata"]["name"], "ubuntu-2204-nvidia-565-firmware1-precompiled");
    assert_eq!(p["spec"]["gpu"]["driver"], "565.57.01");
    // The build said the kernel is pinned below the newest (log; --json in the build report).
    let log =
        std::fs::read_to_string(img.with_file_name("ubuntu-2204-nvidia-565-firmware1-precompiled.build.log")).unwrap();
    assert!(
        log.contains(&format!("the image's kernel is pinned to {PINNED_KERNEL}")) && log.contains("not the newest"),
        "no kernel pin warning in the build log"
    );
    // Every NVIDIA module: Canonical's signature, the pinned kernel's vermagic.
    let root = kiln::image::open::RootFs::open(img).unwrap();
    let dir = format!("/usr/lib/modules/{PINNED_KERNEL}/kernel/nvidia-565srv");
    let kos: Vec<String> = root
        .read_dir(&dir)
        .unwrap()
        .into_iter()
        .filter(|n| n.ends_with(".ko"))
        .collect();
    for m in ["nvidia", "nvidia-uvm", "nvidia-modeset", "nvidia-drm"] {
        assert!(kos.contains(&format!("{m}.ko")), "{m}.ko missing from {dir}: {kos:?}");
    }
    let tmp = tempfile::tempdir().unwrap();
    for ko in &kos {
        let bytes = root.read(&format!("{dir}/{ko}")).unwrap();
        let field = |f: &str| kiln::image::verify::modinfo_field(&bytes, f).unwrap_or_default();
        assert!(
            field("vermagic").starts_with(&format!("{PINNED_KERNEL} ")),
            "{ko}: vermagic {}",
            field("vermagic")
        );
        assert_eq!(field("version"), "565.57.01", "{ko} version");
        let f = tmp.path().join(ko);
        std::fs::write(&f, &bytes).unwrap();
        let signer = sh("modinfo", &["-F", "signer", f.to_str().unwrap()]);
        assert_eq!(signer.trim(), CANONICAL_SIGNER, "{ko} signer");
    }
    eprintln!("{} NVIDIA modules signed by {CANONICAL_SIGNER}: {kos:?}", kos.len());
    let pinned = verify_passes(img, NVIDIA, PRECOMPILED, "kernel pinned");
    assert_eq!(pinned, PINNED_KERNEL);
    // The DKMS variant's expectations (nvidia-dkms-565-server, headers) reject it.
    let (_, ok) = verify(img, NVIDIA, &[]);
    assert!(!ok, "the DKMS expectations accepted the precompiled image");
}

#[test]
fn boot_precompiled_variant_through_uefi() {
    require_root!();
    let checks = boots_through_uefi(precompiled(), NVIDIA, PRECOMPILED);
    assert_eq!(found(&checks, "nvidia modinfo version"), "565.57.01");
    assert!(
        found(&checks, "kernel").contains(PINNED_KERNEL),
        "{}",
        found(&checks, "kernel")
    );
}
