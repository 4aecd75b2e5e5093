//! `kiln publish` against a real S3-compatible server on loopback (moto's, from the
//! venv `.ci/run` makes; checked with boto3 through tests/fixtures/s3tool.py, not with
//! kiln's own client), and `kiln register` against a registration server on loopback.
//!
//! moto keeps objects in memory and concatenates a multipart upload in memory twice on
//! completion, so the images here are a few GB apparent with some hundred MB of data
//! laid out as real extents, not the 20 GiB node images.

mod common;

use serde_json::{Value, json};
use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const BUCKET: &str = "kiln-images";
const NAME: &str = "ubuntu-2204-gpu-ready-nodriver";
const MIB: u64 = 1 << 20;

fn venv() -> PathBuf {
    common::cache().join("venv")
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The test credentials: static keys in the environment, no shared files, no instance
/// metadata.
const AWS_ENV: [(&str, &str); 6] = [
    ("AWS_ACCESS_KEY_ID", "kiln-test"),
    ("AWS_SECRET_ACCESS_KEY", "kiln-test-secret"),
    ("AWS_REGION", "us-east-1"),
    ("AWS_CONFIG_FILE", "/nonexistent/kiln-test-aws-config"),
    ("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/kiln-test-aws-credentials"),
    ("AWS_EC2_METADATA_DISABLED", "true"),
];

/// moto's S3 server on a free loopback port, killed on drop. Its spooled part files go
/// to a scratch directory on disk.
struct Moto {
    child: Child,
    port: u16,
    _tmp: tempfile::TempDir,
}

impl Moto {
    fn start(env: &[(&str, &str)]) -> Moto {
        let bin = venv().join("bin/moto_server");
        assert!(
            bin.exists(),
            "{} is missing: .ci/run installs moto[server] into the venv",
            bin.display()
        );
        let tmp = common::scratch("moto");
        let port = free_port();
        let log = std::fs::File::create(tmp.path().join("moto.log")).unwrap();
        let child = Command::new(&bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .env("TMPDIR", tmp.path())
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let started = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(started.elapsed() < Duration::from_secs(60), "moto_server did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        Moto { child, port, _tmp: tmp }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// tests/fixtures/s3tool.py against this server.
    fn tool(&self, args: &[&str]) -> String {
        let out = Command::new(venv().join("bin/python"))
            .arg(common::project().join("tests/fixtures/s3tool.py"))
            .arg(self.endpoint())
            .args(args)
            .envs(AWS_ENV)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "s3tool {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn bucket(&self) -> &Self {
        self.tool(&["create-bucket", BUCKET]);
        self
    }

    /// (unfinished uploads of `key`, parts they hold).
    fn unfinished(&self, key: &str) -> (u32, u32) {
        let s = self.tool(&["uploads", BUCKET, key]);
        let mut it = s.split_whitespace().map(|n| n.parse().unwrap());
        (it.next().unwrap(), it.next().unwrap())
    }

    fn keys(&self) -> Vec<String> {
        self.tool(&["keys", BUCKET]).lines().map(String::from).collect()
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Deterministic non-zero bytes (xorshift).
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&(x | 0x0101_0101_0101_0101).to_le_bytes());
    }
    v.truncate(len);
    v
}

/// The spec's payload of the GPU-ready image (SPEC.md, "API Registration Schema").
fn spec_payload() -> Value {
    json!({
        "metadata": {
            "name": NAME,
            "description": "Ubuntu 22.04 GPU-ready image without NVIDIA drivers"
        },
        "spec": {
            "uri": format!("https://bucket.s3.amazonaws.com/images/{NAME}.raw"),
            "architecture": "x86_64",
            "virtualization": "virtualized",
            "os": {
                "kernel": "linux",
                "family": "debian",
                "distro": "ubuntu",
                "variant": "server",
                "codename": "jammy",
                "version": "22.04"
            },
            "softwareVersions": { "kubernetes": "v1.30.0" }
        }
    })
}

/// What `kiln build` leaves in `out/`: a sparse NAME.raw of `size` bytes with data at
/// `chunks` (offset, length), NAME.json, SHA256SUMS; plus NAME.lock and NAME.spdx.json.
/// Returns out/NAME.
fn outputs(dir: &Path, size: u64, chunks: &[(u64, u64)]) -> PathBuf {
    let raw = dir.join(format!("{NAME}.raw"));
    let f = std::fs::File::create(&raw).unwrap();
    f.set_len(size).unwrap();
    for (i, &(off, len)) in chunks.iter().enumerate() {
        f.write_all_at(&noise(len as usize, i as u64 + 1), off).unwrap();
    }
    f.sync_all().unwrap();
    let data: u64 = chunks.iter().map(|c| c.1).sum();
    use std::os::unix::fs::MetadataExt;
    let allocated = std::fs::metadata(&raw).unwrap().blocks() * 512;
    assert!(
        allocated < data + 16 * MIB,
        "{} is not sparse: {allocated} bytes allocated",
        raw.display()
    );
    let mut payload = serde_json::to_vec_pretty(&spec_payload()).unwrap();
    payload.push(b'\n');
    std::fs::write(dir.join(format!("{NAME}.json")), payload).unwrap();
    std::fs::write(dir.join(format!("{NAME}.lock")), b"kubelet 1.30.0-1.1\n").unwrap();
    std::fs::write(
        dir.join(format!("{NAME}.spdx.json")),
        b"{\"spdxVersion\": \"SPDX-2.3\"}\n",
    )
    .unwrap();
    write_sums(dir);
    dir.join(NAME)
}

/// SHA256SUMS for NAME.raw (first), NAME.lock and NAME.spdx.json, with digests from
/// sha256sum (not kiln), and a line for another image's file in the same directory.
fn write_sums(dir: &Path) -> String {
    let sum = |f: &str| common::sh("sha256sum", &[dir.join(f).to_str().unwrap()])[..64].to_string();
    let raw = sum(&format!("{NAME}.raw"));
    let mut text = format!("{raw}  {NAME}.raw\n");
    for f in [format!("{NAME}.lock"), format!("{NAME}.spdx.json")] {
        text.push_str(&format!("{}  {f}\n", sum(&f)));
    }
    text.push_str(&format!("{}  other-image.raw\n", "0".repeat(64)));
    std::fs::write(dir.join("SHA256SUMS"), text).unwrap();
    raw
}

fn sha_of_sums(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("SHA256SUMS")).unwrap()[..64].to_string()
}

fn publish(endpoint: &str, out: &Path, extra: &[&str], env: &[(&str, &str)]) -> Output {
    let mut args = vec![
        "publish".to_string(),
        out.to_string_lossy().into(),
        "--to".into(),
        format!("s3://{BUCKET}/images"),
        "--endpoint".into(),
        endpoint.into(),
        "--json".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let o = Command::new(common::kiln())
        .args(&args)
        .envs(AWS_ENV)
        .envs([
            ("KILN_HTTP_TIMEOUT_SECS", "3"),
            ("KILN_HTTP_RETRIES", "1"),
            ("KILN_HTTP_BACKOFF_MS", "100"),
            ("RUST_BACKTRACE", "0"),
        ])
        .envs(env.iter().copied())
        .output()
        .unwrap();
    eprintln!(
        "$ kiln {}\n--- stdout\n{}--- stderr\n{}",
        args.join(" "),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

fn report(o: &Output) -> Value {
    assert!(o.status.success(), "kiln publish failed: {}", common::stderr(o));
    serde_json::from_slice(&o.stdout).unwrap()
}

fn object<'a>(r: &'a Value, key: &str) -> &'a Value {
    r["objects"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["key"] == key)
        .unwrap_or_else(|| panic!("no {key} in {r}"))
}

/// A 2 GiB sparse image with 150 MiB of data in extents that start and end inside parts
/// and cross part boundaries: stored object hashes to the image's sha256, the composite
/// checksum is the store's, the payload's uri is the object's URL, everything else is
/// there; a rerun sends nothing and only rewrites the uri in another form.
#[test]
fn publishes_a_sparse_image_and_its_files() {
    let moto = Moto::start(&[]);
    moto.bucket();
    let dir = common::scratch("publish");
    let size = 2 << 30;
    let out = outputs(
        dir.path(),
        size,
        &[
            (0, MIB),
            (100 * MIB - 3000, 64 * MIB),
            (700 * MIB + 4096, 4096),
            (1024 * MIB + 12_345, 60 * MIB),
            (size - 21 * MIB - 1, 21 * MIB + 1),
        ],
    );
    let sha = sha_of_sums(dir.path());
    let raw_key = format!("images/{NAME}.raw");

    let r = report(&publish(&moto.endpoint(), &out, &[], &[]));
    let raw = object(&r, &raw_key);
    assert_eq!(raw["sha256"], sha.as_str());
    assert_eq!(raw["parts_sent"], 64, "2 GiB in 32 MiB parts");
    assert_eq!(raw["parts_resumed"], 0);
    for f in [
        format!("{NAME}.SHA256SUMS"),
        format!("{NAME}.lock"),
        format!("{NAME}.spdx.json"),
        format!("{NAME}.json"),
    ] {
        object(&r, &format!("images/{f}"));
    }
    // The bytes the store holds are the image.
    assert_eq!(moto.tool(&["sha256", BUCKET, &raw_key]).trim(), sha);
    // The store's composite checksum is S3's, of 32 MiB parts (computed here by boto3's side).
    let head: Value = serde_json::from_str(&moto.tool(&["head", BUCKET, &raw_key])).unwrap();
    let raw_path = dir.path().join(format!("{NAME}.raw"));
    let composite = moto.tool(&["composite", raw_path.to_str().unwrap(), &(32 * MIB).to_string()]);
    let stored = head["ChecksumSHA256"]
        .as_str()
        .unwrap_or_else(|| panic!("no checksum: {head}"));
    assert_eq!(stored.split('-').next(), Some(composite.trim()), "{head}");
    assert_eq!(head["ContentLength"], size);
    assert_eq!(moto.unfinished(&raw_key), (0, 0));

    // The payload (in out/ and in the store) points at the object.
    let uri = format!("{}/{BUCKET}/{raw_key}", moto.endpoint());
    assert_eq!(r["uri"], uri.as_str());
    let local = std::fs::read(dir.path().join(format!("{NAME}.json"))).unwrap();
    let local_json: Value = serde_json::from_slice(&local).unwrap();
    assert_eq!(local_json["spec"]["uri"], uri.as_str());
    let mut expected = spec_payload();
    expected["spec"]["uri"] = json!(uri);
    assert_eq!(local_json, expected, "only the uri changes");
    let stored = Command::new(venv().join("bin/python"))
        .arg(common::project().join("tests/fixtures/s3tool.py"))
        .args([moto.endpoint().as_str(), "get", BUCKET, &format!("images/{NAME}.json")])
        .envs(AWS_ENV)
        .output()
        .unwrap();
    assert_eq!(stored.stdout, local);
    // The image's lines of SHA256SUMS, not the other image's.
    let sums = moto.tool(&["get", BUCKET, &format!("images/{NAME}.SHA256SUMS")]);
    let local_sums = std::fs::read_to_string(dir.path().join("SHA256SUMS")).unwrap();
    assert_eq!(
        sums,
        local_sums.lines().take(3).map(|l| format!("{l}\n")).collect::<String>()
    );

    // Again, with a CDN in front: nothing is sent again, the uri takes the new form.
    let r = report(&publish(
        &moto.endpoint(),
        &out,
        &["--url", "https://cdn.example.com/{key}"],
        &[],
    ));
    let raw = object(&r, &raw_key);
    assert_eq!(raw["already_published"], true);
    assert_eq!(raw["parts_sent"], 0);
    let cdn = format!("https://cdn.example.com/{raw_key}");
    let local_json: Value =
        serde_json::from_slice(&std::fs::read(dir.path().join(format!("{NAME}.json"))).unwrap()).unwrap();
    assert_eq!(local_json["spec"]["uri"], cdn.as_str());
    assert_eq!(moto.keys().len(), 5, "{:?}", moto.keys());
}

/// A loopback TCP proxy to `upstream` that cuts every connection once `limit` bytes
/// have gone upstream, and refuses every connection after that (a store that went away
/// half way through an upload).
fn cutting_proxy(upstream: u16, limit: u64) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let sent = Arc::new(AtomicU64::new(0));
    let cut = Arc::new(AtomicBool::new(false));
    let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { continue };
            if cut.load(Ordering::SeqCst) {
                let _ = client.shutdown(Shutdown::Both);
                continue;
            }
            let server = TcpStream::connect(("127.0.0.1", upstream)).unwrap();
            {
                let mut c = conns.lock().unwrap();
                c.push(client.try_clone().unwrap());
                c.push(server.try_clone().unwrap());
            }
            let (mut c_in, mut s_out) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            let (sent, cut2, conns2) = (sent.clone(), cut.clone(), conns.clone());
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 64 << 10];
                loop {
                    let n = match c_in.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    if sent.fetch_add(n as u64, Ordering::SeqCst) + n as u64 > limit {
                        cut2.store(true, Ordering::SeqCst);
                        for s in conns2.lock().unwrap().iter() {
                            let _ = s.shutdown(Shutdown::Both);
                        }
                        break;
                    }
                    if s_out.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                let _ = s_out.shutdown(Shutdown::Write);
            });
            let (mut s_in, mut c_out) = (server, client);
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut s_in, &mut c_out);
                let _ = c_out.shutdown(Shutdown::Write);
            });
        }
    });
    port
}

