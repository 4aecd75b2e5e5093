//! Module signing with the user's key (issue #16, items 4 and 6): `kiln build
//! --module-signing-key KEY --module-signing-cert CERT` makes DKMS sign every module of
//! the NVIDIA image, the key never stays anywhere, and `kiln verify` reads who signed
//! each module. One real NVIDIA build (on the GPU-ready seed's qcow2, the real 565 DKMS
//! package, a key made by the test with openssl: a DKMS cache miss, so the modules are
//! compiled and signed by DKMS) serves every assertion; the mismatched-certificate case
//! fails before anything is built.

mod common;
use common::*;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::Command;

const SIGNER: &str = "kiln test module signing key";

/// An RSA key (PEM) and its self-signed certificate (PEM and DER) with CN `cn`.
struct TestKey {
    key: PathBuf,
    cert_pem: PathBuf,
    cert_der: PathBuf,
}

fn make_key(dir: &Path, cn: &str, tag: &str) -> TestKey {
    let k = TestKey {
        key: dir.join(format!("{tag}.priv")),
        cert_pem: dir.join(format!("{tag}.pem")),
        cert_der: dir.join(format!("{tag}.der")),
    };
    sh(
        "openssl",
        &[
            "req",
            "-new",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "3650",
            "-subj",
            &format!("/CN={cn}/"),
            "-keyout",
            k.key.to_str().unwrap(),
            "-out",
            k.cert_pem.to_str().unwrap(),
        ],
    );
    sh(
        "openssl",
        &[
            "x509",
            "-in",
            k.cert_pem.to_str().unwrap(),
            "-outform",
            "DER",
            "-out",
            k.cert_der.to_str().unwrap(),
        ],
    );
    k
}

/// What must not be found anywhere: the key's DER and every line of its PEM body.
fn needles(key: &Path) -> Vec<(String, Vec<u8>)> {
    let pem = std::fs::read_to_string(key).unwrap();
    let der = Command::new("openssl")
        .args(["pkey", "-in", key.to_str().unwrap(), "-outform", "DER"])
        .output()
        .unwrap()
        .stdout;
    assert!(der.len() > 1000, "openssl pkey gave no DER key");
    let mut out = vec![("the key's DER".to_string(), der.clone())];
    // A third of the DER is the private exponent's region: found alone if split.
    out.push((
        "the key's DER (middle)".to_string(),
        der[der.len() / 3..der.len() / 3 + 64].to_vec(),
    ));
    for (i, line) in pem.lines().filter(|l| !l.starts_with("-----")).enumerate() {
        out.push((
            format!("line {} of the key's PEM body", i + 1),
            line.as_bytes().to_vec(),
        ));
    }
    out
}

/// Where in `file` (data extents only; holes are zeros) any needle occurs.
fn find_in_file(file: &Path, needles: &[(String, Vec<u8>)]) -> Vec<String> {
    let mut f = std::fs::File::open(file).unwrap();
    let extents = kiln::disk::sparse::data_extents(&f).unwrap();
    let finders: Vec<_> = needles
        .iter()
        .map(|(w, n)| (w, memchr::memmem::Finder::new(n)))
        .collect();
    let overlap = needles.iter().map(|(_, n)| n.len()).max().unwrap();
    let mut hits = Vec::new();
    let mut buf = vec![0u8; 8 << 20];
    for (start, len) in extents {
        let mut pos = start;
        let end = start + len;
        while pos < end {
            let n = ((end - pos) as usize).min(buf.len());
            f.seek(SeekFrom::Start(pos)).unwrap();
            f.read_exact(&mut buf[..n]).unwrap();
            for (what, finder) in &finders {
                if let Some(i) = finder.find(&buf[..n]) {
                    hits.push(format!("{what} at byte {} of {}", pos + i as u64, file.display()));
                }
            }
            if pos + n as u64 >= end {
                break;
            }
            pos += (n - overlap) as u64;
        }
    }
    hits
}

fn find_in_tree(dir: &Path, needles: &[(String, Vec<u8>)], hits: &mut Vec<String>) {
    let Ok(rd) = std::fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let ft = e.file_type().unwrap();
        if ft.is_dir() {
            find_in_tree(&e.path(), needles, hits);
        } else if ft.is_file() {
            hits.extend(find_in_file(&e.path(), needles));
        }
    }
}

