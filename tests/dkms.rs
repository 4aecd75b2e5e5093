//! The DKMS build cache (src/build/stages/dkms.rs): an NVIDIA image whose modules come
//! from the cache is the image a compile produces. The same two builds check the layer
//! cache (src/build/layers.rs): the cached build also starts from the layer the NVIDIA
//! seed build stored, and has the package manifest of the from-scratch build. Real builds of the NVIDIA seed
//! definition on the GPU-ready seed (qcow2), with the real 565.57.01 DKMS package and
//! real kernel headers; only the Kubernetes and container-toolkit repositories are the
//! tests' stand-ins. The key's invalidation (kernel, driver version, compiler, ...) and
//! damaged entries are covered by the unit tests of the module.

mod common;
use common::*;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const MODULES: [&str; 5] = ["nvidia", "nvidia-modeset", "nvidia-drm", "nvidia-uvm", "nvidia-peermem"];

/// Build the NVIDIA image on the GPU-ready seed's qcow2 into `out`; returns the raw
/// image and the build log.
fn build_nvidia(out: &Path, extra: &[&str]) -> (PathBuf, String) {
    let args = nvidia_build_args(out, extra);
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = run_kiln(&argv);
    assert!(o.status.success(), "NVIDIA build into {} failed", out.display());
    let log = std::fs::read_to_string(out.join(format!("{NVIDIA}.build.log"))).unwrap();
    (out.join(format!("{NVIDIA}.raw")), log)
}

#[derive(Debug, PartialEq)]
struct Module {
    vermagic: String,
    version: String,
    srcversion: String,
}

/// Per kernel and module: the installed module's modinfo, and its sha256 (installed
/// copy and DKMS tree copy, which must agree).
fn modules(raw: &Path) -> BTreeMap<(String, String), (Module, String)> {
    let root = kiln::image::open::RootFs::open(raw).unwrap();
    let kernels = kiln::image::kernels::bootable_kernels(&root).unwrap();
    assert!(!kernels.is_empty());
    let mut out = BTreeMap::new();
    for k in &kernels {
        for m in MODULES {
            let ko = root
                .read(&format!("/usr/lib/modules/{k}/updates/dkms/{m}.ko"))
                .unwrap_or_else(|e| panic!("{}: {m}.ko for {k}: {e:#}", raw.display()));
            let field = |f: &str| kiln::image::verify::modinfo_field(&ko, f).unwrap_or_default();
            let module = Module {
                vermagic: field("vermagic"),
                version: field("version"),
                srcversion: field("srcversion"),
            };
            assert!(
                module.vermagic.starts_with(&format!("{k} ")),
                "{m}.ko for {k}: vermagic {}",
                module.vermagic
            );
            assert_eq!(module.version, "565.57.01", "{m}.ko version");
            assert!(!module.srcversion.is_empty(), "{m}.ko has a srcversion");
            let sha = hex(&ko);
            let tree = root
                .read(&format!("/var/lib/dkms/nvidia-srv/565.57.01/{k}/x86_64/module/{m}.ko"))
                .unwrap();
            assert_eq!(
                hex(&tree),
                sha,
                "{m}.ko for {k}: installed copy differs from DKMS's tree"
            );
            out.insert((k.clone(), m.to_string()), (module, sha));
        }
    }
    out
}

/// The package manifest of an image, read offline: what `dpkg-query -W -f
/// '${Package} ${Version} ${Architecture} ${db:Status-Status}'` prints, for its
/// installed packages.
fn package_manifest(raw: &Path) -> Vec<String> {
    let root = kiln::image::open::RootFs::open(raw).unwrap();
    let mut out: Vec<String> = kiln::image::dpkg::read_status(&root)
        .unwrap()
        .into_iter()
        .filter(|p| p.is_installed())
        .map(|p| format!("{} {} {} {}", p.name, p.version, p.arch, p.want()))
        .collect();
    out.sort();
    assert!(out.len() > 300, "{}: only {} packages", raw.display(), out.len());
    out
}

/// The layer cache's line for a build that started from a layer.
const FROM_LAYER: &str = "layer cache: stage(s) system-update, gpu-prerequisites taken from";

fn hex(data: &[u8]) -> String {
    Sha256::digest(data).iter().map(|b| format!("{b:02x}")).collect()
}