/// The connection to the store is cut half way: no object is visible, the store holds
/// some parts; the rerun checks them, keeps the ones that are the image's, sends the
/// rest (fewer than all) and the object is the image. A part that changed in between
/// (its MD5 ETag no longer matches: moto keeps no part checksums) is sent again.
#[test]
fn an_interrupted_upload_resumes() {
    let moto = Moto::start(&[]);
    moto.bucket();
    let dir = common::scratch("publish-resume");
    let out = outputs(
        dir.path(),
        512 * MIB,
        &[(0, 100 * MIB), (150 * MIB + 777, 120 * MIB), (400 * MIB, 80 * MIB)],
    );
    let raw_key = format!("images/{NAME}.raw");
    let tuning = ["--part-size-mib", "8", "--jobs", "2"];

    let proxy = cutting_proxy(moto.port, 200 * MIB);
    let o = publish(&format!("http://127.0.0.1:{proxy}"), &out, &tuning, &[]);
    assert_eq!(o.status.code(), Some(1), "{}", common::stderr(&o));
    let err = common::stderr(&o);
    assert!(err.contains("rerun the same command to resume"), "{err}");
    assert!(!moto.keys().contains(&raw_key), "a partial object is visible");
    let (uploads, stored) = moto.unfinished(&raw_key);
    assert_eq!(uploads, 1);
    assert!(stored > 4 && stored < 64, "{stored} of 64 parts stored before the cut");

    // Part 1 changes (and SHA256SUMS with it): it must not be taken from the store.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.path().join(format!("{NAME}.raw")))
        .unwrap();
    f.write_all_at(b"changed", 10).unwrap();
    drop(f);
    let sha = write_sums(dir.path());

    let r = report(&publish(&moto.endpoint(), &out, &tuning, &[]));
    let raw = object(&r, &raw_key);
    let resumed = raw["parts_resumed"].as_u64().unwrap();
    let sent = raw["parts_sent"].as_u64().unwrap();
    assert_eq!(
        resumed,
        stored as u64 - 1,
        "every stored part but the changed one is kept"
    );
    assert_eq!(sent, 64 - resumed);
    assert!(sent < 64);
    assert_eq!(moto.tool(&["sha256", BUCKET, &raw_key]).trim(), sha);
    assert_eq!(moto.unfinished(&raw_key), (0, 0));
}

