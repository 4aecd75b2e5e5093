//! Disk layer and artifacts (issue "Disk layer and artifacts"), as root with real loop
//! devices on small sparse images: root tarball → raw, qcow2 → raw, and bad bases.

mod common;
use common::*;
use std::path::Path;

/// GPT, ext4 and ESP of a finished image all check clean with independent tools, and the
/// backup GPT sits at the end of the grown disk.
fn check_disk(raw: &Path, size: u64) {
    assert_eq!(std::fs::metadata(raw).unwrap().len(), size);
    let v = sh("sgdisk", &["-v", raw.to_str().unwrap()]);
    assert!(v.contains("No problems found"), "sgdisk -v: {v}");
    // Backup header location: the primary header's "alternate LBA" field.
    let mut hdr = [0u8; 92];
    std::os::unix::fs::FileExt::read_exact_at(&std::fs::File::open(raw).unwrap(), &mut hdr, 512).unwrap();
    assert_eq!(&hdr[0..8], b"EFI PART");
    let alternate = u64::from_le_bytes(hdr[32..40].try_into().unwrap());
    assert_eq!(
        alternate,
        size / 512 - 1,
        "backup GPT header is not at the end of the disk"
    );
    // The root partition fills the disk up to the backup table.
    let last_usable = u64::from_le_bytes(hdr[48..56].try_into().unwrap());
    let (off, len) = partition(raw, 1);
    assert_eq!(
        (off + len) / 512 - 1,
        last_usable,
        "root partition does not fill the disk"
    );
    let root = TestLoop::new(raw, off, len);
    sh("e2fsck", &["-fn", &root.0]);
    let blocks = sh("dumpe2fs", &["-h", &root.0]);
    let count: u64 = blocks
        .lines()
        .find(|l| l.starts_with("Block count:"))
        .unwrap()
        .split_whitespace()
        .last()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(count * 4096, len / 4096 * 4096, "ext4 was not grown to the partition");
    assert!(blocks.contains("cloudimg-rootfs"), "root label: {blocks}");
    let (eoff, elen) = partition(raw, 15);
    let esp = TestLoop::new(raw, eoff, elen);
    sh("fsck.vfat", &["-n", &esp.0]);
    let label = sh("blkid", &["-o", "value", "-s", "LABEL", &esp.0]);
    assert_eq!(label.trim(), "UEFI");
    // Sparse: a 2+ GiB disk holding a few MiB of files allocates far less than its size.
    use std::os::unix::fs::MetadataExt;
    let alloc = std::fs::metadata(raw).unwrap().blocks() * 512;
    assert!(
        alloc < size / 4,
        "image is not sparse: {alloc} of {size} bytes allocated"
    );
}

fn check_artifacts(out: &Path, name: &str) -> serde_json::Value {
    let sums = std::fs::read_to_string(out.join("SHA256SUMS")).unwrap();
    assert!(sums.contains(&format!("  {name}.raw")), "{sums}");
    let st = std::process::Command::new("sha256sum")
        .arg("-c")
        .arg("SHA256SUMS")
        .current_dir(out)
        .status()
        .unwrap();
    assert!(st.success(), "sha256sum -c failed");
    assert!(!out.join(format!("{name}.raw.partial")).exists());
    // The SBOM lists the small root's installed packages (tests/sbom.rs checks the seeds').
    assert!(sums.contains(&format!("  {name}.spdx.json")), "{sums}");
    let sbom: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join(format!("{name}.spdx.json"))).unwrap()).unwrap();
    let names: Vec<&str> = sbom["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, [name, "base-files", "kubelet", "linux-image-5.15.0-204-generic"]);
    let payload: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join(format!("{name}.json"))).unwrap()).unwrap();
    let keys = |v: &serde_json::Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
    assert_eq!(keys(&payload), ["metadata", "spec"]);
    assert_eq!(keys(&payload["metadata"]), ["name", "description"]);
    assert_eq!(
        keys(&payload["spec"]),
        ["uri", "architecture", "virtualization", "os", "softwareVersions"]
    );
    assert_eq!(
        keys(&payload["spec"]["os"]),
        ["kernel", "family", "distro", "variant", "codename", "version"]
    );
    assert_eq!(payload["metadata"]["name"], name);
    assert_eq!(
        payload["spec"]["uri"],
        format!("https://bucket.example/images/{name}.raw")
    );
    assert_eq!(payload["spec"]["architecture"], "x86_64");
    assert_eq!(payload["spec"]["os"]["codename"], "jammy");
    assert_eq!(payload["spec"]["os"]["version"], "22.04");
    assert_eq!(payload["spec"]["os"]["family"], "debian");
    assert_eq!(payload["spec"]["softwareVersions"]["kubernetes"], "v1.30.0");
    payload
}

