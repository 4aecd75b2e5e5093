//! Nothing outlives kiln: kills in the middle of a stage, not at its boundaries.
//!
//! Each test builds on the real Ubuntu 22.04 base with a signed TEST-ONLY repository
//! (tests/fixtures/make-slow-repo.sh) served over HTTP on loopback, waits until the build
//! is at the kill point, sends SIGKILL or SIGTERM to the kiln process, and then measures
//! how long it takes until no process of the build session (found by its KILN_SESSION
//! marker, never by name), no mount (in any mount namespace) and no loop device of the
//! build is left. All must be gone within 10 s; then a build sharing the same package
//! cache must succeed. The measured times go to stderr and to
//! $KILN_TEST_CACHE/reports/kill-times.tsv.
//!
//! Kill points: while apt downloads (the server trickles one package's .deb forever),
//! while dpkg unpacks (a preinst that sleeps), while DKMS compiles (a real DKMS module
//! whose build rebuilds it 500 times, with dkms and the kernel headers from the Ubuntu
//! archive), and while a host hook that ignores SIGTERM and forked a child runs.

mod common;
use common::*;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// The TEST-ONLY repository, built once and cached by the script's content.
fn slow_repo() -> PathBuf {
    let p = cache().join(format!(
        "slow-repo-{}",
        short_hash(&["tests/fixtures/make-slow-repo.sh"])
    ));
    let _l = lock("slow-repo");
    if !p.join("repo/InRelease").exists() {
        let st = Command::new(project().join("tests/fixtures/make-slow-repo.sh"))
            .arg(&p)
            .status()
            .unwrap();
        assert!(st.success(), "make-slow-repo.sh failed");
    }
    p.join("repo")
}

/// An HTTP server on loopback serving `dir`; the .deb of kiln-test-slow-download is
/// trickled (a byte every 2 s, forever). `trickling` turns true once it is being sent.
struct Server {
    url: String,
    trickling: Arc<AtomicBool>,
}

fn serve(dir: PathBuf) -> Server {
    let server = tiny_http::Server::http("127.0.0.1:0").unwrap();
    let url = format!("http://{}/", server.server_addr().to_ip().unwrap());
    let trickling = Arc::new(AtomicBool::new(false));
    let flag = trickling.clone();
    std::thread::spawn(move || {
        for req in server.incoming_requests() {
            let dir = dir.clone();
            let flag = flag.clone();
            std::thread::spawn(move || {
                let name = req.url().trim_start_matches('/').trim_start_matches("./").to_string();
                let path = dir.join(&name);
                if name.contains("..") || !path.is_file() {
                    let _ = req.respond(tiny_http::Response::empty(404));
                    return;
                }
                let data = std::fs::read(&path).unwrap();
                if name.starts_with("kiln-test-slow-download") {
                    flag.store(true, Ordering::SeqCst);
                    let len = data.len();
                    let body = Trickle(data, 0);
                    let _ = req.respond(tiny_http::Response::new(200.into(), vec![], body, Some(len), None));
                } else {
                    let _ = req.respond(tiny_http::Response::from_data(data));
                }
            });
        }
    });
    Server { url, trickling }
}

/// A body that never finishes: one byte every 2 s, and never the last one.
struct Trickle(Vec<u8>, usize);
impl Read for Trickle {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.1 > 0 {
            std::thread::sleep(Duration::from_secs(2));
        }
        if self.1 + 1 >= self.0.len() || buf.is_empty() {
            std::thread::sleep(Duration::from_secs(3600));
            return Ok(0);
        }
        buf[0] = self.0[self.1];
        self.1 += 1;
        Ok(1)
    }
}