/// Rejected credentials, a missing bucket, an endpoint that accepts connections and
/// never answers: each a clear error and exit 1 or 2, and no object appears.
#[test]
fn store_failures_are_clear_and_leave_no_object() {
    let dir = common::scratch("publish-fail");
    let out = outputs(dir.path(), 64 * MIB, &[(MIB, 3 * MIB)]);

    // moto with authentication on and no IAM users: every key is unknown.
    let strict = Moto::start(&[("INITIAL_NO_AUTH_ACTION_COUNT", "0")]);
    let o = publish(&strict.endpoint(), &out, &[], &[]);
    assert_eq!(o.status.code(), Some(2), "{}", common::stderr(&o));
    let err = common::stderr(&o);
    assert!(
        err.contains("rejected the credentials") && err.contains("AWS_ACCESS_KEY_ID"),
        "{err}"
    );

    let moto = Moto::start(&[]);
    let o = publish(&moto.endpoint(), &out, &[], &[]);
    assert_eq!(o.status.code(), Some(2), "{}", common::stderr(&o));
    let err = common::stderr(&o);
    assert!(err.contains(&format!("bucket `{BUCKET}` does not exist")), "{err}");
    moto.bucket();
    assert!(moto.keys().is_empty(), "{:?}", moto.keys());

    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let o = publish(&format!("http://127.0.0.1:{port}"), &out, &[], &[]);
    assert_eq!(o.status.code(), Some(1), "{}", common::stderr(&o));
    let err = common::stderr(&o);
    assert!(err.contains("does not answer"), "{err}");
    drop(silent);

    // Nothing is left in out/ either: the payload is unchanged.
    let local: Value =
        serde_json::from_slice(&std::fs::read(dir.path().join(format!("{NAME}.json"))).unwrap()).unwrap();
    assert_eq!(local, spec_payload());
}

