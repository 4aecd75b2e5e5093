//! Boot tests: the GPU-ready seed image, built from the real Ubuntu 22.04 base tarball
//! (so with kiln's own bootloader), booted through UEFI (OVMF) and BIOS (SeaBIOS) in
//! QEMU with `kiln boot-test`; the NVIDIA image, built on that image as a qcow2 cloud
//! disk that kiln grew, boots through both with the bootloader it came with; and an image whose kernel command line names a root filesystem that
//! does not exist fails with a clear message instead of timing out.
//!
//! Under TCG (KVM does not work on our machines) one boot to cloud-init done and the
//! checks takes about 1.5–3 minutes.

mod common;
use common::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Instant;

const MISSING_UUID: &str = "0badc0de-0000-4000-8000-00000000d00d";

fn gpu_ready() -> &'static PathBuf {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(gpu_ready_seed)
}

/// The NVIDIA seed image, built on the GPU-ready image as a qcow2 cloud disk (grown
/// from 20 to 25 GB): it boots with the bootloader the base disk came with.
fn nvidia() -> &'static PathBuf {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(nvidia_seed)
}

/// The project's definition `images/NAME.toml`: what boot-test checks the guest against.
fn def(name: &str) -> String {
    project()
        .join("images")
        .join(format!("{name}.toml"))
        .to_str()
        .unwrap()
        .to_string()
}

/// `kiln boot-test IMAGE --def images/DEF.toml --firmware both --json`; asserts every
/// check passed, that the checks named in `extra` ran, and prints the wall time per
/// firmware.
fn boot_test_passes(image: &Path, def_name: &str, extra: &[&str]) -> Value {
    let t0 = Instant::now();
    let d = def(def_name);
    let o = run_kiln(&[
        "boot-test",
        image.to_str().unwrap(),
        "--def",
        &d,
        "--firmware",
        "both",
        "--json",
    ]);
    let v: Value = serde_json::from_slice(&o.stdout).expect("boot-test --json output");
    let boots = v["boots"].as_array().unwrap();
    let fws: Vec<&str> = boots.iter().map(|b| b["firmware"].as_str().unwrap()).collect();
    assert_eq!(fws, ["uefi", "bios"]);
    for b in boots {
        let fw = b["firmware"].as_str().unwrap();
        assert!(b["error"].is_null(), "{fw}: {}\n{:#}", b["error"], b["serial_tail"]);
        let failed: Vec<&Value> = b["checks"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["ok"] != true)
            .collect();
        assert!(failed.is_empty(), "{fw}: failed checks {failed:#?}");
        let names: Vec<&str> = b["checks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        for want in [
            "kernel",
            "module nouveau",
            "module overlay",
            "module br_netfilter",
            "sysctl net.ipv4.ip_forward",
            "swap",
            "machine-id",
            "ssh host keys",
            "swap.target masked",
            "containerd.service enabled",
            "kubelet.service enabled",
            "containerd",
            "containerd SystemdCgroup",
            "kubelet version",
            "kubeadm version",
            "kubectl version",
        ]
        .iter()
        .chain(extra)
        {
            assert!(names.contains(want), "{fw}: no {want} check in {names:?}");
        }
        for p in b["phases"].as_array().unwrap() {
            assert_eq!(p["ok"], true, "{fw}: phase {p}");
        }
        eprintln!(
            "boot-test wall time {fw}: {:.1}s (firmware {:.1}s, kernel to cloud-init done {:.1}s, checks {:.1}s)",
            b["wall_s"].as_f64().unwrap(),
            b["phases"][0]["duration_s"].as_f64().unwrap(),
            b["phases"][1]["duration_s"].as_f64().unwrap(),
            b["phases"][2]["duration_s"].as_f64().unwrap()
        );
    }
    let cross: Vec<&Value> = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["ok"] != true)
        .collect();
    assert!(cross.is_empty(), "identity not regenerated per copy: {cross:#?}");
    assert_eq!(v["passed"], true);
    assert!(o.status.success(), "boot-test exited {:?}", o.status.code());
    eprintln!(
        "boot-test of {} took {:.1}s in all",
        image.display(),
        t0.elapsed().as_secs_f64()
    );
    v
}