/// A project whose one stage installs `package` from the test repository at `url`. The
/// payload's Kubernetes version is read from a package the base has (these test images
/// carry no Kubernetes).
fn test_project(dir: &Path, name: &str, url: &str, key: &Path, package: &str, kernel_headers: bool) -> PathBuf {
    for sub in ["images", "package-lists", "keys"] {
        std::fs::create_dir_all(dir.join(sub)).unwrap();
    }
    std::fs::copy(key, dir.join("keys/test.asc")).unwrap();
    std::fs::write(dir.join(format!("package-lists/{name}.list")), format!("{package}\n")).unwrap();
    let def = dir.join(format!("images/{name}.toml"));
    std::fs::write(
        &def,
        format!(
            "name = \"{name}\"\ndescription = \"kill test\"\ndisk_size = \"4G\"\nbootloader = false\n\
             [payload]\nuri = \"https://x/{{name}}.raw\"\nkubernetes_package = \"linux-image-virtual\"\n\
             [[repository]]\nid = \"kill-test\"\nuri = \"{url}\"\nsuite = \"/\"\nkey = \"keys/test.asc\"\n\
             [[stage]]\nname = \"slow\"\nrepositories = [\"kill-test\"]\npackages = [\"{name}\"]\n\
             kernel_headers = {kernel_headers}\n"
        ),
    )
    .unwrap();
    def
}

/// The kill tests' own package cache: the seed builds of the other test binaries hold
/// the shared one for minutes at a time.
fn kill_cache() -> PathBuf {
    cache().join("kiln-cache-kill")
}

/// A build with the kill tests' own package cache.
fn build(def: &Path, base: &Path, out: &Path) -> Command {
    let mut c = build_cmd(def, base, out);
    c.env("KILN_CACHE_DIR", kill_cache());
    c
}

/// A process of a build session: PID and argv.
type Proc = (u32, Vec<String>);

/// PIDs of processes whose environment carries `KILN_SESSION=<work>`, with argv.
fn session_processes(work: &Path) -> Vec<Proc> {
    let marker = format!("KILN_SESSION={}", work.display());
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(env) = std::fs::read(e.path().join("environ")) else {
            continue;
        };
        if env.split(|b| *b == 0).any(|v| v == marker.as_bytes()) {
            let argv = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            let argv = argv
                .split(|b| *b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned());
            out.push((pid, argv.collect()));
        }
    }
    out
}

/// Mounts under `dir` in any mount namespace on the machine.
fn mounts_under(dir: &Path) -> usize {
    let d = dir.to_string_lossy().into_owned();
    let mut n = 0;
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if !e.file_name().to_string_lossy().chars().all(|c| c.is_ascii_digit()) {
            continue;
        }
        if let Ok(mi) = std::fs::read_to_string(e.path().join("mountinfo")) {
            n += mi
                .lines()
                .filter(|l| l.split(' ').nth(4).is_some_and(|t| t.starts_with(&*d)))
                .count();
        }
    }
    n
}

/// Loop devices whose backing file is under `dir`.
fn loops_under(dir: &Path) -> usize {
    let d = dir.to_string_lossy().into_owned();
    std::fs::read_dir("/sys/block")
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("loop"))
        .filter_map(|e| std::fs::read_to_string(e.path().join("loop/backing_file")).ok())
        .filter(|b| b.starts_with(&*d))
        .count()
}

struct Gone {
    processes: Duration,
    mounts: Duration,
    loops: Duration,
}

