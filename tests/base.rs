//! Pinned bases: `kiln fetch-base` and `kiln build` without `--base` against a loopback
//! HTTP server started by the test (no external network), and `kiln bootstrap`.
//!
//! The server serves a fixture "cloud image" with a `SHA256SUMS` signed by an OpenPGP
//! key the test generates with gpg; a test project's definition pins the image (its
//! sha256) and that key (file and fingerprint) in `[base]`, with URLs on
//! `cloud-images.invalid` that `--base-mirror` points at the server — the way an
//! air-gapped site uses a mirror. Covered: success and reuse of the cache with the server
//! gone; a bad signature; a valid signature by another key; a sha256 mismatch (in the
//! signed list, and of the downloaded file); a download cut off half way and resumed with
//! a Range request; a server that stops answering (timeouts, retries, a clear error); 404;
//! the real definitions' pinned URLs through a mirror; a full build from a pinned base;
//! and `kiln bootstrap` (the tests' base fixture) turned into an image by `kiln build`.

mod common;
use common::*;
use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const IMAGE: &str = "ubuntu-22.04-server-cloudimg-amd64.img";
const DIR: &str = "releases/jammy/release-20990101";

/// How the server treats the image file.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Mode {
    Normal,
    /// The first full GET sends half the image and then drops the connection.
    CutFirst,
    /// Every request for the image hangs without an answer.
    Hang,
}

/// A request the server saw: path and Range header.
#[derive(Clone, Debug)]
struct Seen {
    path: String,
    range: Option<String>,
}

struct Server {
    url: String,
    server: Arc<tiny_http::Server>,
    seen: Arc<Mutex<Vec<Seen>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// Stop listening: later connections are refused.
    fn stop(mut self) {
        self.server.unblock();
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.server.unblock();
    }
}

/// Serve `files` (path without leading slash → bytes) on 127.0.0.1; Range requests get
/// 206 with the rest of the file.
fn serve(files: HashMap<String, Vec<u8>>, mode: Mode) -> Server {
    let server = Arc::new(tiny_http::Server::http("127.0.0.1:0").unwrap());
    let url = format!("http://{}", server.server_addr().to_ip().unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (srv, log) = (server.clone(), seen.clone());
    let files = Arc::new(files);
    let cut_done = Arc::new(Mutex::new(false));
    let thread = std::thread::spawn(move || {
        for req in srv.incoming_requests() {
            let files = files.clone();
            let log = log.clone();
            let cut_done = cut_done.clone();
            std::thread::spawn(move || {
                let full = req.url().trim_start_matches('/').to_string();
                // A mirror may have a path prefix before releases/.
                let path = full
                    .find("releases/")
                    .map(|i| full[i..].to_string())
                    .unwrap_or_else(|| full.clone());
                let range = req
                    .headers()
                    .iter()
                    .find(|h| h.field.equiv("Range"))
                    .map(|h| h.value.as_str().to_string());
                log.lock().unwrap().push(Seen {
                    path: full,
                    range: range.clone(),
                });
                let Some(data) = files.get(&path) else {
                    let _ = req.respond(tiny_http::Response::empty(404));
                    return;
                };
                let is_image = path.ends_with(IMAGE);
                if is_image && mode == Mode::Hang {
                    std::thread::sleep(Duration::from_secs(120));
                    return;
                }
                let start = range
                    .as_deref()
                    .and_then(|r| r.strip_prefix("bytes="))
                    .and_then(|r| r.trim_end_matches('-').parse::<usize>().ok());
                if let Some(start) = start.filter(|s| *s < data.len()) {
                    let body = data[start..].to_vec();
                    let cr = format!("bytes {start}-{}/{}", data.len() - 1, data.len());
                    let h = tiny_http::Header::from_bytes("Content-Range", cr).unwrap();
                    let len = body.len();
                    let _ = req.respond(tiny_http::Response::new(
                        206.into(),
                        vec![h],
                        std::io::Cursor::new(body),
                        Some(len),
                        None,
                    ));
                    return;
                }
                let cut =
                    is_image && mode == Mode::CutFirst && !std::mem::replace(&mut *cut_done.lock().unwrap(), true);
                if cut {
                    let body = CutOff(data.clone(), 0, data.len() / 2);
                    let _ = req.respond(tiny_http::Response::new(
                        200.into(),
                        vec![],
                        body,
                        Some(data.len()),
                        None,
                    ));
                } else {
                    let _ = req.respond(tiny_http::Response::from_data(data.clone()));
                }
            });
        }
    });
    Server {
        url,
        server,
        seen,
        thread: Some(thread),
    }
}

/// A body that stops after `.2` bytes: the client sees the server stop sending half way.
struct CutOff(Vec<u8>, usize, usize);
impl Read for CutOff {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.1 >= self.2 {
            return Err(std::io::Error::other("cut off by the test"));
        }
        let n = buf.len().min(self.2 - self.1).min(64 << 10);
        buf[..n].copy_from_slice(&self.0[self.1..self.1 + n]);
        self.1 += n;
        Ok(n)
    }
}

