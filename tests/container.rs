//! kiln in a container: the image of `ci/Containerfile` (its `runtime-prebuilt` target,
//! with the kiln these tests were built with) run with Podman, `--privileged`, as the
//! README's "In a container" says. No registry is reachable from the test machines, so the
//! base image is the test base root (`kiln bootstrap`, Ubuntu 22.04) imported with
//! `podman import`; the runtime tools are apt-installed into it from the Ubuntu archive.
//! The container image is cached by a hash of the Containerfile, the kiln binary and the
//! base. Debian's Podman 4.3 needs `--runtime runc` (crun refuses this host's hybrid
//! cgroups) and explicit ulimits (its defaults exceed the hard limits).
//!
//! The project is mounted at a different path in the container (/project) than on the
//! host, so loop devices' backing paths as the kernel records them are the container's.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

const ULIMITS: [&str; 4] = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"];

fn podman() -> Command {
    let mut c = Command::new("podman");
    c.args(["--runtime", "runc"]);
    c
}

fn out_text(o: &Output) -> String {
    format!(
        "--- stdout\n{}--- stderr\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn podman_ok(args: &[&str]) -> String {
    let o = podman()
        .args(args)
        .output()
        .expect("running podman (is it installed? .ci/run installs it)");
    assert!(o.status.success(), "podman {args:?} failed:\n{}", out_text(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn image_exists(tag: &str) -> bool {
    podman()
        .args(["image", "exists", tag])
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn hash_files(files: &[&Path]) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for f in files {
        std::fs::read(f).unwrap().hash(&mut h);
    }
    format!("{:016x}", h.finish())
}

/// The container image: `ci/Containerfile --target runtime-prebuilt` FROM the imported
/// test base, with this kiln binary. Built once per Containerfile + binary + base.
fn container_image() -> String {
    let _l = lock("container-image");
    let base = base_tarball();
    let base_tag = format!(
        "localhost/kiln-test-base:{}",
        base.file_stem().unwrap().to_string_lossy().rsplit('-').next().unwrap()
    );
    let containerfile = project().join("ci/Containerfile");
    let tag = format!("localhost/kiln-test:{}", hash_files(&[&containerfile, &kiln(), &base]));
    if image_exists(&tag) {
        return tag;
    }
    let started = Instant::now();
    if !image_exists(&base_tag) {
        podman_ok(&["import", base.to_str().unwrap(), &base_tag]);
        eprintln!("podman import of the base: {:.1} s", started.elapsed().as_secs_f64());
    }
    // A small build context: the Containerfile and the host-built binary only.
    let ctx = scratch("container-ctx");
    std::fs::create_dir_all(ctx.path().join("target/release")).unwrap();
    std::fs::copy(kiln(), ctx.path().join("target/release/kiln")).unwrap();
    let build_started = Instant::now();
    let mut args = vec!["build"];
    args.extend(ULIMITS);
    let base_arg = format!("BASE_IMAGE={base_tag}");
    args.extend([
        "--network",
        "host",
        "-f",
        containerfile.to_str().unwrap(),
        "--target",
        "runtime-prebuilt",
        "--build-arg",
        &base_arg,
        "-t",
        &tag,
        ctx.path().to_str().unwrap(),
    ]);
    podman_ok(&args);
    eprintln!("podman build of {tag}: {:.1} s", build_started.elapsed().as_secs_f64());
    // Older test images go (their base stays: it is keyed by the base).
    for line in podman_ok(&["images", "--format", "{{.Repository}}:{{.Tag}}", "localhost/kiln-test"]).lines() {
        if line.starts_with("localhost/kiln-test:") && line != tag {
            let _ = podman().args(["rmi", "-f", line]).output();
        }
    }
    let size = podman_ok(&["image", "inspect", "--format", "{{.Size}}", &tag]);
    eprintln!(
        "container image {tag}: {} MB",
        size.trim().parse::<u64>().unwrap_or(0) / 1_000_000
    );
    tag
}

/// `podman run --privileged` arguments with the test's kiln cache (the host tests'
/// `kiln-cache`, shared with them) at the container's /var/cache/kiln.
fn privileged_run_args(name: &str) -> Vec<String> {
    let mut a: Vec<String> = ["run", "--privileged", "--network", "host", "--name", name]
        .iter()
        .map(|s| s.to_string())
        .collect();
    a.extend(ULIMITS.iter().map(|s| s.to_string()));
    a.extend([
        "-v".into(),
        format!("{}:/var/cache/kiln", cache().join("kiln-cache").display()),
        "-e".into(),
        "RUST_BACKTRACE=0".into(),
    ]);
    a
}

/// `podman run --privileged` arguments: the test's kiln cache at the container's
/// /var/cache/kiln, `project` at /project, `bases` read-only at /bases.
fn run_args(name: &str, project_dir: &Path, bases: &Path) -> Vec<String> {
    let mut a = privileged_run_args(name);
    a.extend([
        "-v".into(),
        format!("{}:/project", project_dir.display()),
        "-v".into(),
        format!("{}:/bases:ro", bases.display()),
    ]);
    a
}

/// A project with one stage that has an overlay and a host hook (no apt: small and
/// fast), and one with an apt stage installing a real package from the Ubuntu archive.
fn test_project(dir: &Path, hook: &str) {
    for sub in [
        "images",
        "overlays/ovl/etc/modprobe.d",
        "hooks/hk",
        "package-lists",
        "out",
        "planted",
    ] {
        std::fs::create_dir_all(dir.join(sub)).unwrap();
    }
    std::fs::write(
        dir.join("overlays/ovl/etc/modprobe.d/blacklist-nouveau.conf"),
        "blacklist nouveau\n",
    )
    .unwrap();
    let h = dir.join("hooks/hk/10-hook.host");
    std::fs::write(&h, format!("#!/bin/sh\nset -e\n{hook}\n")).unwrap();
    sh("chmod", &["755", h.to_str().unwrap()]);
    std::fs::write(
        dir.join("images/small.toml"),
        "name = \"small\"\ndescription = \"container test\"\ndisk_size = \"1G\"\nbootloader = false\n\
         [payload]\nuri = \"https://x/{name}.raw\"\n[[stage]]\nname = \"custom\"\noverlays = [\"ovl\"]\nhooks = [\"hk\"]\n",
    )
    .unwrap();
    std::fs::write(dir.join("package-lists/tools.list"), "htop\n").unwrap();
    std::fs::write(
        dir.join("images/apt.toml"),
        "name = \"apt\"\ndescription = \"container apt test\"\ndisk_size = \"4G\"\nbootloader = false\n\
         [payload]\nuri = \"https://x/{name}.raw\"\nkubernetes_package = \"linux-image-virtual\"\n[[stage]]\nname = \"tools\"\npackages = [\"tools\"]\n",
    )
    .unwrap();
}

fn root_file(raw: &Path, path: &str) -> String {
    let (offset, _) = partition(raw, 1);
    let fs = format!("{}?offset={offset}", raw.display());
    sh("debugfs", &["-R", &format!("cat {path}"), &fs])
}

/// The outputs of a finished build, checked from the host: SHA256SUMS matches the
/// image, `kiln inspect` reads it, the payload is there.
fn check_outputs(out: &Path, name: &str) -> PathBuf {
    let raw = out.join(format!("{name}.raw"));
    assert!(raw.is_file(), "no {}: {:?}", raw.display(), leftovers(out));
    assert!(out.join(format!("{name}.json")).is_file());
    let sums = std::fs::read_to_string(out.join("SHA256SUMS")).unwrap();
    let digest = sh("sha256sum", &[raw.to_str().unwrap()]);
    let digest = digest.split_whitespace().next().unwrap();
    assert!(sums.contains(digest), "SHA256SUMS {sums} lacks {digest}");
    let o = run_kiln(&["inspect", "--json", raw.to_str().unwrap()]);
    assert!(o.status.success(), "kiln inspect failed");
    raw
}

fn container_loop_nodes(name: &str) -> Vec<String> {
    podman_ok(&["exec", name, "ls", "/dev"])
        .lines()
        .filter(|l| l.strip_prefix("loop").is_some_and(|n| n.parse::<u32>().is_ok()))
        .map(str::to_string)
        .collect()
}

/// Loop devices held on the host for the length of a test (detached on drop).
struct HeldLoops(Vec<String>);
impl Drop for HeldLoops {
    fn drop(&mut self) {
        for d in &self.0 {
            let _ = Command::new("losetup").args(["-d", d]).status();
        }
    }
}

fn remove_container(name: &str) {
    let _ = podman().args(["rm", "-f", "-t", "0", name]).output();
}

/// (a) Builds inside `podman run --privileged`: a small definition (overlay and host
/// hook on a small root tarball) and one with an apt stage installing a real package
/// on the Ubuntu 22.04 base; the outputs checked from the host.
#[test]
fn builds_in_a_privileged_container() {
    require_root!();
    let t0 = Instant::now();
    let image = container_image();
    eprintln!("container image ready: {:.1} s", t0.elapsed().as_secs_f64());
    let d = scratch("container-build");
    test_project(d.path(), "echo in-container | \"$KILN\" root-write /etc/kiln-hook-ran");
    let bases = d.path().join("bases");
    std::fs::create_dir_all(&bases).unwrap();
    small_tarball(&bases, false);
    let base = base_tarball();
    let name = format!("kiln-test-build-{}", std::process::id());
    remove_container(&name);

    let t = Instant::now();
    let mut a = run_args(&name, d.path(), &bases);
    a.extend(
        [
            "--rm",
            &image,
            "build",
            "/project/images/small.toml",
            "--base",
            "/bases/small-root.tar",
            "--out",
            "/project/out",
        ]
        .map(String::from),
    );
    let o = podman().args(&a).output().unwrap();
    assert!(
        o.status.success(),
        "small build in the container failed:\n{}",
        out_text(&o)
    );
    eprintln!("small build in the container: {:.1} s", t.elapsed().as_secs_f64());
    let raw = check_outputs(&d.path().join("out"), "small");
    assert_eq!(root_file(&raw, "/etc/kiln-hook-ran"), "in-container\n");
    assert_eq!(
        root_file(&raw, "/etc/modprobe.d/blacklist-nouveau.conf"),
        "blacklist nouveau\n"
    );
    assert_no_leaks(d.path());

    // The apt stage: the real base, a real package from the archive, the shared cache.
    let base_dir = base.parent().unwrap();
    let t = Instant::now();
    let mut a = run_args(&name, d.path(), base_dir);
    a.extend(
        [
            "--rm",
            &image,
            "build",
            "/project/images/apt.toml",
            "--base",
            &format!("/bases/{}", base.file_name().unwrap().to_string_lossy()),
            "--out",
            "/project/out",
            "--timings",
        ]
        .map(String::from),
    );
    let o = podman().args(&a).output().unwrap();
    assert!(
        o.status.success(),
        "apt build in the container failed:\n{}",
        out_text(&o)
    );
    eprintln!(
        "apt build (htop on Ubuntu 22.04) in the container: {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let raw = check_outputs(&d.path().join("out"), "apt");
    let status = root_file(&raw, "/var/lib/dpkg/status");
    assert!(
        status.contains("Package: htop\nStatus: install ok installed"),
        "htop not installed in the image"
    );
    let o = run_kiln(&[
        "verify",
        raw.to_str().unwrap(),
        "--def",
        d.path().join("images/apt.toml").to_str().unwrap(),
    ]);
    assert!(o.status.success(), "kiln verify failed on the container-built image");
    assert_no_leaks(d.path());
    eprintln!("builds_in_a_privileged_container: {:.1} s", t0.elapsed().as_secs_f64());
}

/// (b) The container starts, then every loop device its /dev has a node for is taken
/// on the host, so the devices the kernel hands kiln are newer than the container's
/// /dev: kiln makes their nodes (mknod from sysfs) and the build succeeds.
#[test]
fn builds_when_the_free_loop_device_has_no_node() {
    require_root!();
    let t0 = Instant::now();
    let image = container_image();
    let d = scratch("container-nonode");
    test_project(d.path(), "echo in-container | \"$KILN\" root-write /etc/kiln-hook-ran");
    let bases = d.path().join("bases");
    std::fs::create_dir_all(&bases).unwrap();
    small_tarball(&bases, false);
    let name = format!("kiln-test-nonode-{}", std::process::id());
    remove_container(&name);
    let mut a = run_args(&name, d.path(), &bases);
    a.extend(["-d", "--entrypoint", "sleep", &image, "infinity"].map(String::from));
    podman_ok(&a.iter().map(String::as_str).collect::<Vec<_>>());
    struct Container(String);
    impl Drop for Container {
        fn drop(&mut self) {
            remove_container(&self.0);
        }
    }
    let _c = Container(name.clone());

    let nodes = container_loop_nodes(&name);
    eprintln!("loop nodes in the container's /dev at start: {nodes:?}");
    // Take every free device the container has a node for (on the host, whose devtmpfs
    // gets the nodes of devices the kernel adds; the container's /dev does not).
    let mut held = HeldLoops(Vec::new());
    let filler = d.path().join("filler.img");
    std::fs::write(&filler, vec![0u8; 1 << 20]).unwrap();
    let next = loop {
        let next = sh("losetup", &["-f"]).trim().to_string();
        let short = next.trim_start_matches("/dev/").to_string();
        if !nodes.contains(&short) {
            break short;
        }
        let o = Command::new("losetup")
            .args([&next, filler.to_str().unwrap()])
            .output()
            .unwrap();
        if o.status.success() {
            held.0.push(next);
        } // else: someone else took it meanwhile; ask again.
        assert!(held.0.len() < 256, "cannot exhaust the container's loop nodes");
    };
    let listing = podman_ok(&["exec", &name, "sh", "-c", "ls -l /dev | grep ' loop' || true"]);
    eprintln!("next free loop device {next}; the container's /dev before the build:\n{listing}");
    assert!(
        !container_loop_nodes(&name).contains(&next),
        "/dev/{next} exists in the container already"
    );

    let t = Instant::now();
    let o = podman()
        .args(["exec", &name, "kiln", "build", "/project/images/small.toml"])
        .args(["--base", "/bases/small-root.tar", "--out", "/project/out"])
        .output()
        .unwrap();
    assert!(o.status.success(), "build without loop nodes failed:\n{}", out_text(&o));
    eprintln!(
        "small build with missing loop nodes: {:.1} s",
        t.elapsed().as_secs_f64()
    );
    // Another build (another test) may have been handed `next` meanwhile: what counts
    // is that every device kiln used had no node in the container's /dev, and kiln made it.
    let log = std::fs::read_to_string(d.path().join("out/small.build.log")).unwrap();
    let made: Vec<String> = log
        .lines()
        .filter_map(|l| l.split("made /dev/").nth(1))
        .filter_map(|r| r.split_whitespace().next())
        .map(str::to_string)
        .collect();
    assert!(
        !made.is_empty(),
        "the build log does not say kiln made a loop node:\n{log}"
    );
    for m in &made {
        assert!(!nodes.contains(m), "{m} was in the container's /dev already");
    }
    eprintln!("kiln made {made:?} in the container's /dev");
    let after = container_loop_nodes(&name);
    assert!(made.iter().all(|m| after.contains(m)), "{after:?}");
    let raw = check_outputs(&d.path().join("out"), "small");
    assert_eq!(root_file(&raw, "/etc/kiln-hook-ran"), "in-container\n");
    drop(held);
    assert_no_leaks(d.path());
    eprintln!(
        "builds_when_the_free_loop_device_has_no_node: {:.1} s",
        t0.elapsed().as_secs_f64()
    );
}

/// (c) A container SIGKILLed mid-build (`podman kill -s KILL`), with, besides kiln's own
/// devices, one left attached without autoclear from inside the container (what a kill
/// between LOOP_SET_FD and LOOP_SET_STATUS leaves) whose backing path is the container's
/// (/project/planted/...; it does not exist on the host): `kiln doctor --fix` on the host
/// releases it, and no loop device or mount of the build is left.
#[test]
fn doctor_on_the_host_cleans_up_after_a_killed_container() {
    require_root!();
    let t0 = Instant::now();
    let image = container_image();
    let d = scratch("container-kill");
    test_project(d.path(), "echo hook-started\nsleep 120");
    let bases = d.path().join("bases");
    std::fs::create_dir_all(&bases).unwrap();
    small_tarball(&bases, false);
    std::fs::write(d.path().join("planted/leftover.raw.partial"), vec![0u8; 1 << 20]).unwrap();
    let name = format!("kiln-test-kill-{}", std::process::id());
    remove_container(&name);
    let mut a = run_args(&name, d.path(), &bases);
    a.extend(
        [
            "-d",
            &image,
            "build",
            "/project/images/small.toml",
            "--base",
            "/bases/small-root.tar",
            "--out",
            "/project/out",
        ]
        .map(String::from),
    );
    podman_ok(&a.iter().map(String::as_str).collect::<Vec<_>>());
    // Mid-build: the hook is running (the image's loop devices are attached and mounted).
    let log = d.path().join("out/small.build.log");
    let deadline = Instant::now() + Duration::from_secs(120);
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("hook hk/10-hook.host")
    {
        assert!(
            Instant::now() < deadline,
            "the build never reached its hook:\n{}",
            podman_ok(&["logs", &name])
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // losetup makes no node either: make it as kiln does, from sysfs.
    let planted = podman_ok(&[
        "exec",
        &name,
        "sh",
        "-c",
        "set -e; d=$(losetup -f); n=${d#/dev/loop}; [ -e \"$d\" ] || mknod \"$d\" b $(tr : ' ' < /sys/block/loop$n/dev); \
         losetup \"$d\" /project/planted/leftover.raw.partial; echo \"$d\"",
    ]);
    let planted = planted.trim().to_string();
    eprintln!("planted {planted} without autoclear from inside the container");
    // While the container's build runs, doctor on the host must not take its session
    // processes for leftovers (their KILN_SESSION path is the container's): it resolves
    // the work directory through the process's root and asks the build's lock.
    let o = Command::new(kiln()).args(["doctor", "--json"]).output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let procs: Vec<_> = v["findings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["kind"] == "process")
        .collect();
    assert!(
        procs.is_empty(),
        "doctor took a running container build's processes for leftovers: {procs:?}"
    );
    let t = Instant::now();
    podman_ok(&["kill", "-s", "KILL", &name]);
    let _ = podman().args(["wait", &name]).output();
    remove_container(&name);
    eprintln!("container killed and removed: {:.1} s", t.elapsed().as_secs_f64());
    // The kernel shows the backing path relative to the (now detached) bind mount the
    // container saw: neither the host's path nor the container's.
    let before = sh("losetup", &["-a"]);
    let planted_line = before
        .lines()
        .find(|l| l.starts_with(&format!("{planted}:")))
        .unwrap_or_else(|| panic!("{planted} is not attached any more:\n{before}"));
    eprintln!("on the host: {planted_line}");
    assert!(planted_line.contains("leftover.raw.partial"), "{planted_line}");

    let o = run_kiln(&["doctor", "--fix", d.path().join("out").to_str().unwrap()]);
    assert!(o.status.success(), "kiln doctor --fix failed");
    let said = String::from_utf8_lossy(&o.stdout);
    assert!(said.contains(&format!("detached {planted}")), "{said}");
    // Nothing of the build or the container left: autoclear takes kiln's own devices once
    // the container's namespaces are gone, doctor the rest.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let loops = sh("losetup", &["-a"]);
        let mi = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let leftover = |s: &str| {
            s.lines().any(|l| {
                l.contains("/project/") || l.contains(&*d.path().to_string_lossy()) || l.contains(".kiln-work-")
            })
        };
        if !leftover(&loops) && !leftover(&mi) {
            break;
        }
        assert!(Instant::now() < deadline, "left behind:\n{loops}\n{mi}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let o = run_kiln(&["doctor", d.path().join("out").to_str().unwrap()]);
    assert!(o.status.success(), "kiln doctor still finds something");
    assert!(
        leftovers(&d.path().join("out")).is_empty(),
        "{:?}",
        leftovers(&d.path().join("out"))
    );
    eprintln!(
        "doctor_on_the_host_cleans_up_after_a_killed_container: {:.1} s",
        t0.elapsed().as_secs_f64()
    );
}

/// (d) The real GPU-ready build end to end inside `podman run --privileged`:
/// `images/ubuntu-2204-gpu-ready-nodriver.toml` on the Ubuntu 22.04 test base with the
/// stand-in Kubernetes repository, the project, the stand-ins, the base and the output
/// directory bind-mounted at their host paths (so the definition's and `--repo-override`'s
/// paths are the same inside), the package cache shared with the host tests (its .debs
/// reused; kiln waits, bounded, while another build holds it). The output is checked from
/// the host: `sha256sum -c SHA256SUMS` and every `kiln verify` check. The build's time goes
/// to $KILN_TEST_CACHE/reports/container-build.txt, next to the host build of the same
/// definition (the GPU-ready seed of tests/images.rs) when its log is in the cache.
#[test]
fn gpu_ready_image_builds_in_a_container() {
    require_root!();
    let t0 = Instant::now();
    let image = container_image();
    let base = base_tarball();
    let standin = standin_repos();
    let def = project().join("images").join(format!("{GPU_READY}.toml"));
    let d = scratch("container-gpu-ready");
    let out = d.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    let name = format!("kiln-test-gpu-ready-{}", std::process::id());
    remove_container(&name);
    eprintln!(
        "container image, base and stand-ins ready: {:.1} s",
        t0.elapsed().as_secs_f64()
    );

    let same = |p: &Path, opts: &str| format!("{0}:{0}{opts}", p.display());
    let mut a = privileged_run_args(&name);
    a.extend([
        "-v".into(),
        same(&project(), ":ro"),
        "-v".into(),
        same(&standin, ":ro"),
        "-v".into(),
        same(&base, ":ro"),
        "-v".into(),
        same(d.path(), ""),
        "--rm".into(),
        image.clone(),
        "build".into(),
        def.to_string_lossy().into_owned(),
        "--base".into(),
        base.to_string_lossy().into_owned(),
        "--out".into(),
        out.to_string_lossy().into_owned(),
        "--timings".into(),
    ]);
    a.extend(standin_overrides(&["kubernetes"]));
    let t = Instant::now();
    let o = podman().args(&a).output().unwrap();
    let wall = t.elapsed().as_secs_f64();
    let log_path = out.join(format!("{GPU_READY}.build.log"));
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    assert!(
        o.status.success(),
        "the GPU-ready build in the container failed after {wall:.1} s:\n{}",
        out_text(&o)
    );
    eprintln!("GPU-ready build in the container: {wall:.1} s");

    // From the host: the sums, then every check of kiln verify.
    let raw = out.join(format!("{GPU_READY}.raw"));
    assert!(raw.is_file(), "no {}: {:?}", raw.display(), leftovers(&out));
    assert_eq!(std::fs::metadata(&raw).unwrap().len(), 20 << 30);
    let sums = Command::new("sha256sum")
        .args(["-c", "SHA256SUMS"])
        .current_dir(&out)
        .output()
        .unwrap();
    assert!(
        sums.status.success(),
        "sha256sum -c SHA256SUMS failed:\n{}",
        out_text(&sums)
    );
    let checked = String::from_utf8_lossy(&sums.stdout);
    assert!(checked.contains(&format!("{GPU_READY}.raw: OK")), "{checked}");
    let v = verify_passes(&raw, &def, &[]);
    assert!(v.checks.len() >= 20, "too few checks: {v:?}");
    for unit in ["containerd.service enabled", "kubelet.service enabled"] {
        assert!(
            v.checks.iter().any(|c| c.name == unit && c.ok),
            "no passing check {unit:?}"
        );
    }
    assert_no_leaks(d.path());

    // The times: this build, and the host's seed build of the same definition if cached.
    let here = LogTimes::parse(&log);
    let mut report = format!(
        "GPU-ready build ({GPU_READY}, Ubuntu 22.04 test base, stand-in Kubernetes repository, shared package cache)\n\
         container (podman run --privileged --runtime runc): {wall:.1} s from podman run to exit, {:.1} s in the build log\n",
        here.span
    );
    let host = seed_build_log().map(|p| (LogTimes::parse(&std::fs::read_to_string(&p).unwrap_or_default()), p));
    match &host {
        Some((h, p)) => report.push_str(&format!(
            "host (the GPU-ready seed of tests/images.rs, {}, built {}): {:.1} s in the build log\n",
            p.display(),
            h.started,
            h.span
        )),
        None => report.push_str("host: no GPU-ready seed build log in the cache (tests/images.rs builds it)\n"),
    }
    report.push_str(&format!(
        "{:<20} {:>10} {:>10}  {}\n",
        "stage", "container", "host", "downloaded (container)"
    ));
    for (stage, secs, downloaded) in &here.stages {
        let h = host
            .as_ref()
            .and_then(|(h, _)| h.stages.iter().find(|(s, _, _)| s == stage))
            .map_or("-".to_string(), |(_, s, _)| format!("{s:.1} s"));
        report.push_str(&format!(
            "{stage:<20} {:>10} {h:>10}  {downloaded}\n",
            format!("{secs:.1} s")
        ));
    }
    for w in &here.waits {
        report.push_str(&format!("waited (container build): {w}\n"));
    }
    eprint!("{report}");
    let reports = cache().join("reports");
    std::fs::create_dir_all(&reports).unwrap();
    std::fs::write(reports.join("container-build.txt"), &report).unwrap();
    eprintln!(
        "gpu_ready_image_builds_in_a_container: {:.1} s",
        t0.elapsed().as_secs_f64()
    );
}

/// The build log of the newest cached GPU-ready seed build (tests/common's `seed_image`)
/// that finished (its image is there), without building one.
fn seed_build_log() -> Option<PathBuf> {
    let prefix = format!("{GPU_READY}-");
    std::fs::read_dir(cache().join("images"))
        .ok()?
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .map(|e| e.path())
        .filter(|dir| dir.join(format!("{GPU_READY}.raw")).is_file())
        .map(|dir| dir.join(format!("{GPU_READY}.build.log")))
        .filter(|log| log.is_file())
        .max_by_key(|log| log.metadata().and_then(|m| m.modified()).ok())
}

/// What a build log says about time: from its first line to its last, and each stage's
/// "stage NAME done in N s" (the log has no line for the process's start and exit).
struct LogTimes {
    started: String,
    span: f64,
    /// (stage, seconds, what it downloaded)
    stages: Vec<(String, f64, String)>,
    /// Lines where the build waited for the shared package cache.
    waits: Vec<String>,
}

impl LogTimes {
    fn parse(log: &str) -> LogTimes {
        let times: Vec<f64> = log.lines().filter_map(log_time).collect();
        let stages = log
            .lines()
            .filter_map(|l| l.split_once(" INFO stage ")?.1.split_once(" done in "))
            .filter_map(|(stage, rest)| {
                let downloaded = rest.split("downloaded ").nth(1)?.split(',').next()?;
                Some((
                    stage.to_string(),
                    rest.split('s').next()?.parse().ok()?,
                    downloaded.to_string(),
                ))
            })
            .collect();
        LogTimes {
            started: log.split_whitespace().next().unwrap_or("?").to_string(),
            span: match (times.first(), times.last()) {
                (Some(a), Some(b)) => b - a,
                _ => 0.0,
            },
            stages,
            waits: log
                .lines()
                .filter(|l| {
                    (l.contains("package cache") && l.contains("waiting")) || l.contains("a build that is ending")
                })
                .map(str::to_string)
                .collect(),
        }
    }
}

/// Seconds since the epoch of a build log line's timestamp (`2026-11-30T15:03:39.008270Z`).
fn log_time(line: &str) -> Option<f64> {
    let (date, time) = line.split_whitespace().next()?.strip_suffix('Z')?.split_once('T')?;
    let mut ymd = date.split('-').map(|n| n.parse::<i64>().ok());
    let (y, m, d) = (ymd.next()??, ymd.next()??, ymd.next()??);
    let mut hms = time.split(':').map(|n| n.parse::<f64>().ok());
    let (h, mi, s) = (hms.next()??, hms.next()??, hms.next()??);
    // Days from the civil date (H. Hinnant's days_from_civil).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + d - 1;
    let days = era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468;
    Some(days as f64 * 86_400.0 + h * 3600.0 + mi * 60.0 + s)
}

/// The CI workflow and the Kubernetes Job validate offline against their published
/// schemas (check-jsonschema's vendored GitHub workflow schema, kubernetes-validate's
/// bundled Kubernetes schemas), with the tools from the venv `.ci/run` makes.
#[test]
fn ci_manifests_validate_against_their_schemas() {
    let venv = PathBuf::from(
        std::env::var("KILN_CI_VENV").unwrap_or_else(|_| cache().join("venv").to_string_lossy().into_owned()),
    );
    let bin = venv.join("bin");
    assert!(
        bin.join("check-jsonschema").is_file() && bin.join("kubernetes-validate").is_file(),
        "{} lacks check-jsonschema and kubernetes-validate: run .ci/run (it makes the venv)",
        venv.display()
    );
    let t = Instant::now();
    // No network: the schemas must be the bundled ones.
    let run = |prog: &str, args: &[&str]| {
        let o = Command::new("unshare")
            .arg("-n")
            .arg(bin.join(prog))
            .args(args)
            .current_dir(project())
            .output()
            .unwrap();
        assert!(o.status.success(), "{prog} {args:?}:\n{}", out_text(&o));
        eprint!("{}", String::from_utf8_lossy(&o.stdout));
    };
    run(
        "check-jsonschema",
        &[
            "--builtin-schema",
            "vendor.github-workflows",
            "ci/github/build-images.yml",
        ],
    );
    run(
        "kubernetes-validate",
        &[
            "--strict",
            "--kubernetes-version",
            K8S_SCHEMA_VERSION,
            "ci/k8s/build-images.yaml",
        ],
    );
    eprintln!("schema checks: {:.1} s", t.elapsed().as_secs_f64());
    // kiln list --json is what the matrix reads.
    let o = run_kiln(&["list", "--json", project().join("images").to_str().unwrap()]);
    assert!(o.status.success());
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let names: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap())
        .collect();
    assert!(names.contains(&GPU_READY) && names.contains(&NVIDIA), "{names:?}");
    // The Job's ConfigMap lists exactly those definitions, one pod each.
    let job = std::fs::read_to_string(project().join("ci/k8s/build-images.yaml")).unwrap();
    let files: Vec<String> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            let f = PathBuf::from(d["file"].as_str().unwrap());
            format!("images/{}", f.file_name().unwrap().to_string_lossy())
        })
        .collect();
    let listed: Vec<&str> = job
        .split("definitions: |\n")
        .nth(1)
        .unwrap()
        .lines()
        .take_while(|l| l.starts_with("    "))
        .map(str::trim)
        .collect();
    assert_eq!(
        listed, files,
        "ci/k8s/build-images.yaml's ConfigMap is out of date (kiln list --json)"
    );
    assert!(
        job.contains(&format!("completions: {}\n", files.len())),
        "completions != {}",
        files.len()
    );
    assert!(job.contains(&format!("parallelism: {}\n", files.len())));
}

/// The Kubernetes version whose schemas kubernetes-validate checks the Job against
/// (one it bundles).
const K8S_SCHEMA_VERSION: &str = "1.30.0";