/// Signal kiln, then time until the session's processes, mounts and loop devices are
/// gone (each must be within 10 s).
fn kill_and_measure(child: &mut Child, sig: i32, work: &Path, dir: &Path, what: &str) -> Gone {
    let t0 = Instant::now();
    unsafe { libc::kill(child.id() as i32, sig) };
    let (mut p, mut m, mut l) = (None, None, None);
    while p.is_none() || m.is_none() || l.is_none() {
        let now = t0.elapsed();
        if p.is_none() && session_processes(work).is_empty() {
            p = Some(now);
        }
        if m.is_none() && mounts_under(dir) == 0 {
            m = Some(now);
        }
        if l.is_none() && loops_under(dir) == 0 {
            l = Some(now);
        }
        assert!(
            now < Duration::from_secs(10),
            "{what}: 10 s after the signal: processes {:?}, {} mounts, {} loop devices",
            session_processes(work),
            mounts_under(dir),
            loops_under(dir)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let st = child.wait().unwrap();
    assert!(!st.success(), "{what}: kiln succeeded despite the signal");
    Gone {
        processes: p.unwrap(),
        mounts: m.unwrap(),
        loops: l.unwrap(),
    }
}

fn report(what: &str, sig: i32, g: &Gone) {
    let signame = if sig == libc::SIGKILL { "SIGKILL" } else { "SIGTERM" };
    let line = format!(
        "{what}\t{signame}\tprocesses {:.2} s\tmounts {:.2} s\tloop {:.2} s\n",
        g.processes.as_secs_f64(),
        g.mounts.as_secs_f64(),
        g.loops.as_secs_f64()
    );
    eprint!("kill times: {line}");
    let dir = cache().join("reports");
    std::fs::create_dir_all(&dir).unwrap();
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("kill-times.tsv"))
        .unwrap();
    f.write_all(line.as_bytes()).unwrap();
}

/// What a killed build leaves: after SIGTERM nothing but its log; after SIGKILL only the work
/// directory and partial image, which `kiln doctor` reports (no process, mount or loop
/// device among them) and `--fix` removes.
fn assert_outputs_cleaned(out: &Path, sig: i32, what: &str) {
    if sig == libc::SIGTERM {
        let left = leftovers(out);
        assert!(left.is_empty(), "{what}: SIGTERM left {left:?}");
        return;
    }
    let o = Command::new(kiln())
        .args(["doctor", out.to_str().unwrap(), "--json"])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    for f in v["findings"].as_array().unwrap() {
        let kind = f["kind"].as_str().unwrap();
        assert!(kind == "work_dir" || kind == "partial", "{what}: doctor found {f}");
    }
    let o = Command::new(kiln())
        .args(["doctor", out.to_str().unwrap(), "--fix"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let left = leftovers(out);
    assert!(left.is_empty(), "{what}: doctor --fix left {left:?}");
}

/// Start a build and wait (at most `limit`) until `at_point` says it is there.
fn start_until(
    def: &Path,
    base: &Path,
    out: &Path,
    limit: Duration,
    what: &str,
    at_point: &dyn Fn(&[Proc]) -> bool,
) -> Child {
    let log = std::fs::File::create(out.with_extension("log")).unwrap();
    let mut child = build(def, base, out).stdout(Stdio::null()).stderr(log).spawn().unwrap();
    let work = out.join(format!(".kiln-work-{}", def.file_stem().unwrap().to_string_lossy()));
    let t0 = Instant::now();
    loop {
        if at_point(&session_processes(&work)) {
            return child;
        }
        if let Some(st) = child.try_wait().unwrap() {
            panic!(
                "{what}: the build ended ({st}) before the kill point: {}",
                std::fs::read_to_string(out.with_extension("log")).unwrap_or_default()
            );
        }
        assert!(t0.elapsed() < limit, "{what}: kill point not reached in {limit:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One kill point, SIGKILL then SIGTERM, each followed by a build that must succeed.
fn kill_point(tag: &str, package: &str, kernel_headers: bool, at_point: &dyn Fn(&Server, &[Proc]) -> bool) {
    require_root!();
    let d = scratch(tag);
    let repo = slow_repo();
    let srv = serve(repo.clone());
    let base = base_tarball();
    let def = test_project(d.path(), tag, &srv.url, &repo.join("test.asc"), package, kernel_headers);
    let quick = test_project(
        &d.path().join("quick"),
        "quick",
        &srv.url,
        &repo.join("test.asc"),
        "kiln-test-quick",
        false,
    );
    for sig in [libc::SIGKILL, libc::SIGTERM] {
        let out = d.path().join(format!("out-{sig}"));
        let what = format!("{tag} {sig}");
        srv.trickling.store(false, Ordering::SeqCst);
        let mut child = start_until(&def, &base, &out, Duration::from_secs(900), &what, &|procs| {
            at_point(&srv, procs)
        });
        let work = out.join(format!(".kiln-work-{tag}"));
        let gone = kill_and_measure(&mut child, sig, &work, d.path(), &what);
        report(tag, sig, &gone);
        assert_outputs_cleaned(&out, sig, &what);
        // Right after: a build sharing the package cache succeeds.
        let qout = d.path().join(format!("quick-out-{sig}"));
        let o = build(&quick, &base, &qout).output().unwrap();
        assert!(
            o.status.success(),
            "{what}: the build after the kill failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(qout.join("quick.raw").exists());
        std::fs::remove_dir_all(&qout).unwrap();
    }
}

fn argv_is(procs: &[Proc], f: impl Fn(&[String]) -> bool) -> bool {
    procs.iter().any(|(_, a)| f(a))
}

#[test]
fn killed_while_apt_downloads() {
    kill_point("download", "kiln-test-slow-download", false, &|srv, procs| {
        srv.trickling.load(Ordering::SeqCst) && argv_is(procs, |a| a.iter().any(|x| x.ends_with("methods/http")))
    });
}

#[test]
fn killed_while_dpkg_unpacks() {
    kill_point("unpack", "kiln-test-slow-unpack", false, &|_, procs| {
        argv_is(procs, |a| a.len() == 2 && a[0].ends_with("sleep") && a[1] == "3600")
            && argv_is(procs, |a| {
                a.first().is_some_and(|x| x.ends_with("dpkg")) && a.iter().any(|x| x == "--unpack")
            })
    });
}

#[test]
fn killed_while_dkms_compiles() {
    kill_point("dkms", "kiln-test-slow-dkms", true, &|_, procs| {
        argv_is(procs, |a| a.first().is_some_and(|x| x.ends_with("/cc1") || x == "cc1"))
            && argv_is(procs, |a| a.iter().any(|x| x.contains("dkms")))
    });
}

/// A host hook that ignores SIGTERM and forks a child that ignores it too.
#[test]
fn killed_while_a_stubborn_host_hook_runs() {
    require_root!();
    let d = scratch("hookkill");
    let base = small_tarball(d.path(), false);
    for sub in ["images", "hooks/stubborn"] {
        std::fs::create_dir_all(d.path().join(sub)).unwrap();
    }
    let hook = d.path().join("hooks/stubborn/10-stubborn.host");
    std::fs::write(
        &hook,
        "#!/bin/sh\ntrap '' TERM INT\n(trap '' TERM INT; exec sleep 3601) &\nsleep 3602\n",
    )
    .unwrap();
    Command::new("chmod").arg("755").arg(&hook).status().unwrap();
    let def = d.path().join("images/hook.toml");
    std::fs::write(
        &def,
        "name = \"hook\"\ndescription = \"kill test\"\ndisk_size = \"1G\"\nbootloader = false\n\
         [payload]\nuri = \"https://x/{name}.raw\"\n[[stage]]\nname = \"custom\"\nhooks = [\"stubborn\"]\n",
    )
    .unwrap();
    for sig in [libc::SIGKILL, libc::SIGTERM] {
        let out = d.path().join(format!("out-{sig}"));
        let what = format!("hook {sig}");
        let mut child = start_until(&def, &base, &out, Duration::from_secs(120), &what, &|procs| {
            argv_is(procs, |a| a.iter().any(|x| x == "3601")) && argv_is(procs, |a| a.iter().any(|x| x == "3602"))
        });
        let work = out.join(".kiln-work-hook");
        let gone = kill_and_measure(&mut child, sig, &work, d.path(), &what);
        report("host-hook", sig, &gone);
        assert_outputs_cleaned(&out, sig, &what);
        // The same build right after, without the stubborn hook, succeeds.
        std::fs::write(&hook, "#!/bin/sh\ntrue\n").unwrap();
        let o = build(&def, &base, &out).output().unwrap();
        assert!(
            o.status.success(),
            "{what}: the build after the kill failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        std::fs::write(
            &hook,
            "#!/bin/sh\ntrap '' TERM INT\n(trap '' TERM INT; exec sleep 3601) &\nsleep 3602\n",
        )
        .unwrap();
        std::fs::remove_dir_all(&out).unwrap();
    }
}
