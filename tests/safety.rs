//! Safety: faults at every stage boundary leave nothing behind, bad inputs get one clear
//! error with the right exit code, and symlinks in the image never redirect a write onto
//! the host. Runs on small fixtures (a root tarball made by the test), as root.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const STAGES: [&str; 8] = [
    "acquire",
    "disk",
    "unpack",
    "custom",
    "initramfs",
    "scrub",
    "trim",
    "finalize",
];

/// A project with one provisioning stage that has an overlay and a host hook (no apt,
/// so it runs on the small tarball).
fn project_with_stage(dir: &Path, hook: &str) -> PathBuf {
    for sub in ["images", "overlays/ovl/etc/modprobe.d", "hooks/hk"] {
        std::fs::create_dir_all(dir.join(sub)).unwrap();
    }
    std::fs::write(
        dir.join("overlays/ovl/etc/modprobe.d/blacklist-nouveau.conf"),
        "blacklist nouveau\n",
    )
    .unwrap();
    let h = dir.join("hooks/hk/10-hook.host");
    std::fs::write(&h, format!("#!/bin/sh\nset -e\n{hook}\n")).unwrap();
    Command::new("chmod").arg("755").arg(&h).status().unwrap();
    let def = dir.join("images/safe.toml");
    std::fs::write(
        &def,
        "name = \"safe\"\ndescription = \"safety test\"\ndisk_size = \"1G\"\nbootloader = false\n[payload]\nuri = \"https://x/{name}.raw\"\n\
         [[stage]]\nname = \"custom\"\noverlays = [\"ovl\"]\nhooks = [\"hk\"]\n",
    )
    .unwrap();
    def
}