#[test]
fn gpu_ready_from_tarball_boots_through_uefi_and_bios() {
    require_root!();
    let img = gpu_ready();
    // The MBR carries GRUB's boot code and the partition table is untouched.
    let head = read_range(img, 0, 512);
    assert_ne!(&head[..440], &[0u8; 440][..], "no boot code in the MBR");
    assert_eq!(head[450], 0xEE, "protective MBR entry");
    assert_eq!(&head[510..], &[0x55, 0xAA]);
    boot_test_passes(img, "ubuntu-2204-gpu-ready-nodriver", &[]);
}

/// The NVIDIA image, built from a cloud disk (the GPU-ready image as qcow2) whose disk
/// and root partition kiln grew: the bootloader it came with is kept as it was (MBR boot
/// code, BIOS boot partition) and still boots through both firmwares. The driver module
/// is built for the running kernel, at 565.57.01, with both NVreg options (no GPU, so
/// the module is not loaded).
#[test]
fn nvidia_from_grown_cloud_disk_boots_through_uefi_and_bios() {
    require_root!();
    let img = nvidia();
    assert_eq!(std::fs::metadata(img).unwrap().len(), 25 << 30);
    assert_eq!(
        read_range(img, 0, 440),
        read_range(gpu_ready(), 0, 440),
        "grow changed the MBR boot code"
    );
    let (p14, _) = partition(img, 14);
    assert_eq!(
        read_range(img, p14, 64 << 10),
        read_range(gpu_ready(), p14, 64 << 10),
        "grow changed the BIOS boot partition"
    );
    let v = boot_test_passes(
        img,
        "ubuntu-2204-nvidia-565-firmware1",
        &["nvidia modinfo version", "nvidia vermagic", "modprobe nvidia options"],
    );
    for b in v["boots"].as_array().unwrap() {
        let version = b["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "nvidia modinfo version")
            .unwrap();
        assert_eq!(version["found"], "565.57.01");
    }
}

/// The kernel is told to mount a root filesystem that does not exist: the initramfs
/// gives up (after its 30 s) and boot-test says so, with the serial lines, long before
/// its own time limit.
#[test]
fn missing_root_filesystem_fails_clearly() {
    require_root!();
    let img = gpu_ready();
    let dir = scratch("boot-broken");
    let broken = dir.path().join("broken.raw");
    copy_sparse(img, &broken);
    let (offset, _) = partition(&broken, 1);
    let fs = format!("{}?offset={offset}", broken.display());
    let cfg = sh("debugfs", &["-R", "cat /boot/grub/grub.cfg", &fs]);
    let uuid = cfg
        .split_whitespace()
        .find_map(|w| w.strip_prefix("root=UUID="))
        .expect("grub.cfg boots by root=UUID=")
        .to_string();
    let bad = cfg.replace(&format!("root=UUID={uuid}"), &format!("root=UUID={MISSING_UUID}"));
    assert_ne!(bad, cfg);
    let local = dir.path().join("grub.cfg");
    std::fs::write(&local, &bad).unwrap();
    let cmds = dir.path().join("debugfs.cmds");
    std::fs::write(
        &cmds,
        format!(
            "rm /boot/grub/grub.cfg\nwrite {} /boot/grub/grub.cfg\n",
            local.display()
        ),
    )
    .unwrap();
    sh("debugfs", &["-w", "-f", cmds.to_str().unwrap(), &fs]);
    assert_eq!(sh("debugfs", &["-R", "cat /boot/grub/grub.cfg", &fs]), bad);

    let t0 = Instant::now();
    let o = run_kiln(&[
        "boot-test",
        broken.to_str().unwrap(),
        "--def",
        &def("ubuntu-2204-gpu-ready-nodriver"),
        "--firmware",
        "bios",
        "--timeout-secs",
        "600",
    ]);
    let took = t0.elapsed().as_secs_f64();
    eprintln!("broken image: boot-test failed after {took:.1}s");
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(err.contains("kernel could not mount the root filesystem"), "{err}");
    assert!(err.contains(MISSING_UUID), "the message names the missing root: {err}");
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("last serial lines"), "{out}");
    assert!(out.contains("ALERT!"), "{out}");
    // Failed at once, not after the kernel -> cloud-init time limit (360 s of 600).
    assert!(took < 300.0, "took {took:.0}s");
}