#[test]
fn root_tarball_becomes_checked_raw_image() {
    require_root!();
    let d = scratch("tarball");
    let tarball = small_tarball(d.path(), true);
    let def = disk_only_def(d.path(), "tarball-img", "2G");
    let out = d.path().join("out");
    let cache = d.path().join("cache");
    let (base, cache_arg) = (tarball.to_str().unwrap(), cache.to_str().unwrap());
    let o = run_kiln(&[
        "build",
        def.to_str().unwrap(),
        "--base",
        base,
        "--out",
        out.to_str().unwrap(),
        "--timings",
        "--cache-dir",
        cache_arg,
    ]);
    assert!(o.status.success());
    // The .tar.xz was decompressed once into the cache, under its sha256; a second
    // build from it uses that and does not decode the xz again.
    let sha = sh("sha256sum", &[base]).split_whitespace().next().unwrap().to_string();
    let cached = cache.join("bases").join(format!("{sha}.tar"));
    let mut plain = Vec::new();
    std::io::Read::read_to_end(
        &mut xz2::read::XzDecoder::new(std::fs::File::open(&tarball).unwrap()),
        &mut plain,
    )
    .unwrap();
    assert!(
        std::fs::read(&cached).unwrap() == plain,
        "{} is not the decompressed tarball",
        cached.display()
    );
    let out2 = d.path().join("out2");
    let o = run_kiln(&[
        "build",
        def.to_str().unwrap(),
        "--base",
        base,
        "--out",
        out2.to_str().unwrap(),
        "--cache-dir",
        cache_arg,
    ]);
    assert!(o.status.success());
    assert!(
        stderr(&o).contains("using the cached decompressed form"),
        "{}",
        stderr(&o)
    );
    check_disk(&out2.join("tarball-img.raw"), 2 << 30);
    let raw = out.join("tarball-img.raw");
    check_disk(&raw, 2 << 30);
    check_artifacts(&out, "tarball-img");
    // The fresh disk has the cloud image's layout.
    let p = sh("sgdisk", &["-p", raw.to_str().unwrap()]);
    for (n, code) in [("14", "EF02"), ("15", "EF00"), ("1", "8300")] {
        assert!(
            p.lines()
                .any(|l| l.split_whitespace().next() == Some(n) && l.contains(code)),
            "{p}"
        );
    }
    assert_eq!(partition(&raw, 14), (2048 * 512, 4 << 20));
    assert_eq!(partition(&raw, 15).1, 106 << 20);
    // Unpacked faithfully, fstab written, identity scrubbed: read back with debugfs (no mount).
    let (off, len) = partition(&raw, 1);
    let root = TestLoop::new(&raw, off, len);
    let stat = |p: &str| sh("debugfs", &["-R", &format!("stat {p}"), &root.0]);
    assert!(stat("/usr/bin/su").contains("Mode:  04755"), "{}", stat("/usr/bin/su"));
    let su_inode = stat("/usr/bin/su").split_whitespace().nth(1).unwrap().to_string();
    assert_eq!(
        stat("/usr/bin/su-hardlink").split_whitespace().nth(1).unwrap(),
        su_inode,
        "hard link lost"
    );
    assert!(stat("/dev/null").contains("Type: character special"));
    let fstab = sh("debugfs", &["-R", "cat /etc/fstab", &root.0]);
    assert!(
        fstab.contains("LABEL=cloudimg-rootfs\t/\text4") && fstab.contains("LABEL=UEFI\t/boot/efi\tvfat"),
        "{fstab}"
    );
    assert_eq!(sh("debugfs", &["-R", "cat /etc/machine-id", &root.0]), "");
    assert!(!sh("debugfs", &["-R", "ls /etc/ssh", &root.0]).contains("ssh_host_"));
    // inspect reads it back without mounting.
    let o = run_kiln(&["inspect", "--json", raw.to_str().unwrap()]);
    assert!(o.status.success());
    let facts: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(facts["os_release"]["VERSION_CODENAME"], "jammy");
    drop(root);
    assert_no_leaks(d.path());
}