fn no_leaks_eventually(dir: &Path) {
    // Autoclear detaches a loop device once its last user is gone; after SIGKILL that
    // is the namespace teardown, which can take a moment.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let loops = sh("losetup", &["-a"]);
        let mi = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let d = dir.to_string_lossy();
        if !loops.contains(&*d) && !mi.contains(&*d) {
            return;
        }
        if Instant::now() > deadline {
            assert_no_leaks(dir);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn finished_outputs(out: &Path) -> Vec<String> {
    std::fs::read_dir(out)
        .map(|r| {
            r.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| {
                    ["safe.raw", "safe.json", "safe.spdx.json", "SHA256SUMS", "safe.qcow2"].contains(&n.as_str())
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Fail (never skip) when kiln was built without the test-only fault injection.
fn require_fault_injection() {
    let built_with = cfg!(feature = "fault-injection");
    if !built_with {
        panic!("fault injection needs kiln built with `--features fault-injection` (ci/test.sh does that)");
    }
}

/// Every stage boundary × {injected error, SIGTERM, SIGKILL}: nothing mounted or
/// attached afterwards, no finished output, and a rerun in the same place succeeds.
#[test]
fn faults_at_every_stage_boundary_leak_nothing() {
    require_root!();
    require_fault_injection();
    let d = scratch("faults");
    let base = small_tarball(d.path(), false);
    let def = project_with_stage(d.path(), "echo hook ran > /dev/null");
    let mut tried = 0;
    for stage in STAGES {
        for fault in ["error", "sigterm", "sigkill"] {
            let out = d.path().join(format!("out-{stage}-{fault}"));
            let o = build_cmd(&def, &base, &out)
                .env("KILN_FAULT", format!("{stage}:{fault}"))
                .output()
                .unwrap();
            let err = String::from_utf8_lossy(&o.stderr);
            match fault {
                "sigkill" => {
                    use std::os::unix::process::ExitStatusExt;
                    assert_eq!(o.status.signal(), Some(9), "{stage}:{fault}: {err}");
                }
                "sigterm" => {
                    assert_eq!(o.status.code(), Some(1), "{stage}:{fault}: {err}");
                    assert!(err.contains("interrupted"), "{stage}:{fault}: {err}");
                }
                _ => {
                    assert_eq!(o.status.code(), Some(1), "{stage}:{fault}: {err}");
                    assert!(err.contains("injected fault"), "{stage}:{fault}: {err}");
                }
            }
            assert!(!err.contains("panicked"), "{err}");
            no_leaks_eventually(d.path());
            assert!(
                finished_outputs(&out).is_empty(),
                "{stage}:{fault} left {:?}",
                finished_outputs(&out)
            );
            if fault != "sigkill" {
                let left = leftovers(&out);
                assert!(left.is_empty(), "{stage}:{fault} left {left:?}");
            } else if out.exists() {
                // SIGKILL can't clean up files: doctor finds and removes what remains.
                let o = Command::new(kiln())
                    .args(["doctor", out.to_str().unwrap(), "--fix"])
                    .output()
                    .unwrap();
                assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
                let o = Command::new(kiln())
                    .args(["doctor", out.to_str().unwrap()])
                    .output()
                    .unwrap();
                assert!(String::from_utf8_lossy(&o.stdout).contains("nothing left behind"));
            }
            let o = build_cmd(&def, &base, &out).output().unwrap();
            assert!(
                o.status.success(),
                "rerun after {stage}:{fault} failed: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            assert_eq!(finished_outputs(&out).len(), 4, "raw, payload, SBOM, SHA256SUMS");
            no_leaks_eventually(d.path());
            tried += 1;
        }
    }
    eprintln!(
        "fault injection: {} stage boundaries x 3 faults = {tried} runs, 0 leaks",
        STAGES.len()
    );
}

/// SIGTERM and SIGKILL sent from outside while a hook is running.
#[test]
fn external_signals_mid_build_leak_nothing() {
    require_root!();
    let d = scratch("signals");
    let base = small_tarball(d.path(), false);
    let def = project_with_stage(d.path(), "sleep 60");
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGKILL] {
        let out = d.path().join(format!("out-{sig}"));
        let mut child = build_cmd(&def, &base, &out)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // Wait until the hook is running.
        let deadline = Instant::now() + Duration::from_secs(60);
        while !sh("ps", &["-eo", "args"]).contains("10-hook.host") {
            assert!(Instant::now() < deadline, "hook never started");
            std::thread::sleep(Duration::from_millis(100));
        }
        let t0 = Instant::now();
        unsafe { libc::kill(child.id() as i32, sig) };
        let st = child.wait().unwrap();
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "kiln took {:?} to stop",
            t0.elapsed()
        );
        assert!(!st.success());
        no_leaks_eventually(d.path());
        assert!(finished_outputs(&out).is_empty());
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            !sh("ps", &["-eo", "args"]).contains("sleep 60"),
            "the hook outlived kiln"
        );
    }
}

/// A failed build leaves its whole log (every line a failing hook printed, not only the
/// last 20) as NAME.build.log; with --keep-on-error also the partial image and the work
/// directory, which `kiln doctor` lists and `--fix` removes.
#[test]
fn failed_build_leaves_its_log_and_keep_on_error_keeps_the_image() {
    require_root!();
    let d = scratch("keep");
    let base = small_tarball(d.path(), false);
    let def = project_with_stage(d.path(), "for i in $(seq 1 60); do echo hook-line-$i; done; exit 3");
    for keep in [false, true] {
        let out = d.path().join(format!("out-{keep}"));
        let mut c = build_cmd(&def, &base, &out);
        if keep {
            c.arg("--keep-on-error");
        }
        let o = c.output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{err}");
        let log_path = out.join("safe.build.log");
        assert!(
            err.contains(&*log_path.to_string_lossy()),
            "the error names the log: {err}"
        );
        let log = std::fs::read_to_string(&log_path).unwrap();
        for needle in [
            "== stage custom",
            "hook-line-1\n",
            "hook-line-60",
            "error: stage custom",
        ] {
            assert!(log.contains(needle), "{needle:?} not in the build log:\n{log}");
        }
        assert!(!err.contains("hook-line-1\n"), "stderr has only the tail: {err}");
        no_leaks_eventually(d.path());
        let left = leftovers(&out);
        if !keep {
            assert!(left.is_empty(), "left {left:?}");
            continue;
        }
        assert!(left.contains(&"safe.raw.partial".to_string()), "{left:?}");
        assert!(left.contains(&".kiln-work-safe".to_string()), "{left:?}");
        let o = Command::new(kiln())
            .args(["doctor", out.to_str().unwrap()])
            .output()
            .unwrap();
        let report = String::from_utf8_lossy(&o.stdout);
        assert!(
            report.contains("safe.raw.partial") && report.contains(".kiln-work-safe"),
            "{report}"
        );
        let o = Command::new(kiln())
            .args(["doctor", out.to_str().unwrap(), "--fix"])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert!(leftovers(&out).is_empty(), "{:?}", leftovers(&out));
    }
}

/// Bad inputs: one clear error each, exit 2 for input errors and 1 for build failures,
/// no panic, no backtrace.
#[test]
fn bad_inputs_get_clear_errors() {
    require_root!();
    let d = scratch("badinput");
    let base = small_tarball(d.path(), false);
    let good = project_with_stage(d.path(), "true");
    let out = d.path().join("out");
    let write_def = |name: &str, body: &str| -> PathBuf {
        let p = d.path().join(format!("images/{name}.toml"));
        std::fs::write(&p, body).unwrap();
        p
    };
    let head = "name = \"x\"\ndescription = \"d\"\ndisk_size = \"1G\"\nbootloader = false\n[payload]\nuri = \"https://x/{name}.raw\"\n";
    let unknown = write_def("unknown", &format!("{head}colour = \"blue\"\n"));
    let badsize = write_def("badsize", &head.replace("\"1G\"", "\"lots\""));
    let nolist = write_def(
        "nolist",
        &format!("{head}[[stage]]\nname = \"s\"\npackages = [\"missing-list\"]\n"),
    );
    let noovl = write_def(
        "noovl",
        &format!("{head}[[stage]]\nname = \"s\"\noverlays = [\"missing-overlay\"]\n"),
    );
    let nohook = write_def(
        "nohook",
        &format!("{head}[[stage]]\nname = \"s\"\nhooks = [\"missing-hook\"]\n"),
    );
    std::fs::create_dir_all(d.path().join("hooks/failing")).unwrap();
    let fh = d.path().join("hooks/failing/10-fails.host");
    std::fs::write(
        &fh,
        "#!/bin/sh\necho preparing >&2\necho 'could not frobnicate the widget' >&2\nexit 7\n",
    )
    .unwrap();
    Command::new("chmod").arg("755").arg(&fh).status().unwrap();
    let failing = write_def(
        "failing",
        &format!("{head}[[stage]]\nname = \"s\"\nhooks = [\"failing\"]\n"),
    );
    std::fs::create_dir_all(d.path().join("hooks/fill")).unwrap();
    let fill = d.path().join("hooks/fill/10-fill.host");
    std::fs::write(
        &fill,
        "#!/bin/sh\nset -e\ndd if=/dev/zero of=\"$KILN_ROOT/fill\" bs=1M count=2048 2>&1\n",
    )
    .unwrap();
    Command::new("chmod").arg("755").arg(&fill).status().unwrap();
    let full = write_def("full", &format!("{head}[[stage]]\nname = \"s\"\nhooks = [\"fill\"]\n"));

    let s = |p: &Path| p.to_str().unwrap().to_string();
    let (g, b, od) = (s(&good), s(&base), s(&out));
    let cases: Vec<(&str, Vec<String>, i32, Vec<&str>)> = vec![
        (
            "missing base",
            vec![
                g.clone(),
                "--base".into(),
                "/nonexistent.tar".into(),
                "--out".into(),
                od.clone(),
            ],
            2,
            vec!["cannot open base", "/nonexistent.tar"],
        ),
        (
            "missing definition",
            vec![
                "/nonexistent.toml".into(),
                "--base".into(),
                b.clone(),
                "--out".into(),
                od.clone(),
            ],
            2,
            vec!["image definition", "/nonexistent.toml"],
        ),
        (
            "unknown key",
            vec![s(&unknown), "--base".into(), b.clone(), "--out".into(), od.clone()],
            2,
            vec!["unknown.toml", "colour"],
        ),
        (
            "bad size",
            vec![s(&badsize), "--base".into(), b.clone(), "--out".into(), od.clone()],
            2,
            vec!["disk_size", "lots"],
        ),
        (
            "missing package list",
            vec![s(&nolist), "--base".into(), b.clone(), "--out".into(), od.clone()],
            2,
            vec!["missing-list", "not found"],
        ),
        (
            "missing overlay",
            vec![s(&noovl), "--base".into(), b.clone(), "--out".into(), od.clone()],
            2,
            vec!["missing-overlay", "not found"],
        ),
        (
            "missing hook",
            vec![s(&nohook), "--base".into(), b.clone(), "--out".into(), od.clone()],
            2,
            vec!["missing-hook", "not found"],
        ),
        (
            "bad sha256 flag",
            vec![
                g.clone(),
                "--base".into(),
                b.clone(),
                "--out".into(),
                od.clone(),
                "--base-sha256".into(),
                "xyz".into(),
            ],
            2,
            vec!["not a SHA-256"],
        ),
        (
            "unknown flag",
            vec![g.clone(), "--frobnicate".into()],
            2,
            vec!["--frobnicate"],
        ),
        (
            "bad repo override",
            vec![
                g.clone(),
                "--base".into(),
                b.clone(),
                "--out".into(),
                od.clone(),
                "--repo-override".into(),
                "nouri".into(),
            ],
            2,
            vec!["ID=URI"],
        ),
        (
            "override of unknown repo",
            vec![
                g.clone(),
                "--base".into(),
                b.clone(),
                "--out".into(),
                od.clone(),
                "--repo-override".into(),
                "nosuch=file:///tmp".into(),
            ],
            2,
            vec!["nosuch", "no repository"],
        ),
        (
            "failing hook",
            vec![s(&failing), "--base".into(), b.clone(), "--out".into(), od.clone()],
            1,
            vec![
                "failing/10-fails.host",
                "could not frobnicate the widget",
                "exit code 7",
            ],
        ),
        (
            "disk full",
            vec![s(&full), "--base".into(), b.clone(), "--out".into(), od.clone()],
            1,
            vec!["No space left on device", "raise disk_size"],
        ),
    ];
    let mut tried = 0;
    for (what, args, code, words) in &cases {
        let mut full_args = vec!["build".to_string()];
        full_args.extend(args.iter().cloned());
        let o = Command::new(kiln())
            .args(&full_args)
            .env("KILN_CACHE_DIR", cache().join("kiln-cache"))
            .env("RUST_BACKTRACE", "0")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(*code), "{what}: {err}");
        for w in words {
            assert!(err.contains(w), "{what}: expected `{w}` in: {err}");
        }
        assert!(
            !err.contains("panicked") && !err.contains("stack backtrace"),
            "{what}: {err}"
        );
        assert!(finished_outputs(&out).is_empty(), "{what}");
        no_leaks_eventually(d.path());
        tried += 1;
    }
    // Not root.
    let o = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(kiln())
        .args(["build", &g, "--base", &b, "--out", "/tmp/kiln-nonroot-out"])
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("must run as root"), "{err}");
    tried += 1;
    // No loop device available: /dev/loop-control hidden in a private namespace.
    let o = Command::new("unshare")
        .args(["-m", "sh", "-c"])
        .arg(format!(
            "mount --bind /dev/null /dev/loop-control && RUST_BACKTRACE=0 {} build {g} --base {b} --out {od}",
            kiln().display()
        ))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("loop"), "{err}");
    assert!(finished_outputs(&out).is_empty());
    tried += 1;
    eprintln!("bad inputs tried here: {tried}");
}

/// Symlinks in the image (from the base) and in overlays can't redirect kiln's writes
/// or deletes (overlays, scrub, hooks' `kiln root-write`) onto the host.
#[test]
fn symlinks_in_the_image_never_reach_the_host() {
    require_root!();
    let d = scratch("escape");
    let canary_dir = d.path().join("host-canary");
    std::fs::create_dir_all(&canary_dir).unwrap();
    let canary = canary_dir.join("canary.txt");
    std::fs::write(&canary, "host data, do not touch\n").unwrap();
    let c = canary.to_str().unwrap().to_string();
    let cd = canary_dir.to_str().unwrap().to_string();
    // A base whose image has symlinks pointing at the host canary, absolute and relative.
    let mut b = tar::Builder::new(Vec::new());
    let tb = small_tarball(d.path(), false);
    let mut a = tar::Archive::new(std::fs::File::open(&tb).unwrap());
    for e in a.entries().unwrap() {
        let mut e = e.unwrap();
        let mut h = e.header().clone();
        let p = e.path().unwrap().into_owned();
        if p.to_string_lossy().contains("var/log/syslog") || p.to_string_lossy().contains("bash_history") {
            continue;
        }
        b.append_data(&mut h, p, &mut e).unwrap();
    }
    // The symlinks' targets exist inside the image too, so writes through them resolve
    // (inside the image) instead of failing.
    let mut acc = String::from(".");
    for comp in cd.trim_start_matches('/').split('/') {
        acc = format!("{acc}/{comp}");
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h.set_size(0);
        h.set_cksum();
        b.append_data(&mut h, format!("{acc}/"), std::io::empty()).unwrap();
    }
    let mut link = |path: &str, target: &str| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_mode(0o777);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h.set_size(0);
        h.set_link_name(target).unwrap();
        h.set_cksum();
        b.append_data(&mut h, path, std::io::empty()).unwrap();
    };
    link("./etc/modprobe.d", &cd);
    link("./var/log/syslog", &c);
    link("./root/.bash_history", &c);
    link("./etc/hookdir", &format!("../../../../../../..{cd}"));
    let base = d.path().join("escape-base.tar");
    std::fs::write(&base, b.into_inner().unwrap()).unwrap();
    // The overlay writes etc/modprobe.d/blacklist-nouveau.conf; the host hook writes
    // through `kiln root-write` into etc/hookdir/; scrub truncates var/log/syslog and
    // removes root/.bash_history.
    let def = project_with_stage(
        d.path(),
        "echo written-by-hook | \"$KILN\" root-write /etc/hookdir/from-hook.conf\necho via-abs | \"$KILN\" root-write \"/etc/modprobe.d/abs.conf\"",
    );
    // The overlay also carries its own symlink to the host.
    std::os::unix::fs::symlink(&c, d.path().join("overlays/ovl/etc/evil-link")).unwrap();
    let out = d.path().join("out");
    let o = run_kiln(&[
        "build",
        def.to_str().unwrap(),
        "--base",
        base.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success());
    let attempts = 6;
    assert_eq!(std::fs::read_to_string(&canary).unwrap(), "host data, do not touch\n");
    let names: Vec<_> = std::fs::read_dir(&canary_dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(names.len(), 1, "files appeared in the host canary dir: {names:?}");
    // The writes landed inside the image instead (read back with debugfs).
    let raw = out.join("safe.raw");
    let (off, len) = partition(&raw, 1);
    let l = TestLoop::new(&raw, off, len);
    let cat = |p: &str| sh("debugfs", &["-R", &format!("cat {p}"), &l.0]);
    assert_eq!(cat(&format!("{cd}/blacklist-nouveau.conf")), "blacklist nouveau\n");
    assert_eq!(cat(&format!("{cd}/from-hook.conf")), "written-by-hook\n");
    assert_eq!(cat(&format!("{cd}/abs.conf")), "via-abs\n");
    drop(l);
    no_leaks_eventually(d.path());
    eprintln!("escape attempts: {attempts}, successful: 0");
}
