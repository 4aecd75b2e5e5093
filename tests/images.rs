//! The two seed images of the spec, built end to end from a real Ubuntu 22.04 base
//! (`kiln bootstrap`, cached) with the real Ubuntu archive — kernel headers,
//! DKMS, the NVIDIA 565.57.01 .4 packages, containerd, runc — and STAND-IN packages only
//! for the two repositories this machine can't reach (Kubernetes, NVIDIA container
//! toolkit; tests/fixtures/make-standin-repo.sh). Each image is built once (cached in
//! $KILN_TEST_CACHE/images, keyed by the kiln binary, the definitions and the base) and
//! shared by the tests that inspect it and the boot tests.

mod common;
use common::*;
use std::path::PathBuf;
use std::sync::OnceLock;

struct Built {
    out: PathBuf,
    raw: PathBuf,
}

fn built(raw: PathBuf) -> Built {
    Built {
        out: raw.parent().unwrap().to_path_buf(),
        raw,
    }
}

/// GPU-ready image from the root tarball (the seed shared with tests/boot.rs).
fn gpu_ready() -> &'static Built {
    static B: OnceLock<Built> = OnceLock::new();
    B.get_or_init(|| built(gpu_ready_seed()))
}

/// NVIDIA image built on the GPU-ready image converted to qcow2: the "cloud disk"
/// input path (qcow2 detected and converted, disk and root grown 20 -> 25 GB).
fn nvidia() -> &'static Built {
    static B: OnceLock<Built> = OnceLock::new();
    B.get_or_init(|| built(nvidia_seed()))
}

fn verify(b: &Built, def: &str) -> kiln::image::verify::VerifyReport {
    let d = project().join("images").join(format!("{def}.toml"));
    let o = run_kiln(&[
        "verify",
        b.raw.to_str().unwrap(),
        "--def",
        d.to_str().unwrap(),
        "--json",
    ]);
    let v: kiln::image::verify::VerifyReport = serde_json::from_slice(&o.stdout).expect("verify --json output");
    let failed: Vec<_> = v.checks.iter().filter(|c| !c.ok).collect();
    assert!(failed.is_empty(), "failed checks: {failed:#?}");
    assert!(o.status.success() && v.passed);
    assert!(v.checks.len() >= 20, "too few checks: {v:?}");
    v
}

fn inspect(b: &Built) -> serde_json::Value {
    let o = run_kiln(&["inspect", "--json", b.raw.to_str().unwrap()]);
    assert!(o.status.success());
    serde_json::from_slice(&o.stdout).unwrap()
}

fn payload(b: &Built, name: &str) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(b.out.join(format!("{name}.json"))).unwrap()).unwrap()
}

fn version_at_least(v: &str, min: &[u64]) -> bool {
    let nums: Vec<u64> = v
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .take(min.len())
        .map(|s| s.parse().unwrap())
        .collect();
    nums.as_slice() >= min
}

fn check_common(b: &Built, name: &str) -> serde_json::Value {
    let facts = inspect(b);
    let pk = &facts["packages"];
    assert_eq!(pk["kubelet"]["version"], "1.30.0-1.1");
    for k in ["kubelet", "kubeadm", "kubectl"] {
        assert_eq!(pk[k]["held"], true, "{k} not held");
    }
    assert!(
        version_at_least(pk["containerd"]["version"].as_str().unwrap(), &[1, 7]),
        "{}",
        pk["containerd"]
    );
    assert!(
        version_at_least(pk["runc"]["version"].as_str().unwrap(), &[1, 1]),
        "{}",
        pk["runc"]
    );
    // Headers for every kernel the image can boot, read from the image.
    for k in facts["kernels"].as_array().unwrap() {
        let v = k["version"].as_str().unwrap();
        assert!(
            pk[format!("linux-headers-{v}")].is_object(),
            "no headers for kernel {v}"
        );
        assert_eq!(k["initrd"], true, "no initramfs for {v}");
    }
    let sums = std::process::Command::new("sha256sum")
        .arg("-c")
        .arg("SHA256SUMS")
        .current_dir(&b.out)
        .status()
        .unwrap();
    assert!(sums.success());
    let p = payload(b, name);
    assert_eq!(p["metadata"]["name"], name);
    assert_eq!(p["spec"]["softwareVersions"]["kubernetes"], "v1.30.0");
    assert_eq!(p["spec"]["os"]["codename"], "jammy");
    facts
}

#[test]
fn gpu_ready_image_matches_the_spec() {
    require_root!();
    let b = gpu_ready();
    let name = "ubuntu-2204-gpu-ready-nodriver";
    assert_eq!(std::fs::metadata(&b.raw).unwrap().len(), 20 << 30);
    let facts = check_common(b, name);
    assert!(
        !facts["packages"]
            .as_object()
            .unwrap()
            .keys()
            .any(|k| k.starts_with("nvidia-")),
        "GPU-ready image has NVIDIA packages"
    );
    let p = payload(b, name);
    assert!(p["spec"].get("gpu").is_none(), "no gpu section for the GPU-ready image");
    let v = verify(b, name);
    for unit in ["containerd.service enabled", "kubelet.service enabled"] {
        assert!(
            v.checks.iter().any(|c| c.name == unit && c.ok),
            "no passing check {unit:?}: {v:?}"
        );
    }
}