/// `modinfo -F signer` and `-F sig_key` of each module path, run by the image's own
/// kmod in a chroot of its root, mounted read-only in a private mount namespace (gone
/// with the process).
fn modinfo_in_image(raw: &Path, paths: &[String]) -> Vec<(String, String)> {
    let (off, len) = partition(raw, 1);
    let dev = TestLoop::new(raw, off, len);
    let mnt = tempfile::tempdir().unwrap();
    let mut script = format!("mount -o ro,noload {} {} || exit 1\n", dev.0, mnt.path().display());
    for p in paths {
        script.push_str(&format!(
            "printf '%s\\t%s\\n' \"$(chroot {m} modinfo -F signer {p})\" \"$(chroot {m} modinfo -F sig_key {p})\"\n",
            m = mnt.path().display()
        ));
    }
    let out = sh(
        "unshare",
        &["--mount", "--propagation", "private", "sh", "-ec", &script],
    );
    let lines: Vec<(String, String)> = out
        .lines()
        .map(|l| {
            let (a, b) = l.split_once('\t').unwrap();
            (a.to_string(), b.to_string())
        })
        .collect();
    assert_eq!(lines.len(), paths.len(), "modinfo output: {out}");
    lines
}

/// `kiln boot-test RAW --def DEF --secure-boot [--mok CERT] --firmware uefi --once
/// --json`: one boot with Secure Boot enforced (OVMF's Secure Boot build, Microsoft's keys,
/// the image's own shim, GRUB and kernel), `mok` put in shim's MokList first by
/// `virt-fw-vars` (PyPI virt-firmware, in .ci/run's venv). Returns whether boot-test
/// passed and its report's checks by name: (ok, found).
fn secure_boot(
    raw: &Path,
    def: &Path,
    mok: Option<&Path>,
) -> (bool, std::collections::BTreeMap<String, (bool, String)>) {
    let venv = cache().join("venv/bin");
    assert!(
        venv.join("virt-fw-vars").exists(),
        "{} is missing: run .ci/run (pip virt-firmware)",
        venv.join("virt-fw-vars").display()
    );
    let mut args: Vec<&str> = vec![
        "boot-test",
        raw.to_str().unwrap(),
        "--def",
        def.to_str().unwrap(),
        "--secure-boot",
        "--firmware",
        "uefi",
        "--once",
        // Two boots at once under TCG with SMM on 2 cores.
        "--timeout-secs",
        "1500",
        "--json",
    ];
    if let Some(m) = mok {
        args.extend(["--mok", m.to_str().unwrap()]);
    }
    let path = format!("{}:{}", venv.display(), std::env::var("PATH").unwrap_or_default());
    let o = run_kiln_env(&args, &[("PATH", &path)]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("boot-test --json output");
    assert_eq!(v["secure_boot"], true, "the report must say Secure Boot");
    let boots = v["boots"].as_array().unwrap();
    assert_eq!(boots.len(), 1, "--once --firmware uefi boots once");
    assert!(boots[0]["error"].is_null(), "the boot did not finish: {}", boots[0]);
    let checks = boots[0]["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap().to_string(),
                (c["ok"].as_bool().unwrap(), c["found"].as_str().unwrap().to_string()),
            )
        })
        .collect();
    (o.status.success() && v["passed"] == true, checks)
}