// ---- kiln register -----------------------------------------------------------------

const TOKEN: &str = "kiln-test-token-0123";

/// One request the registration server saw.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    url: String,
    auth: Option<String>,
    body: String,
}

/// Every key path of a JSON value, in order.
fn key_paths(v: &Value, prefix: &str, out: &mut Vec<String>) {
    if let Value::Object(m) = v {
        for (k, child) in m {
            let p = format!("{prefix}{k}");
            out.push(p.clone());
            key_paths(child, &format!("{p}."), out);
        }
    }
}

/// A registration API on loopback: checks the token (401) and the payload's schema
/// (400 with a message), then answers POSTs with `script` (then 201); `GET /images/NAME`
/// returns `registered` (404 without).
fn api_server(script: &[(u16, &str)], registered: Option<Value>) -> (String, Arc<Mutex<Vec<Seen>>>) {
    let server = tiny_http::Server::http("127.0.0.1:0").unwrap();
    let port = server.server_addr().to_ip().unwrap().port();
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let seen2 = seen.clone();
    let mut script: VecDeque<(u16, String)> = script.iter().map(|(s, m)| (*s, m.to_string())).collect();
    let mut want = Vec::new();
    key_paths(&spec_payload(), "", &mut want);
    std::thread::spawn(move || {
        for mut req in server.incoming_requests() {
            let mut body = String::new();
            req.as_reader().read_to_string(&mut body).unwrap();
            let auth = req
                .headers()
                .iter()
                .find(|h| h.field.equiv("Authorization"))
                .map(|h| h.value.to_string());
            seen2.lock().unwrap().push(Seen {
                method: req.method().to_string(),
                url: req.url().to_string(),
                auth: auth.clone(),
                body: body.clone(),
            });
            let (status, msg) = if auth.as_deref() != Some(&format!("Bearer {TOKEN}")) {
                (401, "invalid token".to_string())
            } else if req.method() == &tiny_http::Method::Get {
                match &registered {
                    Some(r) => (200, r.to_string()),
                    None => (404, "no such image".to_string()),
                }
            } else {
                let mut got = Vec::new();
                match serde_json::from_str::<Value>(&body) {
                    Ok(v) => key_paths(&v, "", &mut got),
                    Err(e) => got.push(format!("not JSON: {e}")),
                }
                if got != want {
                    (400, format!("payload does not match the schema: keys {got:?}"))
                } else {
                    script.pop_front().unwrap_or((201, "created".into()))
                }
            };
            let text = if msg.starts_with('{') {
                msg
            } else {
                json!({ "message": msg }).to_string()
            };
            let _ = req.respond(tiny_http::Response::from_string(text).with_status_code(status));
        }
    });
    (format!("http://127.0.0.1:{port}/images"), seen)
}