#[test]
fn nvidia_image_matches_the_spec() {
    require_root!();
    let b = nvidia();
    let name = "ubuntu-2204-nvidia-565-firmware1";
    assert_eq!(std::fs::metadata(&b.raw).unwrap().len(), 25 << 30);
    let facts = check_common(b, name);
    let pk = facts["packages"].as_object().unwrap();
    assert_eq!(pk["nvidia-driver-565-server"]["version"], "565.57.01-0ubuntu0.22.04.4");
    assert_eq!(pk["nvidia-dkms-565-server"]["held"], true);
    assert!(
        !pk.keys().any(|k| k.contains("580")),
        "580 branch installed: {:?}",
        pk.keys().collect::<Vec<_>>()
    );
    let p = payload(b, name);
    assert_eq!(p["spec"]["gpu"]["driver"], "565.57.01");
    assert_eq!(p["spec"]["gpu"]["vendor"], "NVIDIA");
    verify(b, name);
}

/// A pin that can't be satisfied fails with a clear message (exit 2) and installs
/// nothing in its place: the archive's index only lists the .5 transitional package
/// (which pulls in 580), and a pool pin with the wrong sha256 is refused.
#[test]
fn unsatisfiable_pins_fail_clearly() {
    require_root!();
    let d = scratch("pins");
    for sub in ["images", "package-lists"] {
        std::fs::create_dir_all(d.path().join(sub)).unwrap();
    }
    let pool = "pool/restricted/n/nvidia-graphics-drivers-565-server/nvidia-kernel-common-565-server_565.57.01-0ubuntu0.22.04.4_amd64.deb";
    std::fs::write(
        d.path().join("package-lists/index-pin.list"),
        "nvidia-dkms-565-server=565.57.01-0ubuntu0.22.04.4\n",
    )
    .unwrap();
    std::fs::write(
        d.path().join("package-lists/pool-pin.list"),
        format!(
            "nvidia-kernel-common-565-server=565.57.01-0ubuntu0.22.04.4 pool={pool} sha256={}\n",
            "0".repeat(64)
        ),
    )
    .unwrap();
    for (list, words) in [
        (
            "index-pin",
            &[
                "index-pin.list:1",
                "565.57.01-0ubuntu0.22.04.4",
                "not in the image's repositories",
            ][..],
        ),
        ("pool-pin", &["pool-pin.list:1", "can't be satisfied", pool][..]),
    ] {
        let def = d.path().join(format!("images/{list}.toml"));
        std::fs::write(
            &def,
            format!("name = \"{list}\"\ndescription = \"pin test\"\ndisk_size = \"4G\"\n[payload]\nuri = \"https://x/{{name}}.raw\"\n[[stage]]\nname = \"nvidia-driver\"\npackages = [\"{list}\"]\n"),
        )
        .unwrap();
        let out = d.path().join("out");
        let base = base_tarball();
        let o = run_kiln(&[
            "build",
            def.to_str().unwrap(),
            "--base",
            base.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{err}");
        for w in words {
            assert!(err.contains(w), "expected `{w}` in: {err}");
        }
        assert!(!out.join(format!("{list}.raw")).exists() && !out.join(format!("{list}.raw.partial")).exists());
        assert_no_leaks(d.path());
    }
}

/// A package that doesn't exist (exit 2, named with its list and line) and the network
/// dropping during apt (exit 1, saying so), on the real base.
#[test]
fn apt_failures_are_clear() {
    require_root!();
    let d = scratch("aptfail");
    for sub in ["images", "package-lists"] {
        std::fs::create_dir_all(d.path().join(sub)).unwrap();
    }
    std::fs::write(d.path().join("package-lists/missing.list"), "# a typo\nkubelett\n").unwrap();
    std::fs::write(d.path().join("package-lists/tools.list"), "htop\n").unwrap();
    let def = |name: &str, list: &str| {
        let p = d.path().join(format!("images/{name}.toml"));
        std::fs::write(
            &p,
            format!("name = \"{name}\"\ndescription = \"apt test\"\ndisk_size = \"4G\"\n[payload]\nuri = \"https://x/{{name}}.raw\"\n[[stage]]\nname = \"system-update\"\npackages = [\"{list}\"]\n"),
        )
        .unwrap();
        p
    };
    let base = base_tarball();
    let out = d.path().join("out");
    let missing = def("missing", "missing");
    let o = run_kiln(&[
        "build",
        missing.to_str().unwrap(),
        "--base",
        base.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("missing.list:2") && err.contains("kubelett") && err.contains("not in the image's repositories"),
        "{err}"
    );
    // No network: a private network namespace with only loopback.
    let offline = def("offline", "tools");
    let o = std::process::Command::new("unshare")
        .arg("-n")
        .arg(kiln())
        .args([
            "build",
            offline.to_str().unwrap(),
            "--base",
            base.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ])
        .env("KILN_CACHE_DIR", cache().join("kiln-cache"))
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("apt-get update in the image failed") && err.contains("network"),
        "{err}"
    );
    assert!(leftovers(&out).is_empty(), "{:?}", leftovers(&out));
    let log = std::fs::read_to_string(out.join("offline.build.log")).unwrap();
    assert!(log.contains("apt-get update in the image failed"), "{log}");
    assert_no_leaks(d.path());
}