/// A throwaway gpg home with one key; the agent it starts is stopped on drop.
struct Gpg {
    home: tempfile::TempDir,
    fpr: String,
}

impl Gpg {
    fn new(algo: &str) -> Gpg {
        let home = tempfile::tempdir().unwrap();
        std::fs::set_permissions(home.path(), std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
        let mut g = Gpg {
            home,
            fpr: String::new(),
        };
        g.run(&[
            "--passphrase",
            "",
            "--quick-gen-key",
            "kiln base test <base-test@example.invalid>",
            algo,
            "sign",
            "never",
        ]);
        let list = String::from_utf8(g.run(&["--with-colons", "--list-keys"]).stdout).unwrap();
        g.fpr = list
            .lines()
            .find(|l| l.starts_with("fpr:"))
            .and_then(|l| l.split(':').nth(9))
            .unwrap()
            .to_string();
        g
    }

    fn run(&self, args: &[&str]) -> Output {
        let o = Command::new("gpg")
            .env("GNUPGHOME", self.home.path())
            .args(["--batch", "--yes", "--pinentry-mode", "loopback"])
            .args(args)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "gpg {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        o
    }

    fn public_key(&self) -> Vec<u8> {
        self.run(&["--armor", "--export", &self.fpr]).stdout
    }

    /// A binary detached signature, as Ubuntu's SHA256SUMS.gpg.
    fn sign(&self, data: &[u8]) -> Vec<u8> {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("data");
        std::fs::write(&f, data).unwrap();
        let sig = dir.path().join("data.sig");
        self.run(&[
            "--local-user",
            &self.fpr,
            "--output",
            sig.to_str().unwrap(),
            "--detach-sign",
            f.to_str().unwrap(),
        ]);
        std::fs::read(sig).unwrap()
    }
}

impl Drop for Gpg {
    fn drop(&mut self) {
        let _ = Command::new("gpgconf")
            .env("GNUPGHOME", self.home.path())
            .args(["--kill", "gpg-agent"])
            .status();
    }
}

fn sha256_hex(data: &[u8]) -> String {
    let d = tempfile::tempdir().unwrap();
    let f = d.path().join("x");
    std::fs::write(&f, data).unwrap();
    sh("sha256sum", &[f.to_str().unwrap()])
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// Pseudo-random bytes (incompressible, deterministic).
fn blob(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// A test project whose definition pins `sha256` of the image and trusts `key` (with
/// fingerprint `fpr`); the URLs are on a host that never resolves, so only a mirror works.
fn project_with_base(dir: &Path, sha256: &str, key: &[u8], fpr: &str) -> PathBuf {
    let def = disk_only_def(dir, "pinned", "3G");
    std::fs::create_dir_all(dir.join("keys")).unwrap();
    std::fs::write(dir.join("keys/test-base.asc"), key).unwrap();
    let host = "https://cloud-images.invalid";
    let mut text = std::fs::read_to_string(&def).unwrap();
    text.push_str(&format!(
        "\n[base]\nurl = \"{host}/{DIR}/{IMAGE}\"\nsha256 = \"{sha256}\"\n\
         sha256sums = \"{host}/{DIR}/SHA256SUMS\"\nsignature = \"{host}/{DIR}/SHA256SUMS.gpg\"\n\
         key = \"keys/test-base.asc\"\nfingerprint = \"{fpr}\"\n"
    ));
    std::fs::write(&def, text).unwrap();
    def
}

/// The files of a release directory: the image, SHA256SUMS listing `listed_sha` for it,
/// and `sig` as SHA256SUMS.gpg.
fn release(image: &[u8], sums: &[u8], sig: &[u8]) -> HashMap<String, Vec<u8>> {
    HashMap::from([
        (format!("{DIR}/{IMAGE}"), image.to_vec()),
        (format!("{DIR}/SHA256SUMS"), sums.to_vec()),
        (format!("{DIR}/SHA256SUMS.gpg"), sig.to_vec()),
    ])
}

fn sums_for(sha: &str) -> Vec<u8> {
    format!("{} *other-file.img\n{sha} *{IMAGE}\n", "0".repeat(64)).into_bytes()
}

fn fetch(def: &Path, cache: &Path, mirror: &str, env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(kiln());
    c.args([
        "fetch-base",
        def.to_str().unwrap(),
        "--cache-dir",
        cache.to_str().unwrap(),
    ])
    .args(["--base-mirror", mirror])
    .env("RUST_BACKTRACE", "0")
    .env("KILN_HTTP_BACKOFF_MS", "100");
    for (k, v) in env {
        c.env(k, v);
    }
    let o = c.output().unwrap();
    eprintln!(
        "$ kiln fetch-base {} --base-mirror {mirror}\n--- stdout\n{}--- stderr\n{}",
        def.display(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

/// The files in `<cache>/bases`.
fn cache_files(cache: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(cache.join("bases"))
        .map(|r| {
            r.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// A failed fetch: exit 2, the URL, what failed, both ways forward; the verified name
/// is not in the cache, only (at most) the resumable partial file.
fn assert_fails(o: &Output, cache: &Path, sha: &str, url_part: &str, what: &[&str]) {
    let e = stderr(o);
    assert_eq!(o.status.code(), Some(2), "{e}");
    assert!(e.contains(url_part), "error does not name the URL ({url_part}): {e}");
    for w in what {
        assert!(e.contains(w), "error does not say `{w}`: {e}");
    }
    assert!(
        e.contains("--base FILE") && e.contains("kiln bootstrap"),
        "no ways forward: {e}"
    );
    for f in cache_files(cache) {
        assert_eq!(f, format!("{sha}.partial"), "the cache holds {f} after a failure");
    }
}

struct Fixture {
    dir: tempfile::TempDir,
    gpg: Gpg,
    image: Vec<u8>,
    sha: String,
    def: PathBuf,
    cache: PathBuf,
}

fn fixture(tag: &str, image: Vec<u8>) -> Fixture {
    let dir = scratch(tag);
    let gpg = Gpg::new("rsa3072");
    let sha = sha256_hex(&image);
    let def = project_with_base(dir.path(), &sha, &gpg.public_key(), &gpg.fpr);
    let cache = dir.path().join("cache");
    Fixture {
        dir,
        gpg,
        image,
        sha,
        def,
        cache,
    }
}

#[test]
fn fetch_verifies_caches_and_reuses_without_network() {
    let f = fixture("base-ok", blob(3 << 20, 1));
    let sums = sums_for(&f.sha);
    let server = serve(release(&f.image, &sums, &f.gpg.sign(&sums)), Mode::Normal);
    let mirror = format!("{}/some/prefix", server.url);
    let started = Instant::now();
    let o = fetch(&f.def, &f.cache, &mirror, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    eprintln!("fetch of 3 MiB over loopback: {:.2} s", started.elapsed().as_secs_f64());
    let cached = f.cache.join("bases").join(&f.sha);
    assert_eq!(std::fs::read(&cached).unwrap(), f.image);
    assert_eq!(cache_files(&f.cache), vec![f.sha.clone()]);
    // The mirror replaced the host and the prefix up to /releases/.
    let paths: Vec<String> = server.seen().iter().map(|s| s.path.clone()).collect();
    assert!(paths.contains(&format!("some/prefix/{DIR}/{IMAGE}")), "{paths:?}");
    assert!(
        paths.contains(&format!("some/prefix/{DIR}/SHA256SUMS.gpg")),
        "{paths:?}"
    );
    let url = server.url.clone();
    server.stop();
    // The server is gone: the cache is used with no network access at all.
    let o = fetch(&f.def, &f.cache, &url, &[("KILN_HTTP_TIMEOUT_SECS", "1")]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("cached "), "{o:?}");
    // Nor without any mirror (the pinned host does not resolve).
    let o = Command::new(kiln())
        .args([
            "fetch-base",
            f.def.to_str().unwrap(),
            "--cache-dir",
            f.cache.to_str().unwrap(),
        ])
        .env_remove("KILN_BASE_MIRROR")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn bad_signature_is_refused() {
    let f = fixture("base-badsig", blob(1 << 20, 2));
    let sums = sums_for(&f.sha);
    let mut tampered = sums.clone();
    tampered.extend_from_slice(format!("{} *extra.img\n", "1".repeat(64)).as_bytes());
    // The signature is of the list before it was changed.
    let server = serve(release(&f.image, &tampered, &f.gpg.sign(&sums)), Mode::Normal);
    let o = fetch(&f.def, &f.cache, &server.url, &[]);
    assert_fails(
        &o,
        &f.cache,
        &f.sha,
        &format!("{DIR}/SHA256SUMS"),
        &["signature", "changed after signing"],
    );
    assert!(
        !server.seen().iter().any(|s| s.path.ends_with(IMAGE)),
        "the image was downloaded although SHA256SUMS was not trusted"
    );
}

#[test]
fn valid_signature_by_another_key_is_refused() {
    let f = fixture("base-otherkey", blob(1 << 20, 3));
    let other = Gpg::new("ed25519");
    let sums = sums_for(&f.sha);
    let server = serve(release(&f.image, &sums, &other.sign(&sums)), Mode::Normal);
    let o = fetch(&f.def, &f.cache, &server.url, &[]);
    assert_fails(
        &o,
        &f.cache,
        &f.sha,
        &format!("{DIR}/SHA256SUMS"),
        &["signature", &other.fpr, "not by the trusted key"],
    );
    // The key file must be the one the definition names by fingerprint.
    let def2 = f.dir.path().join("images/pinned.toml");
    let text = std::fs::read_to_string(&def2).unwrap().replace(&f.gpg.fpr, &other.fpr);
    std::fs::write(&def2, text).unwrap();
    let o = fetch(&def2, &f.cache, &server.url, &[]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("fingerprint"), "{}", stderr(&o));
}

#[test]
fn sha256_mismatch_is_refused_and_leaves_nothing() {
    // The served file is not the pinned one; the signed list agrees with the definition.
    let f = fixture("base-sha", blob(1 << 20, 4));
    let sums = sums_for(&f.sha);
    let wrong = blob(1 << 20, 5);
    let server = serve(release(&wrong, &sums, &f.gpg.sign(&sums)), Mode::Normal);
    let o = fetch(&f.def, &f.cache, &server.url, &[]);
    assert_fails(
        &o,
        &f.cache,
        &f.sha,
        &format!("{DIR}/{IMAGE}"),
        &["checksum", &sha256_hex(&wrong)],
    );
    assert!(cache_files(&f.cache).is_empty(), "{:?}", cache_files(&f.cache));
    drop(server);
    // The signed list names another sha256 than the definition: refused before downloading.
    let other_sums = sums_for(&sha256_hex(&wrong));
    let server = serve(release(&f.image, &other_sums, &f.gpg.sign(&other_sums)), Mode::Normal);
    let o = fetch(&f.def, &f.cache, &server.url, &[]);
    assert_fails(&o, &f.cache, &f.sha, "SHA256SUMS", &["checksum", "the definition pins"]);
    assert!(!server.seen().iter().any(|s| s.path.ends_with(IMAGE)));
}

#[test]
fn cut_off_download_resumes_with_a_range_request() {
    let f = fixture("base-resume", blob(8 << 20, 6));
    let sums = sums_for(&f.sha);
    let files = release(&f.image, &sums, &f.gpg.sign(&sums));
    // No retries: the cut leaves a resumable partial file and a clear error...
    let server = serve(files.clone(), Mode::CutFirst);
    let quick = ("KILN_HTTP_TIMEOUT_SECS", "1");
    let o = fetch(&f.def, &f.cache, &server.url, &[("KILN_HTTP_RETRIES", "0"), quick]);
    assert_fails(&o, &f.cache, &f.sha, &format!("{DIR}/{IMAGE}"), &["resumable"]);
    let part = f.cache.join("bases").join(format!("{}.partial", f.sha));
    let have = std::fs::metadata(&part).unwrap().len();
    assert!(have > 0 && have < f.image.len() as u64, "partial has {have} bytes");
    drop(server);
    // ...which the next run continues where it stopped.
    let server = serve(files.clone(), Mode::Normal);
    let o = fetch(&f.def, &f.cache, &server.url, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let want = format!("bytes={have}-");
    assert!(
        server
            .seen()
            .iter()
            .any(|s| s.path.ends_with(IMAGE) && s.range.as_deref() == Some(&want)),
        "no Range request `{want}`: {:?}",
        server.seen()
    );
    assert_eq!(std::fs::read(f.cache.join("bases").join(&f.sha)).unwrap(), f.image);
    assert_eq!(cache_files(&f.cache), vec![f.sha.clone()]);
    // Within one run: the cut is retried at once with a Range request.
    let cache2 = f.dir.path().join("cache2");
    let server = serve(files, Mode::CutFirst);
    let o = fetch(&f.def, &cache2, &server.url, &[quick]);
    assert!(o.status.success(), "{}", stderr(&o));
    let ranged: Vec<_> = server.seen().into_iter().filter(|s| s.range.is_some()).collect();
    assert_eq!(ranged.len(), 1, "{:?}", server.seen());
    assert_eq!(std::fs::read(cache2.join("bases").join(&f.sha)).unwrap(), f.image);
}

#[test]
fn server_that_stops_answering_times_out_after_retries() {
    let f = fixture("base-hang", blob(1 << 20, 7));
    let sums = sums_for(&f.sha);
    let server = serve(release(&f.image, &sums, &f.gpg.sign(&sums)), Mode::Hang);
    let started = Instant::now();
    let env = [("KILN_HTTP_TIMEOUT_SECS", "1"), ("KILN_HTTP_RETRIES", "2")];
    let o = fetch(&f.def, &f.cache, &server.url, &env);
    let took = started.elapsed();
    assert_fails(
        &o,
        &f.cache,
        &f.sha,
        &format!("{DIR}/{IMAGE}"),
        &["timeout", "after 3 attempts"],
    );
    let tries = server.seen().iter().filter(|s| s.path.ends_with(IMAGE)).count();
    assert_eq!(tries, 3, "{:?}", server.seen());
    assert!(took < Duration::from_secs(30), "took {took:?}");
}

#[test]
fn missing_file_is_a_404_error() {
    let f = fixture("base-404", blob(1 << 20, 8));
    let sums = sums_for(&f.sha);
    let mut files = release(&f.image, &sums, &f.gpg.sign(&sums));
    files.remove(&format!("{DIR}/{IMAGE}"));
    let server = serve(files, Mode::Normal);
    let o = fetch(&f.def, &f.cache, &server.url, &[]);
    assert_fails(&o, &f.cache, &f.sha, &format!("{DIR}/{IMAGE}"), &["HTTP status 404"]);
    // Nothing arrived, so not even a partial file is left.
    assert!(cache_files(&f.cache).is_empty(), "{:?}", cache_files(&f.cache));
    // A 404 is not retried.
    assert_eq!(server.seen().iter().filter(|s| s.path.ends_with(IMAGE)).count(), 1);
}

/// The shipped definitions pin a dated release serial on the cloud-image host; a mirror
/// replaces the host, keeping the path from /releases/ on. (The server has no such file.)
#[test]
fn real_definitions_fetch_their_pinned_serial_through_a_mirror() {
    let d = scratch("base-real");
    let server = serve(HashMap::new(), Mode::Normal);
    for def in [
        "images/ubuntu-2204-gpu-ready-nodriver.toml",
        "images/ubuntu-2204-nvidia-565-firmware1.toml",
    ] {
        let o = fetch(&project().join(def), d.path(), &format!("{}/mirror", server.url), &[]);
        let e = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{e}");
        assert!(e.contains("HTTP status 404") && e.contains("kiln bootstrap"), "{e}");
    }
    let paths: Vec<String> = server.seen().iter().map(|s| s.path.clone()).collect();
    assert_eq!(paths.len(), 2, "{paths:?}");
    for p in &paths {
        assert!(
            p.starts_with("mirror/releases/jammy/release-20") && p.ends_with("/SHA256SUMS"),
            "{p}"
        );
    }
}

/// `kiln build` without --base: the pinned base (a qcow2 cloud disk) is fetched through
/// the mirror, verified and built; a second build uses the cache with the server gone.
#[test]
fn build_without_base_fetches_the_pinned_base() {
    require_root!();
    let d = scratch("base-build");
    let tarball = small_tarball(d.path(), false);
    let qcow = d.path().join("cloud.qcow2");
    sh(
        project().join("tests/fixtures/make-cloud-image.sh").to_str().unwrap(),
        &[tarball.to_str().unwrap(), qcow.to_str().unwrap(), "1G"],
    );
    let image = std::fs::read(&qcow).unwrap();
    let gpg = Gpg::new("rsa3072");
    let sha = sha256_hex(&image);
    let def = project_with_base(d.path(), &sha, &gpg.public_key(), &gpg.fpr);
    let sums = sums_for(&sha);
    let server = serve(release(&image, &sums, &gpg.sign(&sums)), Mode::Normal);
    let cache = d.path().join("cache");
    let build = |out: &str, mirror: &str| {
        let o = Command::new(kiln())
            .args(["build", def.to_str().unwrap(), "--out"])
            .arg(d.path().join(out))
            .arg("--cache-dir")
            .arg(&cache)
            .env("KILN_BASE_MIRROR", mirror)
            .env("KILN_HTTP_TIMEOUT_SECS", "2")
            .env("RUST_BACKTRACE", "0")
            .output()
            .unwrap();
        eprintln!("--- kiln build\n{}", stderr(&o));
        o
    };
    let o = build("out", &server.url);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(d.path().join("out/pinned.raw").is_file());
    assert!(
        std::fs::read_to_string(d.path().join("out/SHA256SUMS"))
            .unwrap()
            .contains("pinned.raw")
    );
    assert!(cache.join("bases").join(&sha).is_file());
    let url = server.url.clone();
    server.stop();
    let o = build("out2", &url);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("using the cached base"), "{}", stderr(&o));
    // --base and --base-mirror together make no sense.
    let o = run_kiln(&[
        "build",
        def.to_str().unwrap(),
        "--base",
        qcow.to_str().unwrap(),
        "--base-mirror",
        &url,
        "--out",
        d.path().join("out3").to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2));
}

/// `kiln bootstrap` makes the tests' Ubuntu 22.04 base (see `base_tarball`): a root
/// that looks like the cloud image's to a build, which `kiln build` turns into an image.
#[test]
fn bootstrap_makes_a_base_that_builds() {
    require_root!();
    let base = base_tarball();
    let list = sh("tar", &["-tf", base.to_str().unwrap()]);
    assert!(
        list.lines().any(|l| l.trim_start_matches("./") == "etc/fstab"),
        "no etc/fstab"
    );
    assert!(
        !list.lines().any(|l| l.contains("etc/ssh/ssh_host_")),
        "the bootstrapped root has SSH host keys"
    );
    let fstab = sh("tar", &["-xOf", base.to_str().unwrap(), "./etc/fstab"]);
    assert!(fstab.starts_with("LABEL=cloudimg-rootfs\t/\text4"), "{fstab}");
    let mid = sh("tar", &["-xOf", base.to_str().unwrap(), "./etc/machine-id"]);
    assert!(mid.is_empty(), "machine-id: {mid}");
    let status = sh("tar", &["-xOf", base.to_str().unwrap(), "./var/lib/dpkg/status"]);
    for pkg in [
        "cloud-init",
        "openssh-server",
        "shim-signed",
        "grub-efi-amd64-signed",
        "linux-image-virtual",
    ] {
        let installed = status.split("\n\n").any(|stanza| {
            stanza.lines().any(|l| l == format!("Package: {pkg}"))
                && stanza.lines().any(|l| l == "Status: install ok installed")
        });
        assert!(installed, "{pkg} is not installed");
    }
    let d = scratch("bootstrap-build");
    let def = disk_only_def(d.path(), "bootstrapped", "4G");
    // No Kubernetes in this image: the payload reads its version from the kernel package
    // (the definition ends in its [payload] table).
    let mut text = std::fs::read_to_string(&def).unwrap();
    text.push_str("kubernetes_package = \"linux-image-virtual\"\n");
    std::fs::write(&def, text).unwrap();
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
    assert!(out.join("bootstrapped.raw").is_file());
}