#[test]
fn qcow2_cloud_disk_becomes_grown_raw_image() {
    require_root!();
    let d = scratch("qcow2");
    let tarball = small_tarball(d.path(), false);
    let qcow = d.path().join("cloud.qcow2");
    sh(
        project().join("tests/fixtures/make-cloud-image.sh").to_str().unwrap(),
        &[tarball.to_str().unwrap(), qcow.to_str().unwrap(), "1G"],
    );
    // Named .img: the format comes from the magic, not the name.
    let renamed = d.path().join("cloud.img");
    std::fs::rename(&qcow, &renamed).unwrap();
    let def = disk_only_def(d.path(), "qcow-img", "3G");
    let out = d.path().join("out");
    let o = run_kiln(&[
        "build",
        def.to_str().unwrap(),
        "--base",
        renamed.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--format",
        "qcow2",
    ]);
    assert!(o.status.success());
    check_disk(&out.join("qcow-img.raw"), 3 << 30);
    check_artifacts(&out, "qcow-img");
    let sums = std::fs::read_to_string(out.join("SHA256SUMS")).unwrap();
    assert!(sums.contains("  qcow-img.qcow2"));
    let info = sh("qemu-img", &["info", out.join("qcow-img.qcow2").to_str().unwrap()]);
    assert!(info.contains("file format: qcow2"), "{info}");
    assert_no_leaks(d.path());
}

/// Every bad base fails with exit code 2, a message naming the problem, and nothing
/// written to the output directory.
#[test]
fn bad_bases_fail_before_anything_is_written() {
    require_root!();
    let d = scratch("badbase");
    let def = disk_only_def(d.path(), "bad", "2G");
    let good_tar = small_tarball(d.path(), false);
    let text = d.path().join("notes.img");
    std::fs::write(&text, "just some text\n".repeat(100)).unwrap();
    // A truncated qcow2: a real one cut in half.
    let qcow = d.path().join("full.qcow2");
    sh(
        project().join("tests/fixtures/make-cloud-image.sh").to_str().unwrap(),
        &[good_tar.to_str().unwrap(), qcow.to_str().unwrap(), "1G"],
    );
    let truncated = d.path().join("truncated.qcow2");
    let bytes = std::fs::read(&qcow).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    // No GPT: an MBR-only disk.
    let mbr = d.path().join("mbr.raw");
    let f = std::fs::File::create(&mbr).unwrap();
    f.set_len(64 << 20).unwrap();
    drop(f);
    // No ext4 root: a GPT whose partition 1 is empty.
    let noext4 = d.path().join("noext4.raw");
    let f = std::fs::File::create(&noext4).unwrap();
    f.set_len(256 << 20).unwrap();
    drop(f);
    sh(
        "sgdisk",
        &[
            "-n",
            "14:2048:+4M",
            "-t",
            "14:EF02",
            "-n",
            "15:10240:+106M",
            "-t",
            "15:EF00",
            "-n",
            "1:227328:0",
            "-t",
            "1:8300",
            noext4.to_str().unwrap(),
        ],
    );
    // Bigger than the target.
    let big = d.path().join("big.img");
    sh(
        project().join("tests/fixtures/make-cloud-image.sh").to_str().unwrap(),
        &[good_tar.to_str().unwrap(), big.to_str().unwrap(), "3G"],
    );

    let bad_sum = "0".repeat(64);
    let mismatch = ["checksum mismatch", bad_sum.as_str()];
    let cases: Vec<(&Path, Vec<&str>, &[&str])> = vec![
        (&text, vec![], &["not a disk image or root tarball"]),
        (&truncated, vec![], &["truncated", "qcow2"]),
        (&good_tar, vec!["--base-sha256", &bad_sum], &mismatch),
        (&mbr, vec![], &["no GPT"]),
        (&noext4, vec![], &["no ext4"]),
        (&big, vec![], &["larger than the target"]),
        (Path::new("/nonexistent/base.img"), vec![], &["cannot open base"]),
    ];
    std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("echo 'start=2048, type=83' | sfdisk -q {}", mbr.display()))
        .status()
        .unwrap();
    for (base, extra, words) in cases {
        let out = d.path().join("out");
        let mut args = vec![
            "build",
            def.to_str().unwrap(),
            "--base",
            base.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend(extra);
        let o = run_kiln(&args);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{}: {err}", base.display());
        for w in words {
            assert!(err.contains(w), "{}: expected `{w}` in: {err}", base.display());
        }
        assert!(!err.contains("panicked") && !err.contains("stack backtrace"), "{err}");
        let written: Vec<_> = std::fs::read_dir(&out)
            .map(|r| r.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(
            written.is_empty(),
            "{}: output directory got {written:?}",
            base.display()
        );
    }
    assert_no_leaks(d.path());
}