/// `kiln boot-test IMG --def (GPU-ready) --firmware bios --timeout-secs SECS`, its
/// temporary files under `tmp` (to find its QEMU and what it leaves).
fn bios_boot_test(img: &Path, tmp: &Path, secs: u32) -> std::process::Command {
    let mut c = std::process::Command::new(kiln());
    c.args([
        "boot-test",
        img.to_str().unwrap(),
        "--def",
        &def("ubuntu-2204-gpu-ready-nodriver"),
    ])
    .args(["--firmware", "bios", "--timeout-secs", &secs.to_string()])
    .env("TMPDIR", tmp)
    .env("RUST_BACKTRACE", "0");
    c
}

/// A disk without a bootloader (the qcow2 "cloud image" fixture has none) hangs in the
/// firmware: boot-test gives up after the firmware phase's limit, shows the last serial
/// lines, and leaves no QEMU behind.
#[test]
fn hung_firmware_times_out_and_kills_qemu() {
    require_root!();
    let img = cloud_qcow2();
    let tmp = scratch("boot-hung");
    let t0 = Instant::now();
    let o = bios_boot_test(&img, tmp.path(), 60).output().unwrap();
    let took = t0.elapsed().as_secs_f64();
    let (out, err) = (String::from_utf8_lossy(&o.stdout), stderr(&o));
    eprintln!("--- stdout\n{out}--- stderr\n{err}");
    assert_eq!(o.status.code(), Some(1));
    assert!(
        err.contains("timed out after 12 s in phase 'firmware -> kernel start'"),
        "{err}"
    );
    assert!(out.contains("last serial lines"), "{out}");
    assert!(took < 60.0, "took {took:.0}s");
    let ps = sh("ps", &["-eo", "args"]);
    let d = tmp.path().to_string_lossy().to_string();
    assert!(!ps.lines().any(|l| l.contains(&d)), "QEMU left running:\n{ps}");
    assert_eq!(
        std::fs::read_dir(tmp.path()).unwrap().count(),
        0,
        "temporary files left"
    );
}

/// SIGTERM stops a boot test at once: QEMU is killed, its files removed, and kiln says it
/// was interrupted (before, it booted on until the phase's time limit).
#[test]
fn sigterm_stops_a_boot_test_and_its_qemu() {
    require_root!();
    let img = cloud_qcow2();
    let tmp = scratch("boot-sigterm");
    let mut child = bios_boot_test(&img, tmp.path(), 3600)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until QEMU runs, then ask kiln to stop.
    let d = tmp.path().to_string_lossy().to_string();
    let qemu_running = || {
        sh("ps", &["-eo", "args"])
            .lines()
            .any(|l| l.contains("qemu-system") && l.contains(&d))
    };
    let t0 = Instant::now();
    while !qemu_running() {
        assert!(t0.elapsed().as_secs() < 120, "QEMU never started");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    // Not a timing check: without the fix it would run for an hour.
    let t1 = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if t1.elapsed().as_secs() > 300 {
            let _ = child.kill();
            panic!("kiln boot-test ignored SIGTERM");
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    eprintln!("--- stderr\n{err}");
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("interrupted by a signal"), "{err}");
    assert!(!qemu_running(), "QEMU left running");
    assert_eq!(
        std::fs::read_dir(tmp.path()).unwrap().count(),
        0,
        "temporary files left"
    );
}

fn read_range(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path).unwrap();
    let mut b = vec![0u8; len];
    f.read_exact_at(&mut b, offset).unwrap();
    b
}