#[test]
fn mismatched_certificate_fails_before_any_image() {
    require_root!();
    let tmp = scratch("signing-mismatch");
    let a = make_key(tmp.path(), "signer a", "a");
    let b = make_key(tmp.path(), "signer b", "b");
    let out = tmp.path().join("out");
    let def = project().join(format!("images/{GPU_READY}.toml"));
    let o = run_kiln(&[
        "build",
        def.to_str().unwrap(),
        "--base",
        base_tarball().to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--module-signing-key",
        a.key.to_str().unwrap(),
        "--module-signing-cert",
        b.cert_der.to_str().unwrap(),
    ]);
    assert_eq!(
        o.status.code(),
        Some(2),
        "a mismatched certificate must be a user error"
    );
    let err = stderr(&o);
    assert!(
        err.contains(a.key.to_str().unwrap()) && err.contains(b.cert_der.to_str().unwrap()),
        "the error must name both files: {err}"
    );
    assert!(err.contains("not for the key"), "{err}");
    assert!(
        leftovers(&out).is_empty(),
        "something was written: {:?}",
        leftovers(&out)
    );
    // Only one of the two flags is a usage error too.
    let o = run_kiln(&[
        "build",
        def.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--module-signing-key",
        a.key.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn nvidia_modules_are_signed_with_the_users_key() {
    require_root!();
    let tmp = scratch("signing");
    let key = make_key(tmp.path(), SIGNER, "mok");
    let out = tmp.path().join("out");
    let def = project().join(format!("images/{NVIDIA}.toml"));
    // PEM on the command line; the image gets DER.
    let args = nvidia_build_args(
        &out,
        &[
            "--module-signing-key",
            key.key.to_str().unwrap(),
            "--module-signing-cert",
            key.cert_pem.to_str().unwrap(),
        ],
    );
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let started = std::time::Instant::now();
    let o = run_kiln(&argv);
    eprintln!("signed NVIDIA build: {:.0} s", started.elapsed().as_secs_f64());
    let cert_der = std::fs::read(&key.cert_der).unwrap();
    let cert_sha: String = {
        use sha2::Digest;
        sha2::Sha256::digest(&cert_der)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    };
    // This run's DKMS cache entries (signed with a key no later run has): checked for the
    // key below, then removed so the shared cache does not grow with each run.
    let dkms_cache = cache().join("kiln-cache/dkms");
    let ours: Vec<PathBuf> = std::fs::read_dir(&dkms_cache)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| {
                    std::fs::read(p.join("manifest.json")).is_ok_and(|m| {
                        serde_json::from_slice::<serde_json::Value>(&m).unwrap()["inputs"]["signing_cert_sha256"]
                            == cert_sha.as_str()
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    let cleanup = || {
        for p in &ours {
            let _ = std::fs::remove_dir_all(p);
        }
    };
    let res = std::panic::catch_unwind(|| {
        assert!(o.status.success(), "signed NVIDIA build failed");
        let raw = out.join(format!("{NVIDIA}.raw"));
        let log = std::fs::read_to_string(out.join(format!("{NVIDIA}.build.log"))).unwrap();
        assert!(
            log.contains(": compiling") && !log.contains("installed from the build cache"),
            "a new signing certificate must be a DKMS cache miss"
        );
        assert!(!ours.is_empty(), "the signed modules were not stored in the DKMS cache");

        // kiln's own reading of every module, and modinfo's in the image, agree.
        let root = kiln::image::open::RootFs::open(&raw).unwrap();
        let mut paths = Vec::new();
        for k in kiln::image::kernels::bootable_kernels(&root).unwrap() {
            let dir = format!("/usr/lib/modules/{k}/updates/dkms");
            for name in root.read_dir(&dir).unwrap() {
                if name.ends_with(".ko") {
                    paths.push(format!("{dir}/{name}"));
                }
            }
        }
        assert!(paths.len() >= 5, "NVIDIA modules: {paths:?}");
        let (cert, _) = kiln::image::modsig::certificate_der(&cert_der).unwrap();
        let (_, serial) = kiln::image::modsig::signer_of_certificate(&cert);
        let kmod = modinfo_in_image(&raw, &paths);
        for (p, (signer, sig_key)) in paths.iter().zip(&kmod) {
            let s = kiln::image::modsig::read(&root.read(p).unwrap())
                .unwrap()
                .unwrap_or_else(|| panic!("{p} is not signed"));
            assert_eq!(s.signer.as_deref(), Some(SIGNER), "{p}: kiln's signer");
            assert_eq!(signer, SIGNER, "{p}: modinfo -F signer");
            assert_eq!(&s.key, sig_key, "{p}: kiln's key id and modinfo -F sig_key");
            assert_eq!(s.key, serial, "{p}: signed by another certificate");
        }
        // The certificate stays for enrolment, as DER; no private key anywhere in it.
        assert_eq!(root.read("/var/lib/shim-signed/mok/MOK.der").unwrap(), cert_der);
        for p in ["/var/lib/shim-signed/mok/MOK.priv", "/var/lib/dkms/mok.key"] {
            assert!(!root.exists(p).unwrap(), "{p} is in the image");
        }
        drop(root);

        // The key's bytes: not in the raw image (free blocks included), the output
        // directory (work directory, log) or the DKMS cache entries.
        let needles = needles(&key.key);
        let mut hits = find_in_file(&raw, &needles);
        for entry in std::fs::read_dir(&out).unwrap().flatten() {
            if entry.path() != raw {
                if entry.file_type().unwrap().is_dir() {
                    find_in_tree(&entry.path(), &needles, &mut hits);
                } else {
                    hits.extend(find_in_file(&entry.path(), &needles));
                }
            }
        }
        for e in &ours {
            find_in_tree(e, &needles, &mut hits);
        }
        assert!(hits.is_empty(), "the private key was found: {hits:#?}");
        // The needles do find the key where it is (the search works).
        assert!(!find_in_file(&key.key, &needles).is_empty());

        // verify: every NVIDIA module signed by the expected name passes; another name fails.
        let v = verify_passes(&raw, &def, &["--module-signer", SIGNER]);
        assert_eq!(v.module_signatures.len(), paths.len(), "{:?}", v.module_signatures);
        for m in &v.module_signatures {
            let s = m.signature.as_ref().expect("signed");
            assert_eq!(s.signer.as_deref(), Some(SIGNER), "{}", m.path);
        }
        let o = run_kiln(&[
            "verify",
            raw.to_str().unwrap(),
            "--def",
            def.to_str().unwrap(),
            "--module-signer",
            "Someone Else",
            "--json",
        ]);
        assert_eq!(o.status.code(), Some(1), "verify with a wrong signer must fail");
        let v: kiln::image::verify::VerifyReport = serde_json::from_slice(&o.stdout).unwrap();
        let failed: Vec<&str> = v.checks.iter().filter(|c| !c.ok).map(|c| c.name.as_str()).collect();
        assert_eq!(failed.len(), paths.len(), "{failed:?}");
        assert!(failed.iter().all(|n| n.starts_with("module signature ")), "{failed:?}");

        // Secure Boot enforced (`kiln boot-test --secure-boot`): with the certificate in
        // shim's MokList the kernel takes the signed module (its init runs and finds no
        // GPU) and every check of the definition passes; without it, lockdown refuses it.
        let ((passed, enrolled), (np, not_enrolled)) = std::thread::scope(|s| {
            let a = s.spawn(|| secure_boot(&raw, &def, Some(&key.cert_der)));
            let b = s.spawn(|| secure_boot(&raw, &def, None));
            (a.join().unwrap(), b.join().unwrap())
        });
        for checks in [&enrolled, &not_enrolled] {
            assert_eq!(checks["secure boot"], (true, "enabled".to_string()), "{checks:?}");
            assert!(checks["kernel lockdown"].0, "the kernel is not locked down: {checks:?}");
        }
        let failed: Vec<_> = enrolled.iter().filter(|(_, (ok, _))| !ok).collect();
        assert!(
            passed && failed.is_empty(),
            "certificate enrolled, failed checks: {failed:?}"
        );
        let (ok, found) = &enrolled["MOK certificate"];
        assert!(
            *ok && found.contains(&format!("Loaded X.509 cert '{SIGNER}")),
            "{found}"
        );
        let (ok, found) = &enrolled["nvidia under Secure Boot"];
        assert!(
            *ok && found.contains("No such device"),
            "the signed module was not accepted: {found}"
        );
        assert!(!np, "boot-test must fail when the module's signer is not enrolled");
        assert!(!not_enrolled.contains_key("MOK certificate"), "{not_enrolled:?}");
        let (ok, found) = &not_enrolled["nvidia under Secure Boot"];
        assert!(
            !ok && (found.contains("Key was rejected") || found.contains("Operation not permitted")),
            "without the certificate the module must be refused: {found}"
        );
        let failed: Vec<&String> = not_enrolled.iter().filter(|(_, (ok, _))| !ok).map(|(n, _)| n).collect();
        assert_eq!(
            failed,
            ["nvidia under Secure Boot"],
            "only the module may fail: {not_enrolled:?}"
        );
    });
    cleanup();
    if let Err(e) = res {
        std::panic::resume_unwind(e);
    }
}