/// The module sha256s stored in the shared cache's entries, by kernel and module.
fn cache_entries() -> BTreeMap<(String, String), String> {
    let mut out = BTreeMap::new();
    let dir = cache().join("kiln-cache/dkms");
    for e in std::fs::read_dir(&dir).unwrap().flatten() {
        let Ok(text) = std::fs::read(e.path().join("manifest.json")) else {
            continue;
        };
        let m: serde_json::Value = serde_json::from_slice(&text).unwrap();
        let kernel = m["inputs"]["kernel"].as_str().unwrap().to_string();
        for (f, v) in m["files"].as_object().unwrap() {
            if let Some(name) = f.strip_prefix("module/").and_then(|n| n.strip_suffix(".ko")) {
                out.insert(
                    (kernel.clone(), name.to_string()),
                    v["sha256"].as_str().unwrap().to_string(),
                );
            }
        }
    }
    out
}

#[test]
fn modules_from_the_cache_are_the_compiled_ones() {
    require_root!();
    let tmp = scratch("dkms");
    // Compiled by the package's own postinst, the cache neither read nor written; and
    // every stage built (no layer).
    let (compiled_raw, compiled_log) =
        build_nvidia(&tmp.path().join("compiled"), &["--no-dkms-cache", "--no-layer-cache"]);
    assert!(
        !compiled_log.contains("from the build cache"),
        "--no-dkms-cache used the cache"
    );
    assert!(
        !compiled_log.contains("layer cache:"),
        "--no-layer-cache used the layer cache"
    );
    // The NVIDIA seed build used the shared cache: it compiled and stored the modules,
    // or found them there from an earlier run. Either way this build must hit. It
    // stored the root after the two stages it shares with the GPU-ready definition, so
    // this build starts from that layer; a seed kept from an earlier run may have had its
    // layer pruned, and then the first build here stores it and a second one uses it.
    let _ = nvidia_seed();
    let (mut cached_raw, mut cached_log) = build_nvidia(&tmp.path().join("cached"), &[]);
    if !cached_log.contains(FROM_LAYER) {
        (cached_raw, cached_log) = build_nvidia(&tmp.path().join("cached-again"), &[]);
    }
    assert!(
        cached_log.contains(FROM_LAYER),
        "the cached build did not start from the stored layer"
    );
    assert!(
        cached_log.contains("installed from the build cache"),
        "the second cached build did not take its modules from the cache"
    );
    assert!(
        !cached_log.contains(": compiling"),
        "a module was compiled despite a cache entry"
    );
    assert!(
        !cached_log.contains("Building initial module"),
        "a package script compiled a module while the headers were hidden"
    );

    let compiled = modules(&compiled_raw);
    let cached = modules(&cached_raw);
    assert_eq!(compiled.keys().collect::<Vec<_>>(), cached.keys().collect::<Vec<_>>());
    let entries = cache_entries();
    for (key, (c_mod, _)) in &compiled {
        let (h_mod, h_sha) = &cached[key];
        assert_eq!(
            c_mod, h_mod,
            "{key:?}: modinfo of the cached module differs from the compiled one"
        );
        assert_eq!(
            entries.get(key),
            Some(h_sha),
            "{key:?}: the installed module is not the cache entry's"
        );
    }
    // The image passes the same checks as a compiled one (module checks included).
    let def = project().join(format!("images/{NVIDIA}.toml"));
    for raw in [&cached_raw, &compiled_raw] {
        let v = verify_passes(raw, &def, &[]);
        assert!(
            v.checks.iter().any(|c| c.name.starts_with("module nvidia ") && c.ok),
            "no module check for nvidia"
        );
    }
    // Built on the layer or from scratch: the same packages.
    assert_eq!(
        package_manifest(&cached_raw),
        package_manifest(&compiled_raw),
        "the build on a cached layer installed other packages than the full build"
    );
    // DKMS's own record of an installed build: the kernel-K-ARCH link of `dkms install`
    // (what `dkms status` reports as installed) points at the built tree.
    let root = kiln::image::open::RootFs::open(&cached_raw).unwrap();
    for k in kiln::image::kernels::bootable_kernels(&root).unwrap() {
        let link = format!("/var/lib/dkms/nvidia-srv/kernel-{k}-x86_64/module/nvidia.ko");
        assert!(
            root.exists(&link).unwrap(),
            "DKMS does not record {k} as installed ({link})"
        );
    }
}