/// `kiln register PAYLOAD --api API ARGS` with the token in a file unless `token_file` is None.
fn register(payload: &Path, api: &str, args: &[&str], token_file: Option<&Path>) -> Output {
    let mut c = Command::new(common::kiln());
    c.arg("register")
        .arg(payload)
        .args(["--api", api])
        .args(args)
        .env_remove("KILN_API_TOKEN")
        .envs([
            ("KILN_HTTP_RETRIES", "3"),
            ("KILN_HTTP_BACKOFF_MS", "50"),
            ("KILN_HTTP_TIMEOUT_SECS", "5"),
        ]);
    if let Some(t) = token_file {
        c.arg("--token-file").arg(t);
    }
    let o = c.output().unwrap();
    eprintln!(
        "$ kiln register {} --api {api} {args:?}\n--- stdout\n{}--- stderr\n{}",
        payload.display(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

fn payload_files(dir: &Path) -> (PathBuf, PathBuf) {
    let p = dir.join(format!("{NAME}.json"));
    std::fs::write(&p, serde_json::to_vec_pretty(&spec_payload()).unwrap()).unwrap();
    let t = dir.join("token");
    std::fs::write(&t, format!("{TOKEN}\n")).unwrap();
    (p, t)
}

/// 201: the payload arrives as it is, with the token; --dry-run and a payload that is
/// not the spec's shape send nothing; no token is an input error.
#[test]
fn register_posts_the_checked_payload_with_the_token() {
    let d = tempfile::tempdir().unwrap();
    let (payload, token) = payload_files(d.path());
    let (api, seen) = api_server(&[], None);

    let o = register(&payload, &api, &[], Some(&token));
    assert!(o.status.success(), "{}", common::stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("HTTP 201"));
    {
        let s = seen.lock().unwrap();
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].method, "POST");
        assert_eq!(s[0].url, "/images");
        assert_eq!(s[0].auth.as_deref(), Some(format!("Bearer {TOKEN}").as_str()));
        assert_eq!(serde_json::from_str::<Value>(&s[0].body).unwrap(), spec_payload());
    }

    // The token from the environment works too.
    let o = Command::new(common::kiln())
        .arg("register")
        .arg(&payload)
        .args(["--api", &api])
        .env("KILN_API_TOKEN", TOKEN)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", common::stderr(&o));
    assert_eq!(seen.lock().unwrap().len(), 2);

    let o = register(&payload, &api, &["--dry-run"], Some(&token));
    assert!(o.status.success());
    let printed = String::from_utf8_lossy(&o.stdout);
    assert!(printed.starts_with(&format!("POST {api}\n")), "{printed}");
    assert!(
        printed.contains("\"softwareVersions\"") && !printed.contains(TOKEN),
        "{printed}"
    );

    let o = register(&payload, &api, &[], None);
    assert_eq!(o.status.code(), Some(2));
    assert!(common::stderr(&o).contains("KILN_API_TOKEN"), "{}", common::stderr(&o));

    let mut bad = spec_payload();
    bad["spec"]["gpus"] = json!([]);
    bad["spec"]["uri"] = json!("https://bucket.s3.amazonaws.com/images/{name}.raw");
    let badp = d.path().join("bad.json");
    std::fs::write(&badp, bad.to_string()).unwrap();
    let o = register(&badp, &api, &[], Some(&token));
    assert_eq!(o.status.code(), Some(2));
    assert!(common::stderr(&o).contains("gpus"), "{}", common::stderr(&o));
    assert_eq!(seen.lock().unwrap().len(), 2, "nothing sent after the dry run");
}

/// 503 twice then 201: retried to success. 409 with the same content registered:
/// success; with different content: exit 1.
#[test]
fn register_retries_5xx_and_accepts_409_for_the_same_image() {
    let d = tempfile::tempdir().unwrap();
    let (payload, token) = payload_files(d.path());

    let (api, seen) = api_server(&[(503, "busy"), (503, "busy")], None);
    let o = register(&payload, &api, &[], Some(&token));
    assert!(o.status.success(), "{}", common::stderr(&o));
    assert_eq!(seen.lock().unwrap().len(), 3, "two 503s then the 201");

    let (api, seen) = api_server(&[(409, "exists")], Some(spec_payload()));
    let o = register(&payload, &api, &[], Some(&token));
    assert!(o.status.success(), "{}", common::stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("already registered"));
    let s = seen.lock().unwrap().clone();
    assert_eq!(s.len(), 2);
    assert_eq!(
        (s[1].method.as_str(), s[1].url.as_str()),
        ("GET", format!("/images/{NAME}").as_str())
    );

    let mut other = spec_payload();
    other["spec"]["uri"] = json!("https://elsewhere.example/x.raw");
    let (api, _) = api_server(&[(409, "exists")], Some(other));
    let o = register(&payload, &api, &[], Some(&token));
    assert_eq!(o.status.code(), Some(1));
    assert!(
        common::stderr(&o).contains("different content"),
        "{}",
        common::stderr(&o)
    );
}

/// 400 (the server's own schema check, or a rule of its own) and 401: the server's
/// message, exit 1, no retry.
#[test]
fn register_prints_the_servers_message_on_4xx() {
    let d = tempfile::tempdir().unwrap();
    let (payload, token) = payload_files(d.path());
    let (api, seen) = api_server(&[(400, "image names must start with the team prefix")], None);
    let o = register(&payload, &api, &[], Some(&token));
    assert_eq!(o.status.code(), Some(1));
    let err = common::stderr(&o);
    assert!(
        err.contains("HTTP 400") && err.contains("image names must start with the team prefix"),
        "{err}"
    );
    assert_eq!(seen.lock().unwrap().len(), 1, "a 4xx is not retried");

    let wrong = d.path().join("wrong");
    std::fs::write(&wrong, "not-the-token\n").unwrap();
    let o = register(&payload, &api, &[], Some(&wrong));
    assert_eq!(o.status.code(), Some(1));
    assert!(common::stderr(&o).contains("invalid token"), "{}", common::stderr(&o));
}
