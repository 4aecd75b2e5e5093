//! `kiln verify IMAGE --def images/NAME.toml [--json]`: check a finished image against
//! its definition and SPEC.md, offline — nothing is mounted and no root is needed.
//!
//! The image (raw, or qcow2 through a temporary raw copy) is read in place with
//! [`RootFs`]. Every check is derived from the definition, so the same code verifies
//! the GPU-ready image and the NVIDIA one; the spec's facts are the definition's
//! `[expect]` table ([`Expectations`]), which `boot-test` reads too:
//!
//! * the system: `expect.os` and `expect.architecture`, the disk as large as `disk_size`;
//! * every package of every stage installed, pinned ones at exactly their version, and
//!   pinned and `hold`-listed ones on hold (`package NAME`), and none that matches an
//!   `expect.absent_packages` pattern (`package PATTERN absent`);
//! * the image kernels (`/boot/vmlinuz-K` with `/lib/modules/K`), `expect.kernel` alone
//!   when the definition pins one (`kernel pinned`), their headers when a
//!   stage asks for `kernel_headers`, and each `require_modules` module built for each
//!   kernel (the `vermagic=` of its `.modinfo`), with `nvidia.ko` at
//!   `expect.nvidia_driver_version`;
//! * who signed every NVIDIA module (`updates/dkms`, and the required modules' files),
//!   read offline from the appended signature (`modsig`), against
//!   `expect.module_signer` (or `--module-signer`) when set;
//! * every overlay file in place with its content and mode;
//! * the expected configuration: modules blacklisted and module options in modprobe.d,
//!   modules in modules-load.d, sysctls, containerd's config and runtimes, RuntimeClass
//!   manifests, minimum and Kubernetes versions;
//! * swap off, units masked and enabled (`/etc/systemd/system/*.wants/UNIT`);
//! * the scrubbed identity of stage 7 (machine-id, SSH host keys, histories, passwords,
//!   cloud-init, apt lists, build leftovers) and an initramfs per kernel;
//! * each `[[repository]]` configured with the definition's URI and a signing key.
//!
//! [`verify_image`] only reads and returns [`Check`]s; [`cmd_verify`] prints them and
//! fails when one did.

use crate::build::stages::signing::{DKMS3_KEY, MOK_KEY};
use crate::definition::{Expectations, ImageDef};
use crate::host::progress::exact_size;
use crate::image::dpkg::{self, DpkgPackage, dpkg_version_cmp, upstream_version};
use crate::image::kernels::bootable_kernels;
use crate::image::modsig;
use crate::image::open::{FileKind, RootFs};
use crate::image::os_release::parse_os_release;
use anyhow::{Context, Result, bail};
use serde::Serialize;
use std::cmp::Ordering;
use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};

// ---------------------------------------------------------------------------------
// Where kiln and Ubuntu put things (what the image must hold is in `[expect]`)
// ---------------------------------------------------------------------------------

/// Where RuntimeClass manifests are shipped (overlays/*/usr/local/share/kubernetes).
const MANIFEST_DIR: &str = "/usr/local/share/kubernetes";
/// Ubuntu's resolv.conf: a symlink to systemd-resolved's stub file.
const RESOLV_TARGET: &str = "../run/systemd/resolve/stub-resolv.conf";
/// Build-time files kiln writes into the image and must remove (`apt`, `chroot`).
const BUILD_LEFTOVERS: [&str; 2] = [
    "/etc/apt/apt.conf.d/99kiln-build",
    "/etc/dpkg/dpkg.cfg.d/kiln-unsafe-io",
];
const POLICY_RC_D: &str = "/usr/sbin/policy-rc.d";
const INITRAMFS_CONF: &str = "/etc/initramfs-tools/update-initramfs.conf";
/// containerd's socket when its config sets none.
const DEFAULT_CONTAINERD_SOCKET: &str = "/run/containerd/containerd.sock";
/// Local unit configuration: enablement links in `*.wants`/`*.requires`, masks.
const SYSTEMD_ETC: &str = "/etc/systemd/system";
/// Where systemd finds unit files and their `UNIT.d/` drop-ins, in precedence order.
const UNIT_DIRS: [&str; 4] = [
    "/etc/systemd/system",
    "/run/systemd/system",
    "/lib/systemd/system",
    "/usr/lib/systemd/system",
];
/// The default PATH's directories, where `expect.commands` must be found.
const PATH_DIRS: [&str; 6] = [
    "/usr/local/sbin",
    "/usr/local/bin",
    "/usr/sbin",
    "/usr/bin",
    "/sbin",
    "/bin",
];
/// Host names that name no machine: what /etc/hostname may hold in an image
/// (cloud-init sets the real one at boot).
const NEUTRAL_HOSTNAMES: [&str; 2] = ["localhost", "localhost.localdomain"];

/// Configuration directories in precedence order: for a file name found in several,
/// the first directory wins (modprobe.d(5), sysctl.d(5), modules-load.d(5)).
const MODPROBE_DIRS: [&str; 4] = [
    "/etc/modprobe.d",
    "/run/modprobe.d",
    "/usr/local/lib/modprobe.d",
    "/lib/modprobe.d",
];
const SYSCTL_DIRS: [&str; 5] = [
    "/etc/sysctl.d",
    "/run/sysctl.d",
    "/usr/local/lib/sysctl.d",
    "/usr/lib/sysctl.d",
    "/lib/sysctl.d",
];
const MODULES_LOAD_DIRS: [&str; 5] = [
    "/etc/modules-load.d",
    "/run/modules-load.d",
    "/usr/local/lib/modules-load.d",
    "/usr/lib/modules-load.d",
    "/lib/modules-load.d",
];

/// File name endings of kernel modules, plain and compressed.
const MODULE_SUFFIXES: [&str; 4] = [".ko", ".ko.xz", ".ko.gz", ".ko.zst"];

// ---------------------------------------------------------------------------------
// Checks and the command
// ---------------------------------------------------------------------------------

/// The outcome of one check. Names are stable (`package kubelet`,
/// `module nvidia (5.15.0-91-generic)`, `machine-id empty`, ...); `found` and
/// `expected` are one line each.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Check {
    pub name: String,
    pub ok: bool,
    /// What the image has.
    pub found: String,
    /// What the definition or the spec asks for.
    pub expected: String,
}

/// `kiln verify --json` output.
#[derive(Serialize)]
struct Report<'a> {
    image: String,
    checks: &'a [Check],
    /// Every NVIDIA module's signature (signer or none).
    module_signatures: &'a [ModuleSignature],
    passed: bool,
}

/// `kiln verify --json` output, as a reader (tests, other tools) gets it back.
#[derive(Debug, serde::Deserialize)]
pub struct VerifyReport {
    pub image: String,
    pub checks: Vec<Check>,
    #[serde(default)]
    pub module_signatures: Vec<ModuleSignature>,
    pub passed: bool,
}

/// The signature of one NVIDIA module file of the image (every `.ko` under
/// `/lib/modules/K/updates/dkms`, and the file each `require_modules` entry loads).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct ModuleSignature {
    pub kernel: String,
    /// The file, e.g. `/lib/modules/K/updates/dkms/nvidia.ko`.
    pub path: String,
    /// Its appended signature; `None`: unsigned (or unreadable, see `error`).
    pub signature: Option<modsig::Signature>,
    /// Why the signature could not be read.
    pub error: Option<String>,
}

/// `kiln verify IMAGE --def DEF [--set NAME=VALUE]... [--json]`: print the checks (a
/// table, or JSON) of the definition's variant and fail with "N of M checks failed"
/// when any did.
/// `module_signer` (`--module-signer`) replaces the definition's `expect.module_signer`.
pub fn cmd_verify(
    image: &Path,
    def_path: &Path,
    sets: &[crate::definition::Setting],
    module_signer: Option<String>,
    json: bool,
) -> Result<()> {
    let mut def = crate::definition::load_with(def_path, sets)?;
    if let Some(s) = module_signer {
        if s.trim().is_empty() {
            crate::user_bail!("--module-signer: give the signing certificate's common name, not an empty string");
        }
        def.expect.module_signer = Some(s);
    }
    let (checks, signatures) = verify_image_full(image, &def)?;
    let failed = checks.iter().filter(|c| !c.ok).count();
    let text = if json {
        let report = Report {
            image: image.display().to_string(),
            checks: &checks,
            module_signatures: &signatures,
            passed: failed == 0,
        };
        let mut s = serde_json::to_string_pretty(&report).context("serialising the checks")?;
        s.push('\n');
        s
    } else {
        let mut s = format!(
            "Image: {}\nDefinition: {} ({})\n\n",
            image.display(),
            def.file.display(),
            def.name
        );
        s.push_str(&render_table(&checks));
        if failed == 0 {
            s.push_str(&format!("\nall {} checks passed\n", checks.len()));
        }
        s
    };
    crate::host::progress::print_stdout(&text)?;
    if failed > 0 {
        bail!("{failed} of {} checks failed", checks.len());
    }
    Ok(())
}

/// Run every check of `def` against the image at `image` (raw or qcow2). Reads only;
/// prints nothing. An image that cannot be read at all is an error; anything wrong
/// inside it is a failed [`Check`].
pub fn verify_image(image: &Path, def: &ImageDef) -> Result<Vec<Check>> {
    Ok(verify_image_full(image, def)?.0)
}

/// [`verify_image`], and every NVIDIA module's signature.
pub fn verify_image_full(image: &Path, def: &ImageDef) -> Result<(Vec<Check>, Vec<ModuleSignature>)> {
    let root = RootFs::open(image)?;
    let size = root.disk().size();
    let status = dpkg::read_status(&root)?;
    let kernels = bootable_kernels(&root)?;
    let mut v = Verifier {
        root,
        def,
        status,
        kernels,
        checks: Vec::new(),
        signatures: Vec::new(),
    };
    v.system(size)?;
    v.packages();
    v.absent_packages();
    v.kernels();
    v.modules()?;
    v.module_signatures()?;
    v.overlays()?;
    v.spec_config()?;
    v.units()?;
    v.identity()?;
    v.repositories()?;
    Ok((v.checks, v.signatures))
}

/// The checks as an aligned table: CHECK, RESULT (`pass`/`FAIL`), FOUND, EXPECTED.
/// The FOUND column is padded to at most 60 characters; longer values push only
/// their own row's EXPECTED to the right.
pub fn render_table(checks: &[Check]) -> String {
    let one_line = |s: &str| s.replace(['\n', '\r'], " ");
    let width = |f: fn(&Check) -> usize, header: &str, cap: usize| {
        checks
            .iter()
            .map(f)
            .chain([header.chars().count()])
            .max()
            .unwrap_or(0)
            .min(cap)
    };
    let w_name = width(|c| c.name.chars().count(), "CHECK", usize::MAX);
    let w_found = width(|c| c.found.chars().count(), "FOUND", 60);
    let row = |name: &str, result: &str, found: &str, expected: &str| {
        let line = format!("  {name:<w_name$}  {result:<6}  {found:<w_found$}  {expected}");
        format!("{}\n", line.trim_end())
    };
    let mut out = row("CHECK", "RESULT", "FOUND", "EXPECTED");
    for c in checks {
        out.push_str(&row(
            &c.name,
            if c.ok { "pass" } else { "FAIL" },
            &one_line(&c.found),
            &one_line(&c.expected),
        ));
    }
    out
}

// ---------------------------------------------------------------------------------
// The checks
// ---------------------------------------------------------------------------------

struct Verifier<'a> {
    root: RootFs,
    def: &'a ImageDef,
    status: Vec<DpkgPackage>,
    /// Image kernels, newest first.
    kernels: Vec<String>,
    checks: Vec<Check>,
    signatures: Vec<ModuleSignature>,
}

/// What the definition asks of one package, merged over its stages.
struct WantedPackage {
    name: String,
    version: Option<String>,
    hold: bool,
}

impl<'a> Verifier<'a> {
    fn push(&mut self, name: impl Into<String>, ok: bool, found: impl Into<String>, expected: impl Into<String>) {
        self.checks.push(Check {
            name: name.into(),
            ok,
            found: found.into(),
            expected: expected.into(),
        });
    }

    // --- facts of the definition -----------------------------------------------------

    /// The definition's `[expect]`.
    fn expect(&self) -> &'a Expectations {
        &self.def.expect
    }

    /// Packages the definition installs or holds, in stage order; a pin makes a hold
    /// (as provisioning does), the last pin of a name wins.
    fn wanted_packages(&self) -> Vec<WantedPackage> {
        let mut out: Vec<WantedPackage> = Vec::new();
        fn entry<'w>(out: &'w mut Vec<WantedPackage>, name: &str) -> &'w mut WantedPackage {
            match out.iter().position(|w| w.name == name) {
                Some(i) => &mut out[i],
                None => {
                    out.push(WantedPackage {
                        name: name.to_string(),
                        version: None,
                        hold: false,
                    });
                    out.last_mut().unwrap()
                }
            }
        }
        for s in &self.def.stages {
            for p in &s.packages {
                let w = entry(&mut out, &p.name);
                if let Some(v) = &p.version {
                    w.version = Some(v.clone());
                    w.hold = true;
                }
            }
            for h in &s.hold {
                entry(&mut out, h).hold = true;
            }
        }
        out
    }

    // --- facts of the image -------------------------------------------------------

    /// The installed stanza of a package (the first, if several architectures are).
    fn installed(&self, name: &str) -> Option<&DpkgPackage> {
        self.status.iter().find(|p| p.name == name && p.is_installed())
    }

    /// Whether `path` exists, a dangling symlink included.
    fn lexists(&self, path: &str) -> Result<bool> {
        Ok(self.root.exists(path)? || self.root.symlink_metadata(path).is_ok())
    }

    /// The kind of `path` itself (not following a final symlink), none if absent.
    fn kind(&self, path: &str) -> Result<Option<FileKind>> {
        Ok(if self.lexists(path)? {
            Some(self.root.symlink_metadata(path)?.kind)
        } else {
            None
        })
    }

    /// Contents of `path` if it is (or links to) a regular file; none otherwise — so a
    /// config file masked by a symlink to /dev/null reads as absent.
    fn read_regular(&self, path: &str) -> Result<Option<Vec<u8>>> {
        if !self.root.exists(path)? || self.root.metadata(path)?.kind != FileKind::Regular {
            return Ok(None);
        }
        self.root.read(path).map(Some)
    }

    fn read_text(&self, path: &str) -> Result<Option<String>> {
        Ok(self
            .read_regular(path)?
            .map(|b| String::from_utf8_lossy(&b).into_owned()))
    }

    /// Names in `dir`, none if it is not a directory.
    fn list(&self, dir: &str) -> Result<Vec<String>> {
        if self.root.is_dir(dir)? {
            self.root.read_dir(dir)
        } else {
            Ok(Vec::new())
        }
    }

    /// The `*.conf` files of configuration directories as the tools read them: sorted
    /// by file name, the first directory winning a name; (path, text) of each regular
    /// one (masked and unreadable names drop out).
    fn conf_files(&self, dirs: &[&str]) -> Result<Vec<(String, String)>> {
        let mut by_name: BTreeMap<String, String> = BTreeMap::new();
        for d in dirs {
            for n in self.list(d)? {
                if n.ends_with(".conf") {
                    by_name.entry(n.clone()).or_insert_with(|| format!("{d}/{n}"));
                }
            }
        }
        let mut out = Vec::new();
        for path in by_name.into_values() {
            if let Some(text) = self.read_text(&path)? {
                out.push((path, text));
            }
        }
        Ok(out)
    }

    // --- 0. the system ------------------------------------------------------------

    fn system(&mut self, size: u64) -> Result<()> {
        if let Some(want) = &self.expect().os {
            let os = match self.read_text("/etc/os-release")? {
                Some(t) => Some(t),
                None => self.read_text("/usr/lib/os-release")?,
            };
            let (found, ok) = match os.map(|t| parse_os_release(&t)) {
                None => ("no /etc/os-release".to_string(), false),
                Some(m) => {
                    let get = |k: &str| m.get(k).map_or("?", String::as_str).to_string();
                    let ok = get("ID") == want.id
                        && get("VERSION_ID") == want.version_id
                        && want.codename.as_ref().is_none_or(|c| &get("VERSION_CODENAME") == c);
                    (
                        format!("{} {} ({})", get("ID"), get("VERSION_ID"), get("VERSION_CODENAME")),
                        ok,
                    )
                }
            };
            let expected = format!(
                "{} {} ({})",
                want.id,
                want.version_id,
                want.codename.as_deref().unwrap_or("any codename")
            );
            self.push("os release", ok, found, expected);
        }

        if let Some(want) = &self.expect().architecture {
            let arch_file = self.read_text("/var/lib/dpkg/arch")?;
            let arch = dpkg::native_arch(&self.status, arch_file.as_deref());
            let ok = arch.as_ref() == Some(want);
            self.push(
                "architecture",
                ok,
                arch.unwrap_or_else(|| "unknown".into()),
                want.as_str(),
            );
        }

        let want = self.def.disk_size;
        self.push("disk size", size == want, exact_size(size), exact_size(want));
        Ok(())
    }

    // --- 1. packages ------------------------------------------------------------------

    fn packages(&mut self) {
        for w in self.wanted_packages() {
            let stanzas: Vec<&DpkgPackage> = self.status.iter().filter(|p| p.name == w.name).collect();
            let good = |p: &DpkgPackage| {
                p.is_installed() && w.version.as_ref().is_none_or(|v| &p.version == v) && (!w.hold || p.is_held())
            };
            let ok = stanzas.iter().any(|p| good(p));
            let shown = stanzas
                .iter()
                .find(|p| good(p))
                .or_else(|| stanzas.iter().find(|p| p.is_installed()))
                .or_else(|| stanzas.first());
            let found = match shown {
                Some(p) if !p.version.is_empty() => format!("{} ({})", p.version, p.status),
                Some(p) => format!("({})", p.status),
                None => "not installed".to_string(),
            };
            let expected = format!(
                "{} ({})",
                w.version.as_deref().unwrap_or("any version"),
                if w.hold { "hold ok installed" } else { "installed" }
            );
            self.push(format!("package {}", w.name), ok, found, expected);
        }
    }

    /// No installed package matches an `absent_packages` pattern (the precompiled
    /// NVIDIA variant: no compiler, DKMS or kernel headers).
    fn absent_packages(&mut self) {
        for pattern in self.expect().absent_packages.clone() {
            let found: Vec<String> = match glob::Pattern::new(&pattern) {
                Ok(p) => self
                    .status
                    .iter()
                    .filter(|x| x.is_installed() && p.matches(&x.name))
                    .map(|x| format!("{} {}", x.name, x.version))
                    .collect(),
                Err(e) => vec![format!("pattern error: {e}")],
            };
            let shown = if found.is_empty() {
                "none installed".to_string()
            } else {
                found.join(", ")
            };
            self.push(
                format!("package {pattern} absent"),
                found.is_empty(),
                shown,
                "no installed package of that name (expect.absent_packages)",
            );
        }
    }

    // --- 2. kernels and headers -------------------------------------------------------

    fn kernels(&mut self) {
        let found = if self.kernels.is_empty() {
            "none".to_string()
        } else {
            self.kernels.join(", ")
        };
        self.push(
            "kernels",
            !self.kernels.is_empty(),
            found.clone(),
            "a /boot/vmlinuz-K with /lib/modules/K",
        );
        if let Some(k) = self.expect().kernel.clone() {
            // The pinned kernel alone: GRUB boots the newest, so no other may be there.
            self.push(
                "kernel pinned",
                self.kernels == [k.clone()],
                found.clone(),
                format!("{k} only (expect.kernel)"),
            );
        }
        if !self.def.stages.iter().any(|s| s.kernel_headers) {
            return;
        }
        for k in self.kernels.clone() {
            let pkg = format!("linux-headers-{k}");
            let (ok, found) = match self.installed(&pkg) {
                Some(p) => (true, format!("{pkg} {}", p.version)),
                None => (false, format!("{pkg} not installed")),
            };
            self.push(format!("kernel headers {k}"), ok, found, format!("{pkg} installed"));
        }
    }

    // --- 3. kernel modules ----------------------------------------------------------

    fn modules(&mut self) -> Result<()> {
        let mut required: Vec<String> = Vec::new();
        for m in self.def.stages.iter().flat_map(|s| &s.require_modules) {
            if !required.contains(m) {
                required.push(m.clone());
            }
        }
        // The expected driver version, and what the payload's driver package says (shown).
        let driver = self.expect().nvidia_driver_version.clone().map(|want| {
            let package = self.def.payload.gpu.as_ref().and_then(|g| {
                self.installed(&g.driver_package)
                    .map(|p| format!("{} {}", g.driver_package, p.version))
            });
            match package {
                Some(p) => (want.clone(), format!("version={want} ({p})")),
                None => (want.clone(), format!("version={want}")),
            }
        });
        if required.is_empty() && driver.is_none() {
            return Ok(());
        }
        for k in self.kernels.clone() {
            let index = self.index_modules(&k)?;
            let mut infos: HashMap<String, ModInfo> = HashMap::new();
            for m in &required {
                let name = format!("module {m} ({k})");
                let expected = format!("{m}.ko with vermagic={k} ...");
                match self.module_info(&k, &index, m, &mut infos)? {
                    None => self.push(name, false, format!("no {m}.ko under /lib/modules/{k}"), expected),
                    Some((rel, ModInfo::Unreadable(why))) => self.push(name, false, format!("{rel}: {why}"), expected),
                    Some((rel, ModInfo::Read { vermagic, .. })) => match vermagic {
                        None => self.push(name, false, format!("{rel}: no vermagic"), expected),
                        Some(vm) => {
                            let ok = vm == k || vm.starts_with(&format!("{k} "));
                            self.push(name, ok, format!("{rel}: vermagic={}", vm.trim_end()), expected)
                        }
                    },
                }
            }
            if let Some((want, expected)) = &driver {
                let name = format!("nvidia.ko version ({k})");
                let expected = expected.clone();
                match self.module_info(&k, &index, "nvidia", &mut infos)? {
                    None => self.push(name, false, format!("no nvidia.ko under /lib/modules/{k}"), expected),
                    Some((rel, ModInfo::Unreadable(why))) => self.push(name, false, format!("{rel}: {why}"), expected),
                    Some((rel, ModInfo::Read { version, .. })) => {
                        let ok = version.as_ref() == Some(want);
                        let found = match version {
                            Some(v) => format!("{rel}: version={v}"),
                            None => format!("{rel}: no version"),
                        };
                        self.push(name, ok, found, expected)
                    }
                }
            }
        }
        Ok(())
    }

    /// Who signed each NVIDIA module (every file under `updates/dkms`, and the file each
    /// required module loads), checked against `expect.module_signer` when it is set.
    fn module_signatures(&mut self) -> Result<()> {
        let want = self.expect().module_signer.clone();
        let required: Vec<String> = self
            .def
            .stages
            .iter()
            .flat_map(|s| &s.require_modules)
            .cloned()
            .collect();
        for k in self.kernels.clone() {
            let index = self.index_modules(&k)?;
            let mut files: Vec<String> = index
                .values()
                .flatten()
                .filter(|p| p.starts_with("updates/dkms/"))
                .cloned()
                .collect();
            let mut infos = HashMap::new();
            for m in &required {
                if let Some((rel, _)) = self.module_info(&k, &index, m, &mut infos)?
                    && !files.contains(&rel)
                {
                    files.push(rel);
                }
            }
            files.sort();
            for rel in files {
                let path = format!("/lib/modules/{k}/{rel}");
                let read = decompress_module(&rel, self.root.read(&path)?).and_then(|b| modsig::read(&b));
                let (signature, error) = match read {
                    Ok(s) => (s, None),
                    Err(e) => (None, Some(e)),
                };
                let found = match (&signature, &error) {
                    (_, Some(e)) => format!("unreadable: {e}"),
                    (None, None) => "not signed".to_string(),
                    (Some(s), None) => format!(
                        "signed by {} (key {}, {})",
                        s.signer.as_deref().unwrap_or("(no name)"),
                        s.key,
                        s.hash
                    ),
                };
                let signer = signature.as_ref().and_then(|s| s.signer.as_deref());
                let (ok, expected) = match &want {
                    Some(w) => (signer == Some(w.as_str()), format!("signed by {w}")),
                    None => (true, "any (no expect.module_signer)".to_string()),
                };
                self.push(format!("module signature {rel} ({k})"), ok, found, expected);
                self.signatures.push(ModuleSignature {
                    kernel: k.clone(),
                    path,
                    signature,
                    error,
                });
            }
        }
        Ok(())
    }

    /// Modules under /lib/modules/K by normalised name (`-` as `_`), each with the paths
    /// (relative to that directory) of its files. The `build` and `source` symlinks
    /// into the kernel headers are not followed, nor is any other symlink.
    fn index_modules(&self, kernel: &str) -> Result<BTreeMap<String, Vec<String>>> {
        let base = format!("/lib/modules/{kernel}");
        let mut index: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut dirs = vec![String::new()];
        while let Some(rel) = dirs.pop() {
            let dir = if rel.is_empty() {
                base.clone()
            } else {
                format!("{base}/{rel}")
            };
            for name in self.root.read_dir(&dir)? {
                let rel_path = if rel.is_empty() {
                    name.clone()
                } else {
                    format!("{rel}/{name}")
                };
                if let Some(stem) = module_stem(&name) {
                    index.entry(normalize_module(stem)).or_default().push(rel_path);
                } else if self.root.symlink_metadata(&format!("{base}/{rel_path}"))?.kind == FileKind::Directory {
                    dirs.push(rel_path);
                }
            }
        }
        Ok(index)
    }

    /// The file modprobe would load for `module` (DKMS's `updates/` first, then
    /// `extra/`, then the rest) and its modinfo, read once per file.
    fn module_info(
        &self,
        kernel: &str,
        index: &BTreeMap<String, Vec<String>>,
        module: &str,
        cache: &mut HashMap<String, ModInfo>,
    ) -> Result<Option<(String, ModInfo)>> {
        let Some(paths) = index.get(&normalize_module(module)) else {
            return Ok(None);
        };
        let rank = |p: &String| {
            if p.starts_with("updates/") {
                0
            } else if p.starts_with("extra/") {
                1
            } else {
                2
            }
        };
        let rel = paths
            .iter()
            .min_by(|a, b| rank(a).cmp(&rank(b)).then_with(|| a.cmp(b)))
            .unwrap()
            .clone();
        if !cache.contains_key(&rel) {
            let path = format!("/lib/modules/{kernel}/{rel}");
            let info = match decompress_module(&rel, self.root.read(&path)?) {
                Ok(bytes) => ModInfo::Read {
                    vermagic: modinfo_field(&bytes, "vermagic"),
                    version: modinfo_field(&bytes, "version"),
                },
                Err(why) => ModInfo::Unreadable(why),
            };
            cache.insert(rel.clone(), info);
        }
        Ok(Some((rel.clone(), cache[&rel].clone())))
    }

    // --- 4. overlays ------------------------------------------------------------------

    fn overlays(&mut self) -> Result<()> {
        // Destination → the overlay file that lands there last.
        let mut files: BTreeMap<String, PathBuf> = BTreeMap::new();
        for dir in self.def.stages.iter().flat_map(|s| &s.overlays) {
            walk_overlay(dir, dir, &mut files).with_context(|| format!("reading overlay {}", dir.display()))?;
        }
        for (dest, src) in files {
            let shown = src
                .strip_prefix(&self.def.project_root)
                .unwrap_or(&src)
                .display()
                .to_string();
            let md = std::fs::symlink_metadata(&src).with_context(|| format!("reading {}", src.display()))?;
            let name = format!("overlay {dest}");
            if md.file_type().is_symlink() {
                let target = std::fs::read_link(&src)?.display().to_string();
                let found = match self.kind(&dest)? {
                    None => "missing".to_string(),
                    Some(FileKind::Symlink) => format!("symlink to {}", self.root.read_link(&dest)?),
                    Some(k) => format!("{k:?}").to_lowercase(),
                };
                let expected = format!("symlink to {target} ({shown})");
                self.push(name, found == format!("symlink to {target}"), found, expected);
                continue;
            }
            use std::os::unix::fs::PermissionsExt;
            let mode = md.permissions().mode() & 0o7777;
            let want = std::fs::read(&src).with_context(|| format!("reading {}", src.display()))?;
            let expected = format!("content of {shown}, mode {mode:04o}");
            let (ok, found) = match self.kind(&dest)? {
                None => (false, "missing".to_string()),
                Some(FileKind::Regular) => {
                    let have = self.root.read(&dest)?;
                    let have_mode = self.root.symlink_metadata(&dest)?.mode as u32;
                    let same = have == want;
                    let what = if same {
                        "same content".to_string()
                    } else {
                        format!("different content ({} bytes)", have.len())
                    };
                    (same && have_mode == mode, format!("{what}, mode {have_mode:04o}"))
                }
                Some(k) => (
                    false,
                    format!("a {} instead of a file", format!("{k:?}").to_lowercase()),
                ),
            };
            self.push(name, ok, found, expected);
        }
        Ok(())
    }

    // --- 5. the expected configuration -----------------------------------------------

    fn spec_config(&mut self) -> Result<()> {
        let e = self.expect();
        let modprobe = if e.modprobe_blacklist.is_empty() && e.modprobe_options.is_empty() {
            Vec::new()
        } else {
            self.conf_files(&MODPROBE_DIRS)?
        };
        for m in &e.modprobe_blacklist {
            let hit = modprobe.iter().find(|(_, t)| {
                config_lines(t).any(|l| {
                    let w = words(l);
                    w.len() == 2 && w[0] == "blacklist" && normalize_module(w[1]) == normalize_module(m)
                })
            });
            let (ok, found) = match hit {
                Some((p, _)) => (true, format!("blacklist {m} in {p}")),
                None => (false, format!("no `blacklist {m}` in any modprobe.d/*.conf")),
            };
            self.push(
                format!("{m} blacklisted"),
                ok,
                found,
                format!("a /etc/modprobe.d/*.conf with `blacklist {m}`"),
            );
        }
        for (module, params) in &e.modprobe_options {
            let conf = format!("/etc/modprobe.d/{module}.conf");
            for (param, want) in params {
                let (ok, found) = modprobe_option(&modprobe, module, &conf, param, want);
                self.push(
                    format!("modprobe {module} {param}"),
                    ok,
                    found,
                    format!("options {module} {param}={want} in {conf}"),
                );
            }
        }

        if !e.modules_load.is_empty() {
            let loads = self.conf_files(&MODULES_LOAD_DIRS)?;
            for m in &e.modules_load {
                let hit = loads
                    .iter()
                    .find(|(_, t)| config_lines(t).any(|l| normalize_module(l) == normalize_module(m)));
                let (ok, found) = match hit {
                    Some((p, _)) => (true, format!("listed in {p}")),
                    None => (false, "not in any modules-load.d/*.conf".to_string()),
                };
                self.push(
                    format!("modules-load {m}"),
                    ok,
                    found,
                    "listed in /etc/modules-load.d/*.conf",
                );
            }
        }

        if !e.sysctl.is_empty() {
            let values = sysctl_values(&self.conf_files(&SYSCTL_DIRS)?);
            for (key, want) in &e.sysctl {
                let (ok, found) = match values.get(key) {
                    Some((v, p)) => (&words(v).join(" ") == want, format!("{v} ({p})")),
                    None => (false, "not set".to_string()),
                };
                self.push(
                    format!("sysctl {key}"),
                    ok,
                    found,
                    format!("{want} (in /etc/sysctl.d/*.conf)"),
                );
            }
        }

        self.containerd_config()?;
        self.runtime_classes()?;

        for (package, min) in &e.min_versions {
            self.min_version(&format!("{package} version"), package, min);
        }
        if let Some(k) = &e.kubernetes {
            for p in &k.packages {
                let (ok, found) = match self.installed(p) {
                    Some(i) => (upstream_version(&i.version) == k.version, i.version.clone()),
                    None => (false, "not installed".to_string()),
                };
                self.push(format!("{p} version"), ok, found, format!("{} (upstream)", k.version));
            }
        }
        for c in &e.commands {
            let mut found = None;
            for d in PATH_DIRS {
                let p = format!("{d}/{c}");
                if self.root.exists(&p)? {
                    let md = self.root.metadata(&p)?;
                    if md.kind == FileKind::Regular && md.mode & 0o111 != 0 {
                        found = Some(p);
                        break;
                    }
                }
            }
            let ok = found.is_some();
            self.push(
                format!("command {c}"),
                ok,
                found.unwrap_or_else(|| "not found".to_string()),
                format!("an executable {c} in {}", PATH_DIRS.join(":")),
            );
        }
        Ok(())
    }

    /// `package` installed at an upstream version of at least `min`.
    fn min_version(&mut self, name: &str, package: &str, min: &str) {
        let (ok, found) = match self.installed(package) {
            Some(p) => {
                let ok = dpkg_version_cmp(upstream_version(&p.version), min) != Ordering::Less;
                (ok, format!("{} {}", p.name, p.version))
            }
            None => (false, format!("{package} not installed")),
        };
        self.push(name, ok, found, format!(">= {min}"));
    }

    /// containerd's config (`expect.containerd`): runc with the expected cgroup driver,
    /// the expected socket and each expected runtime next to runc.
    fn containerd_config(&mut self) -> Result<()> {
        let Some(want) = &self.expect().containerd else {
            return Ok(());
        };
        let cfg = want.config.as_str();
        let socket = want.socket.as_str();
        let mut names = vec!["containerd SystemdCgroup".to_string(), "containerd socket".to_string()];
        let mut expected = vec![
            format!("SystemdCgroup = {} for the runc runtime in {cfg}", want.systemd_cgroup),
            format!("grpc address = \"{socket}\""),
        ];
        for (rt, binary) in &want.runtimes {
            names.push(format!("containerd {rt} runtime"));
            expected.push(format!(
                "runtimes.{rt} with BinaryName = \"{binary}\", runtimes.runc kept"
            ));
        }
        let config = match self.read_text(cfg)? {
            None => Err(format!("no {cfg}")),
            Some(t) => t
                .parse::<toml::Table>()
                .map_err(|e| format!("{cfg} is not TOML: {}", e.to_string().lines().next().unwrap_or(""))),
        };
        let config = match config {
            Ok(c) => c,
            Err(why) => {
                for (n, x) in names.into_iter().zip(expected) {
                    self.push(n, false, why.clone(), x);
                }
                return Ok(());
            }
        };
        let runtimes = find_table(&config, "runtimes");
        let runtime = |name: &str| {
            runtimes
                .as_ref()
                .and_then(|(t, _)| t.get(name))
                .and_then(toml::Value::as_table)
        };
        let option = |rt: &str, key: &str| {
            runtime(rt)
                .and_then(|t| t.get("options"))
                .and_then(|o| o.get(key))
                .cloned()
        };

        let (ok, found) = match option("runc", "SystemdCgroup") {
            Some(v) => (
                v.as_bool() == Some(want.systemd_cgroup),
                format!("SystemdCgroup = {v} (runtimes.runc.options)"),
            ),
            None if runtime("runc").is_none() => (false, "no runc runtime".to_string()),
            None => (false, "SystemdCgroup not set for runc".to_string()),
        };
        self.push(names[0].clone(), ok, found, expected[0].clone());

        let (ok, found) = match config.get("grpc").and_then(|g| g.get("address")) {
            Some(toml::Value::String(a)) => (a == socket, format!("address = \"{a}\"")),
            Some(v) => (false, format!("address = {v}")),
            None => (
                socket == DEFAULT_CONTAINERD_SOCKET,
                format!("grpc.address not set (containerd's default {DEFAULT_CONTAINERD_SOCKET})"),
            ),
        };
        self.push(names[1].clone(), ok, found, expected[1].clone());

        for (i, (rt, binary)) in want.runtimes.iter().enumerate() {
            let have = option(rt, "BinaryName");
            let ok = have.as_ref().and_then(toml::Value::as_str) == Some(binary.as_str()) && runtime("runc").is_some();
            let found = format!(
                "{rt} BinaryName = {}, runc {}",
                have.map_or_else(
                    || if runtime(rt).is_some() {
                        "unset".into()
                    } else {
                        format!("(no {rt} runtime)")
                    },
                    |b| b.to_string()
                ),
                if runtime("runc").is_some() {
                    "present"
                } else {
                    "missing"
                }
            );
            self.push(names[2 + i].clone(), ok, found, expected[2 + i].clone());
        }
        Ok(())
    }

    /// For each expected RuntimeClass, a manifest of it (with the expected handler)
    /// under /usr/local/share/kubernetes.
    fn runtime_classes(&mut self) -> Result<()> {
        if self.expect().runtime_classes.is_empty() {
            return Ok(());
        }
        let mut files = Vec::new();
        let mut dirs = vec![MANIFEST_DIR.to_string()];
        while let Some(d) = dirs.pop() {
            for n in self.list(&d)? {
                let p = format!("{d}/{n}");
                match self.root.metadata(&p).map(|m| m.kind) {
                    Ok(FileKind::Directory) => dirs.push(p),
                    Ok(FileKind::Regular) if [".yaml", ".yml", ".json"].iter().any(|e| n.ends_with(e)) => files.push(p),
                    _ => {}
                }
            }
        }
        files.sort();
        let mut texts = Vec::new();
        for p in &files {
            texts.push((p.clone(), self.read_text(p)?.unwrap_or_default()));
        }
        for (name, want) in &self.expect().runtime_classes {
            let mut found = format!("none among {} manifest(s) under {MANIFEST_DIR}", files.len());
            let mut ok = false;
            for (p, text) in &texts {
                if let Some(handler) = runtime_class_handler(text, name) {
                    ok = &handler == want;
                    found = format!("{p} (handler {handler})");
                    if ok {
                        break;
                    }
                }
            }
            self.push(
                format!("RuntimeClass {name}"),
                ok,
                found,
                format!("a RuntimeClass named {name}, handler {want}, under {MANIFEST_DIR}"),
            );
        }
        Ok(())
    }

    // --- 6. swap and units ------------------------------------------------------------

    fn units(&mut self) -> Result<()> {
        let e = self.expect();
        if e.swap_off {
            let (ok, found) = match self.read_text("/etc/fstab")? {
                None => (true, "no /etc/fstab".to_string()),
                Some(t) => {
                    let swaps: Vec<&str> = config_lines(&t).filter(|l| words(l).get(2) == Some(&"swap")).collect();
                    match swaps.first() {
                        None => (true, "no swap entries".to_string()),
                        Some(l) => (
                            false,
                            format!(
                                "{} swap entr{}: {l}",
                                swaps.len(),
                                if swaps.len() == 1 { "y" } else { "ies" }
                            ),
                        ),
                    }
                }
            };
            self.push("fstab swap", ok, found, "no swap entries in /etc/fstab");
        }

        for unit in &e.masked_units {
            let path = format!("{SYSTEMD_ETC}/{unit}");
            let (ok, found) = self.symlink_check(&path, &["/dev/null"])?;
            self.push(format!("{unit} masked"), ok, found, format!("{path} -> /dev/null"));
        }

        // The *.wants and *.requires directories of /etc/systemd/system.
        let link_dirs: Vec<String> = self
            .list(SYSTEMD_ETC)?
            .into_iter()
            .filter(|n| n.ends_with(".wants") || n.ends_with(".requires"))
            .map(|n| format!("{SYSTEMD_ETC}/{n}"))
            .filter(|d| self.root.is_dir(d).unwrap_or(false))
            .collect();
        for unit in &e.enabled_units {
            let (ok, found) = self.enabled_check(&link_dirs, unit)?;
            self.push(
                format!("{unit} enabled"),
                ok,
                found,
                format!("a link in {SYSTEMD_ETC}/*.wants/ to the installed unit, not masked"),
            );
        }
        for unit in &e.disabled_units {
            let mut links = Vec::new();
            for d in &link_dirs {
                let link = format!("{d}/{unit}");
                if self.lexists(&link)? {
                    links.push(link.trim_start_matches(&format!("{SYSTEMD_ETC}/")).to_string());
                }
            }
            let mask = format!("{SYSTEMD_ETC}/{unit}");
            let masked = self.kind(&mask)? == Some(FileKind::Symlink) && self.root.read_link(&mask)? == "/dev/null";
            let found = if !links.is_empty() {
                format!("enabled ({})", listing(&links, ""))
            } else if masked {
                "masked".to_string()
            } else {
                "disabled".to_string()
            };
            self.push(
                format!("{unit} disabled"),
                links.is_empty(),
                found,
                format!("no link in {SYSTEMD_ETC}/*.wants/ (disabled or masked)"),
            );
        }
        for unit in &e.fail_soft_units {
            let (ok, found) = match self.unit_file(unit)? {
                Some(p) => (true, p),
                None => (false, "no unit file".to_string()),
            };
            self.push(
                format!("{unit} installed"),
                ok,
                found,
                "a unit file (it must not fail where its hardware is absent: boot-test)",
            );
        }
        for (unit, want) in &e.exec_start {
            let (ok, found) = match self.exec_start_of(unit)? {
                None => (false, "no unit file".to_string()),
                Some((cmd, from)) => {
                    let have = words(&cmd);
                    let ok = want.iter().all(|w| match w.strip_prefix('!') {
                        Some(absent) => !have.contains(&absent),
                        None => have.contains(&w.as_str()),
                    });
                    (ok, format!("{cmd} ({from})"))
                }
            };
            self.push(
                format!("{unit} ExecStart"),
                ok,
                found,
                format!("ExecStart= with {} (unit file and drop-ins)", want.join(" ")),
            );
        }
        Ok(())
    }

    /// The unit file systemd loads for `unit`: the first of the unit directories that
    /// has it as a regular file (a mask reads as none).
    fn unit_file(&self, unit: &str) -> Result<Option<String>> {
        for d in UNIT_DIRS {
            let p = format!("{d}/{unit}");
            if self.read_regular(&p)?.is_some() {
                return Ok(Some(p));
            }
        }
        Ok(None)
    }

    /// The effective `ExecStart=` of `unit` as systemd reads it: the unit file, then the
    /// `*.conf` drop-ins of `unit.d/` in every unit directory, sorted by file name (the
    /// first directory winning a name); an empty assignment resets the list. Returns
    /// the command lines joined with ` ; ` and the files that set them.
    fn exec_start_of(&self, unit: &str) -> Result<Option<(String, String)>> {
        let Some(main) = self.unit_file(unit)? else {
            return Ok(None);
        };
        let dropin_dirs: Vec<String> = UNIT_DIRS.iter().map(|d| format!("{d}/{unit}.d")).collect();
        let dropin_refs: Vec<&str> = dropin_dirs.iter().map(String::as_str).collect();
        let mut files = vec![(main.clone(), self.read_text(&main)?.unwrap_or_default())];
        files.extend(self.conf_files(&dropin_refs)?);
        let mut cmds: Vec<String> = Vec::new();
        let mut from: Vec<String> = Vec::new();
        for (path, text) in &files {
            let mut section = String::new();
            // Backslash-newline continues a line.
            let joined = text.replace("\\\n", " ");
            for l in config_lines(&joined) {
                if l.starts_with('[') {
                    section = l.to_string();
                    continue;
                }
                if section != "[Service]" {
                    continue;
                }
                if let Some((k, v)) = l.split_once('=')
                    && k.trim() == "ExecStart"
                {
                    let v = v.trim();
                    if v.is_empty() {
                        cmds.clear();
                        from.clear();
                    } else {
                        cmds.push(v.trim_start_matches(['-', '@', ':', '+', '!']).to_string());
                        if !from.contains(path) {
                            from.push(path.clone());
                        }
                    }
                }
            }
        }
        if cmds.is_empty() {
            return Ok(Some(("no ExecStart".to_string(), main)));
        }
        Ok(Some((cmds.join(" ; "), from.join(", "))))
    }

    /// Whether `unit` is enabled as `systemctl enable` does it: a symlink named `unit`
    /// in a `*.wants`/`*.requires` directory, leading to an existing unit file, and
    /// the unit not masked. (ok, what was found).
    fn enabled_check(&self, link_dirs: &[String], unit: &str) -> Result<(bool, String)> {
        let mask = format!("{SYSTEMD_ETC}/{unit}");
        if self.kind(&mask)? == Some(FileKind::Symlink) && self.root.read_link(&mask)? == "/dev/null" {
            return Ok((false, format!("masked ({mask} -> /dev/null)")));
        }
        let mut dangling = None;
        for d in link_dirs {
            let link = format!("{d}/{unit}");
            match self.kind(&link)? {
                None => {}
                Some(FileKind::Symlink) => {
                    let target = self.root.read_link(&link)?;
                    let dir = d.rsplit('/').next().unwrap_or(d);
                    if self.root.exists(&link)? {
                        return Ok((true, format!("{dir}/{unit} -> {target}")));
                    }
                    dangling.get_or_insert(format!("{dir}/{unit} -> {target}, which does not exist"));
                }
                Some(k) => {
                    dangling.get_or_insert(format!("{link} is a {} (not a link)", format!("{k:?}").to_lowercase()));
                }
            }
        }
        Ok((
            false,
            dangling.unwrap_or_else(|| format!("not enabled (no {SYSTEMD_ETC}/*.wants/{unit})")),
        ))
    }

    /// Whether `path` is a symlink to one of `targets`, and what it is.
    fn symlink_check(&self, path: &str, targets: &[&str]) -> Result<(bool, String)> {
        Ok(match self.kind(path)? {
            None => (false, "absent".to_string()),
            Some(FileKind::Symlink) => {
                let t = self.root.read_link(path)?;
                (targets.contains(&t.as_str()), format!("symlink to {t}"))
            }
            Some(k) => (false, format!("{k:?}").to_lowercase()),
        })
    }

    // --- 7. scrubbed identity ---------------------------------------------------------

    fn identity(&mut self) -> Result<()> {
        let (ok, found) = match self.kind("/etc/machine-id")? {
            None => (false, "absent".to_string()),
            Some(FileKind::Regular) => {
                let size = self.root.symlink_metadata("/etc/machine-id")?.size;
                (size == 0, format!("{size} bytes"))
            }
            Some(k) => (false, format!("{k:?}").to_lowercase()),
        };
        self.push("machine-id empty", ok, found, "/etc/machine-id present, 0 bytes");

        // The host name: cloud-init sets it at boot; the image names no machine (the
        // base's builder, say). Absent, empty or `localhost`.
        let (ok, found) = match self.kind("/etc/hostname")? {
            None => (true, "absent".to_string()),
            Some(FileKind::Regular) => {
                let t = self.read_text("/etc/hostname")?.unwrap_or_default();
                let name = t.trim();
                (
                    name.is_empty() || NEUTRAL_HOSTNAMES.contains(&name),
                    if name.is_empty() {
                        "empty".to_string()
                    } else {
                        name.to_string()
                    },
                )
            }
            Some(k) => (false, format!("{k:?}").to_lowercase()),
        };
        self.push(
            "hostname neutral",
            ok,
            found,
            format!("/etc/hostname empty, absent or one of {}", NEUTRAL_HOSTNAMES.join(", ")),
        );

        // /etc/hosts: no entry for the machine's own name (127.0.1.1, Debian's
        // convention, which cloud-init writes at boot when it manages the file), and
        // only loopback names on loopback addresses.
        let (ok, found) = match self.read_text("/etc/hosts")? {
            None => (true, "no /etc/hosts".to_string()),
            Some(t) => {
                let own: Vec<&str> = config_lines(&t)
                    .filter(|l| {
                        let w = words(l);
                        w.first().is_some_and(|a| a.starts_with("127.") && *a != "127.0.0.1")
                            || (w.first() == Some(&"127.0.0.1") && w[1..].iter().any(|n| !n.starts_with("localhost")))
                    })
                    .collect();
                match own.first() {
                    None => (true, "loopback names only".to_string()),
                    Some(l) => (false, (*l).to_string()),
                }
            }
        };
        self.push(
            "hosts names no host",
            ok,
            found,
            "no 127.0.1.1 (or other host) entry in /etc/hosts",
        );

        let present = self.lexists("/etc/mailname")?;
        let found = match self.read_text("/etc/mailname")? {
            Some(t) => format!("present: {}", t.trim()),
            None if present => "present".to_string(),
            None => "absent".to_string(),
        };
        self.push("mailname absent", !present, found, "no /etc/mailname");

        let p = "/var/lib/dbus/machine-id";
        let present = self.lexists(p)?;
        self.push(
            "dbus machine-id absent",
            !present,
            if present { "present" } else { "absent" },
            format!("no {p}"),
        );

        let keys: Vec<String> = self
            .list("/etc/ssh")?
            .into_iter()
            .filter(|n| n.starts_with("ssh_host_"))
            .collect();
        self.push(
            "ssh host keys",
            keys.is_empty(),
            listing(&keys, "none"),
            "no /etc/ssh/ssh_host_*",
        );

        // A Machine Owner Key's private half signs kernel modules that Secure Boot then
        // trusts; whoever has the image would have the key. DKMS generates one when it
        // builds a module and none exists (kiln keeps it from doing so), and a build
        // with --module-signing-key removes the user's.
        let keys = [MOK_KEY, DKMS3_KEY];
        let mut present = Vec::new();
        for p in keys {
            if self.lexists(p)? {
                present.push(p.to_string());
            }
        }
        self.push(
            "no module signing key",
            present.is_empty(),
            listing(&present, "absent"),
            format!("no {}", keys.join(", no ")),
        );

        let mut homes = vec!["/root".to_string()];
        homes.extend(self.list("/home")?.into_iter().map(|n| format!("/home/{n}")));
        let mut histories = Vec::new();
        for h in homes {
            let p = format!("{h}/.bash_history");
            if self.lexists(&p)? {
                histories.push(p);
            }
        }
        self.push(
            "shell history",
            histories.is_empty(),
            listing(&histories, "none"),
            "no .bash_history in /root or /home/*",
        );

        let cloud = self.list("/var/lib/cloud")?;
        self.push(
            "cloud-init state",
            cloud.is_empty(),
            listing(&cloud, "empty or absent"),
            "/var/lib/cloud empty or absent",
        );

        let (ok, found) = match self.read_text("/etc/shadow")? {
            None => (false, "no /etc/shadow".to_string()),
            Some(t) => {
                let usable: Vec<String> = t
                    .lines()
                    .filter_map(|l| {
                        let mut f = l.split(':');
                        let (user, pw) = (f.next()?, f.next()?);
                        (!pw.starts_with('!') && !pw.starts_with('*')).then(|| user.to_string())
                    })
                    .collect();
                (
                    usable.is_empty(),
                    if usable.is_empty() {
                        "every account locked".into()
                    } else {
                        format!("usable password: {}", usable.join(", "))
                    },
                )
            }
        };
        self.push(
            "shadow passwords",
            ok,
            found,
            "no usable password (every field starts with ! or *)",
        );

        let present = self.lexists(POLICY_RC_D)?;
        self.push(
            "policy-rc.d absent",
            !present,
            if present { "present" } else { "absent" },
            format!("no {POLICY_RC_D}"),
        );

        let (ok, found) = self.symlink_check(
            "/etc/resolv.conf",
            &[RESOLV_TARGET, RESOLV_TARGET.trim_start_matches("..")],
        )?;
        self.push("resolv.conf symlink", ok, found, format!("symlink to {RESOLV_TARGET}"));

        let lists: Vec<String> = self
            .list("/var/lib/apt/lists")?
            .into_iter()
            .filter(|n| n.contains("_Packages"))
            .collect();
        self.push(
            "apt lists",
            lists.is_empty(),
            listing(&lists, "no package indexes"),
            "no /var/lib/apt/lists/*_Packages",
        );

        let tmp = self.list("/tmp")?;
        self.push("tmp empty", tmp.is_empty(), listing(&tmp, "empty"), "/tmp empty");

        let mut left = Vec::new();
        for p in BUILD_LEFTOVERS {
            if self.lexists(p)? {
                left.push(p.to_string());
            }
        }
        self.push(
            "build leftovers",
            left.is_empty(),
            listing(&left, "none"),
            format!("no {}", BUILD_LEFTOVERS.join(", ")),
        );

        let (ok, found) = match self.read_text(INITRAMFS_CONF)? {
            None => (false, format!("no {INITRAMFS_CONF}")),
            Some(t) => {
                let value = config_lines(&t)
                    .filter_map(|l| l.strip_prefix("update_initramfs="))
                    .last();
                match value {
                    Some(v) => (v.trim() == "yes", format!("update_initramfs={}", v.trim())),
                    None => (false, "update_initramfs not set".to_string()),
                }
            }
        };
        self.push(
            "initramfs updates",
            ok,
            found,
            format!("update_initramfs=yes in {INITRAMFS_CONF}"),
        );

        for k in self.kernels.clone() {
            let p = format!("/boot/initrd.img-{k}");
            let present = self.root.exists(&p)?;
            self.push(
                format!("initrd {k}"),
                present,
                if present { "present" } else { "missing" },
                p,
            );
        }
        Ok(())
    }

    // --- 8. third-party repositories --------------------------------------------------

    fn repositories(&mut self) -> Result<()> {
        for r in self.def.repositories.clone() {
            let path = format!("/etc/apt/sources.list.d/{}.list", r.id);
            let comps = r.components.iter().map(|c| format!(" {c}")).collect::<String>();
            let expected = format!(
                "deb [signed-by=KEYFILE] {} {}{comps}, KEYFILE holding {}",
                r.uri, r.suite, r.key
            );
            let Some(text) = self.read_text(&path)? else {
                self.push(format!("repository {}", r.id), false, format!("no {path}"), expected);
                continue;
            };
            let host_key = std::fs::read(self.def.project_root.join(&r.key)).ok();
            let mut best: Option<(Vec<String>, String)> = None;
            for line in config_lines(&text).filter(|l| l.starts_with("deb ") || l.starts_with("deb\t")) {
                let Some(deb) = parse_deb_line(line) else { continue };
                let mut problems = Vec::new();
                if deb.uri.trim_end_matches('/') != r.uri.trim_end_matches('/') {
                    problems.push("not the definition's URI".to_string());
                }
                if deb.suite != r.suite || deb.components != r.components {
                    problems.push("other suite or components".to_string());
                }
                match &deb.signed_by {
                    None => problems.push("no signed-by".to_string()),
                    Some(key) => match self.read_regular(key)? {
                        None => problems.push(format!("key {key} missing")),
                        Some(have) if host_key.as_ref().is_some_and(|h| h != &have) => {
                            problems.push(format!("key {key} differs from {}", r.key))
                        }
                        Some(_) => {}
                    },
                }
                if best.as_ref().is_none_or(|(p, _)| problems.len() < p.len()) {
                    best = Some((problems, line.to_string()));
                }
            }
            let (ok, found) = match best {
                None => (false, format!("no deb line in {path}")),
                Some((problems, line)) if problems.is_empty() => (true, line),
                Some((problems, line)) => (false, format!("{line} ({})", problems.join("; "))),
            };
            self.push(format!("repository {}", r.id), ok, found, expected);
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------

/// What a module file's `.modinfo` says, or why it could not be read.
#[derive(Debug, Clone)]
enum ModInfo {
    Read {
        vermagic: Option<String>,
        version: Option<String>,
    },
    Unreadable(String),
}

/// Up to five names, then a count.
fn listing(names: &[String], empty: &str) -> String {
    match names.len() {
        0 => empty.to_string(),
        n if n <= 5 => names.join(", "),
        n => format!("{} and {} more", names[..5].join(", "), n - 5),
    }
}

/// Lines of a config file without blank lines and `#`/`;` comments, trimmed.
fn config_lines(text: &str) -> impl Iterator<Item = &str> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with(';'))
}

fn words(line: &str) -> Vec<&str> {
    line.split_whitespace().collect()
}

/// Kernel module names treat `-` and `_` alike.
fn normalize_module(name: &str) -> String {
    name.trim().replace('-', "_")
}

/// `nvidia-uvm` of `nvidia-uvm.ko`, `nvidia-uvm.ko.zst`, ...; none for other names.
fn module_stem(file: &str) -> Option<&str> {
    MODULE_SUFFIXES
        .iter()
        .find_map(|s| file.strip_suffix(s))
        .filter(|s| !s.is_empty())
}

/// The bytes of a module file, decompressed (xz and gzip; zstd is reported, kiln has
/// no zstd decoder). The error says why it can't be checked.
pub fn decompress_module(name: &str, raw: Vec<u8>) -> std::result::Result<Vec<u8>, String> {
    let mut out = Vec::new();
    if name.ends_with(".ko.xz") {
        xz2::read::XzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map_err(|e| format!("xz-compressed, does not decompress ({e})"))?;
        Ok(out)
    } else if name.ends_with(".ko.gz") {
        flate2::read::GzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map_err(|e| format!("gzip-compressed, does not decompress ({e})"))?;
        Ok(out)
    } else if name.ends_with(".ko.zst") {
        Err("compressed (zstd), not checked".to_string())
    } else {
        Ok(raw)
    }
}

/// The body of the section named `want` of a 64-bit little-endian ELF file.
fn elf_section<'d>(data: &'d [u8], want: &str) -> Option<&'d [u8]> {
    if data.get(..6)? != b"\x7fELF\x02\x01" {
        return None;
    }
    fn int(data: &[u8], at: usize, len: usize) -> Option<usize> {
        let b = data.get(at..at.checked_add(len)?)?;
        let v = b.iter().rev().fold(0u64, |acc, &x| (acc << 8) | u64::from(x));
        usize::try_from(v).ok()
    }
    let (shoff, shentsize, shnum, shstrndx) = (
        int(data, 0x28, 8)?,
        int(data, 0x3a, 2)?,
        int(data, 0x3c, 2)?,
        int(data, 0x3e, 2)?,
    );
    if shentsize < 0x40 {
        return None;
    }
    // (name offset, body) of section i.
    let section = |i: usize| -> Option<(usize, &'d [u8])> {
        let h = shoff.checked_add(i.checked_mul(shentsize)?)?;
        let (name, off, size) = (int(data, h, 4)?, int(data, h + 0x18, 8)?, int(data, h + 0x20, 8)?);
        Some((name, data.get(off..off.checked_add(size)?)?))
    };
    let (_, names) = section(shstrndx)?;
    (0..shnum).find_map(|i| {
        let (name_at, body) = section(i)?;
        let name = names.get(name_at..)?;
        let name = &name[..name.iter().position(|&b| b == 0)?];
        (name == want.as_bytes()).then_some(body)
    })
}

/// A `key=value` field of a module's modinfo (`vermagic`, `version`, ...): searched in
/// the ELF `.modinfo` section (the whole file if there is none) as `key=` not preceded
/// by a name character — so `version` is never `srcversion` — and read up to the NUL.
pub fn modinfo_field(module: &[u8], key: &str) -> Option<String> {
    let area = elf_section(module, ".modinfo").unwrap_or(module);
    let needle = format!("{key}=");
    let needle = needle.as_bytes();
    let mut from = 0;
    while let Some(i) = area.get(from..)?.windows(needle.len()).position(|w| w == needle) {
        let at = from + i;
        let boundary = at == 0 || !(area[at - 1].is_ascii_alphanumeric() || area[at - 1] == b'_');
        if boundary {
            let value = &area[at + needle.len()..];
            let end = value.iter().position(|&b| b == 0).unwrap_or(value.len());
            return Some(String::from_utf8_lossy(&value[..end]).into_owned());
        }
        from = at + 1;
    }
    None
}

/// Overlay files and symlinks under `dir`, as image paths → host paths.
fn walk_overlay(top: &Path, dir: &Path, out: &mut BTreeMap<String, PathBuf>) -> Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)?.collect::<std::io::Result<_>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let p = e.path();
        let md = std::fs::symlink_metadata(&p)?;
        if md.is_dir() {
            walk_overlay(top, &p, out)?;
        } else if md.is_file() || md.file_type().is_symlink() {
            out.insert(format!("/{}", p.strip_prefix(top).unwrap().display()), p);
        }
    }
    Ok(())
}

/// The effective value of `options MODULE PARAM=...` over the modprobe files (in the
/// order modprobe reads them, the last setting winning), which must be `want` and set
/// in `conf` (/etc/modprobe.d/MODULE.conf). (ok, what was found).
fn modprobe_option(files: &[(String, String)], module: &str, conf: &str, param: &str, want: &str) -> (bool, String) {
    let mut effective: Option<(String, &str)> = None;
    let mut in_conf: Option<String> = None;
    for (path, text) in files {
        for line in config_lines(text) {
            let w = words(line);
            if w.len() < 3 || w[0] != "options" || normalize_module(w[1]) != normalize_module(module) {
                continue;
            }
            for (k, v) in w[2..].iter().filter_map(|t| t.split_once('=')) {
                if k == param {
                    effective = Some((v.to_string(), path));
                    if path == conf {
                        in_conf = Some(v.to_string());
                    }
                }
            }
        }
    }
    match effective {
        None => (
            false,
            format!("{param} not set (no `options {module} {param}=...` in modprobe.d)"),
        ),
        Some((v, path)) => {
            let ok = v == want && in_conf.as_deref() == Some(want);
            let note = match &in_conf {
                Some(_) if path == conf => String::new(),
                Some(n) => format!("; {conf} sets {n}"),
                None => format!("; not in {conf}"),
            };
            (ok, format!("{param}={v} ({path}{note})"))
        }
    }
}

/// Sysctl settings over the sysctl.d files in reading order, the last winning:
/// key (with `/` as `.`) → (value, file).
fn sysctl_values(files: &[(String, String)]) -> BTreeMap<String, (String, String)> {
    let mut out = BTreeMap::new();
    for (path, text) in files {
        for line in config_lines(text) {
            if let Some((k, v)) = line.trim_start_matches('-').split_once('=') {
                out.insert(k.trim().replace('/', "."), (v.trim().to_string(), path.clone()));
            }
        }
    }
    out
}

/// Depth-first, the first table stored under `key` (e.g. containerd's `runtimes`,
/// wherever the config version puts it) and its dotted path.
fn find_table<'t>(t: &'t toml::Table, key: &str) -> Option<(&'t toml::Table, String)> {
    if let Some(found) = t.get(key).and_then(toml::Value::as_table) {
        return Some((found, key.to_string()));
    }
    t.iter().find_map(|(k, v)| {
        let (found, path) = find_table(v.as_table()?, key)?;
        Some((found, format!("{k}.{path}")))
    })
}

/// If `text` (YAML, possibly several documents, or JSON) holds a RuntimeClass named
/// `name`, its handler (empty if it has none).
fn runtime_class_handler(text: &str, name: &str) -> Option<String> {
    let unquote = |v: &str| v.trim().trim_matches(['"', '\'']).to_string();
    if text.trim_start().starts_with('{') {
        let v: serde_json::Value = serde_json::from_str(text).ok()?;
        let named = v["kind"] == "RuntimeClass" && v["metadata"]["name"] == name;
        return named.then(|| v["handler"].as_str().unwrap_or("").to_string());
    }
    let mut docs = vec![Vec::new()];
    for line in text.lines() {
        if line.trim_end() == "---" {
            docs.push(Vec::new());
        } else {
            docs.last_mut().unwrap().push(line);
        }
    }
    docs.into_iter().find_map(|doc| {
        let (mut kind, mut named, mut handler, mut in_metadata) = (false, false, String::new(), false);
        for line in doc {
            let t = line.trim();
            if t.is_empty() || t.starts_with('#') {
                continue;
            }
            let top = !line.starts_with([' ', '\t']);
            let Some((k, v)) = t.split_once(':') else { continue };
            if top {
                in_metadata = k == "metadata";
                match k {
                    "kind" => kind = unquote(v) == "RuntimeClass",
                    "handler" => handler = unquote(v),
                    _ => {}
                }
            } else if in_metadata && k == "name" {
                named = unquote(v) == name;
            }
        }
        (kind && named).then_some(handler)
    })
}

/// A one-line-style `deb [options] URI SUITE [COMPONENTS...]`.
struct DebLine {
    signed_by: Option<String>,
    uri: String,
    suite: String,
    components: Vec<String>,
}

fn parse_deb_line(line: &str) -> Option<DebLine> {
    let rest = line.strip_prefix("deb")?.trim_start();
    let (options, rest) = match rest.strip_prefix('[') {
        Some(r) => r.split_once(']')?,
        None => ("", rest),
    };
    let signed_by = options
        .split_whitespace()
        .find_map(|o| o.strip_prefix("signed-by="))
        .map(|v| v.split(',').next().unwrap_or(v).to_string());
    let mut w = rest.split_whitespace();
    let (uri, suite) = (w.next()?.to_string(), w.next()?.to_string());
    Some(DebLine {
        signed_by,
        uri,
        suite,
        components: w.map(str::to_string).collect(),
    })
}

// ---------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::cmd::Cmd;
    use crate::image::inspect::test_images::{OS_RELEASE, to_qcow2, tool};
    use std::os::unix::fs::{PermissionsExt, symlink};
    use tempfile::TempDir;

    const K_OLD: &str = "5.15.0-91-generic";
    const K_NEW: &str = "6.8.0-49-generic";
    const KEY: &str = "-----BEGIN PGP PUBLIC KEY BLOCK-----\n\nmDMEZtest\n-----END PGP PUBLIC KEY BLOCK-----\n";

    /// A small GPU image definition shaped like the real NVIDIA one; the overlays are
    /// the project's own (copied), so the spec checks read the real configuration.
    const X_TOML: &str = r#"
name = "x-gpu"
description = "test image"
disk_size = "1G"
[payload]
uri = "https://example.invalid/{name}.raw"
[payload.gpu]
vendor = "NVIDIA"
models = ["A100"]
driver_package = "nvidia-driver-565-server"
[[repository]]
id = "kubernetes"
uri = "https://pkgs.k8s.io/core:/stable:/v1.30/deb/"
suite = "/"
key = "keys/kubernetes.asc"
[[stage]]
name = "system-update"
packages = ["base"]
[[stage]]
name = "gpu-prerequisites"
packages = ["gpu"]
kernel_headers = true
overlays = ["gpu-prerequisites"]
[[stage]]
name = "nvidia-driver"
packages = ["nvidia"]
overlays = ["nvidia"]
require_modules = ["nvidia", "nvidia-uvm", "nvidia-modeset", "nvidia-drm"]
[[stage]]
name = "kubernetes-tools"
repositories = ["kubernetes"]
packages = ["container-runtime", "kubernetes"]
hold = ["kubelet", "kubeadm", "kubectl"]
overlays = ["kubernetes"]
[expect]
os = { id = "ubuntu", version_id = "22.04", codename = "jammy" }
architecture = "amd64"
enabled_units = ["containerd.service", "kubelet.service"]
masked_units = ["swap.target"]
swap_off = true
modules_load = ["overlay", "br_netfilter"]
modprobe_blacklist = ["nouveau"]
nvidia_driver_version = "565.57.01"
runtime_classes = { nvidia = "nvidia" }
disabled_units = ["apt-daily.timer"]
fail_soft_units = ["nvidia-persistenced.service"]
commands = ["unpigz"]
[expect.exec_start]
"nvidia-persistenced.service" = "--persistence-mode !--no-persistence-mode"
[expect.kubernetes]
version = "1.30.0"
packages = ["kubelet", "kubeadm", "kubectl"]
[expect.min_versions]
containerd = "1.7"
runc = "1.1"
[expect.sysctl]
"net.bridge.bridge-nf-call-iptables" = "1"
"net.bridge.bridge-nf-call-ip6tables" = 1
"net.ipv4.ip_forward" = "1"
"vm.overcommit_memory" = "1"
"kernel.panic" = 10
[expect.modprobe_options]
nvidia = "NVreg_EnableGpuFirmware=1 NVreg_PreserveVideoMemoryAllocations=1"
[expect.containerd]
config = "/etc/containerd/config.toml"
socket = "/run/containerd/containerd.sock"
systemd_cgroup = true
runtimes = { nvidia = "/usr/bin/nvidia-container-runtime" }
"#;

    const LISTS: [(&str, &str); 5] = [
        ("base", "# base tools\ncurl\nca-certificates\n"),
        ("gpu", "dkms\nbuild-essential\n"),
        (
            "nvidia",
            "nvidia-driver-565-server=565.57.01-0ubuntu0.22.04.4\nnvidia-dkms-565-server=565.57.01-0ubuntu0.22.04.4\nnvidia-container-toolkit=1.17.3-1\n",
        ),
        ("container-runtime", "containerd\nrunc\n"),
        (
            "kubernetes",
            "kubelet=1.30.0-1.1\nkubeadm=1.30.0-1.1\nkubectl=1.30.0-1.1\n",
        ),
    ];

    fn copy_tree(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            let dest = to.join(e.file_name());
            let md = std::fs::symlink_metadata(e.path()).unwrap();
            if md.is_dir() {
                copy_tree(&e.path(), &dest);
            } else if md.file_type().is_symlink() {
                symlink(std::fs::read_link(e.path()).unwrap(), &dest).unwrap();
            } else {
                std::fs::copy(e.path(), &dest).unwrap();
                std::fs::set_permissions(&dest, md.permissions()).unwrap();
            }
        }
    }

    /// The tiny project in `dir`; returns the definition's path.
    fn project(dir: &Path) -> PathBuf {
        for (name, body) in LISTS {
            write(&dir.join(format!("package-lists/{name}.list")), body);
        }
        write(&dir.join("keys/kubernetes.asc"), KEY);
        copy_tree(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("overlays"),
            &dir.join("overlays"),
        );
        let def = dir.join("images/x.toml");
        write(&def, X_TOML);
        def
    }

    fn write(p: &Path, text: &str) {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    /// The version the fixture installs a package at when the definition does not pin it.
    fn default_version(name: &str) -> &'static str {
        match name {
            "containerd" => "1.7.12-0ubuntu2~22.04.1",
            "runc" => "1.1.12-0ubuntu2~22.04.1",
            _ => "1.0-1",
        }
    }

    /// containerd's default config (version 2) with the systemd cgroup driver, and the
    /// nvidia runtime as `nvidia-ctk runtime configure` adds it.
    fn containerd_config(gpu: bool) -> String {
        let nvidia = r#"
        [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.nvidia]
          runtime_type = "io.containerd.runc.v2"
          [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.nvidia.options]
            BinaryName = "/usr/bin/nvidia-container-runtime"
            SystemdCgroup = true
"#;
        format!(
            r#"disabled_plugins = []
version = 2

[grpc]
  address = "/run/containerd/containerd.sock"
  gid = 0

[plugins]
  [plugins."io.containerd.grpc.v1.cri"]
    sandbox_image = "registry.k8s.io/pause:3.8"
    [plugins."io.containerd.grpc.v1.cri".containerd]
      default_runtime_name = "runc"
      snapshotter = "overlayfs"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes]
{}
        [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
          runtime_type = "io.containerd.runc.v2"
          [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
            BinaryName = ""
            SystemdCgroup = true
"#,
            if gpu { nvidia } else { "" }
        )
    }

    /// A fake module: `.modinfo`-like strings, not an ELF file.
    fn fake_module(vermagic: &str, version: &str) -> Vec<u8> {
        format!(
            "\x7fELF-ish junk\0license=NVIDIA\0version={version}\0srcversion=0A1B2C\0depends=\0vermagic={vermagic}\0"
        )
        .into_bytes()
    }

    /// A jammy-like root for `def`, as a correct build leaves it: two kernels with
    /// initrds, headers and DKMS modules (nvidia-drm xz-compressed), a dpkg database
    /// with every wanted package (pins at their version and held), the overlays, the
    /// hooks' results (containerd config, swap masked), the scrubbed identity and the
    /// repositories.
    fn lay_out(def: &ImageDef, root: &Path) {
        let w = |p: &str, text: &str| write(&root.join(p), text);
        let ln = |target: &str, p: &str| {
            std::fs::create_dir_all(root.join(p).parent().unwrap()).unwrap();
            symlink(target, root.join(p)).unwrap();
        };
        w("usr/lib/os-release", OS_RELEASE);
        ln("../usr/lib/os-release", "etc/os-release");
        ln("usr/lib", "lib");
        ln("usr/bin", "bin");
        ln("usr/sbin", "sbin");
        std::fs::create_dir_all(root.join("usr/sbin")).unwrap();

        let gpu = def.payload.gpu.as_ref();
        let pinned = |name: &str| {
            def.stages
                .iter()
                .flat_map(|s| &s.packages)
                .filter(|p| p.name == name)
                .find_map(|p| p.version.clone())
        };
        let driver_version = gpu
            .and_then(|g| pinned(&g.driver_package))
            .unwrap_or_else(|| "565.57.01-0ubuntu1".into());
        let required: Vec<&String> = def.stages.iter().flat_map(|s| &s.require_modules).collect();
        for k in [K_OLD, K_NEW] {
            w(&format!("boot/vmlinuz-{k}"), "kernel");
            w(&format!("boot/initrd.img-{k}"), "initrd");
            w(&format!("usr/lib/modules/{k}/modules.dep"), "");
            w(
                &format!("usr/lib/modules/{k}/kernel/fs/overlayfs/overlay.ko"),
                &format!("vermagic={k} SMP mod_unload \0"),
            );
            ln(
                &format!("/usr/src/linux-headers-{k}"),
                &format!("usr/lib/modules/{k}/build"),
            );
            for m in &required {
                let body = fake_module(
                    &format!("{k} SMP mod_unload modversions "),
                    upstream_version(&driver_version),
                );
                let dir = root.join(format!("usr/lib/modules/{k}/updates/dkms"));
                std::fs::create_dir_all(&dir).unwrap();
                if m.ends_with("drm") {
                    let mut xz = xz2::write::XzEncoder::new(Vec::new(), 6);
                    std::io::Write::write_all(&mut xz, &body).unwrap();
                    std::fs::write(dir.join(format!("{m}.ko.xz")), xz.finish().unwrap()).unwrap();
                } else {
                    std::fs::write(dir.join(format!("{m}.ko")), body).unwrap();
                }
            }
        }
        ln(&format!("vmlinuz-{K_NEW}"), "boot/vmlinuz");

        // dpkg: base-files, the wanted packages, the headers of each kernel.
        let mut status = String::from(
            "Package: base-files\nStatus: install ok installed\nArchitecture: amd64\nVersion: 12ubuntu4.6\n\n",
        );
        let mut seen: Vec<String> = Vec::new();
        let headers = def.stages.iter().any(|s| s.kernel_headers);
        let names = def
            .stages
            .iter()
            .flat_map(|s| s.packages.iter().map(|p| p.name.clone()).chain(s.hold.iter().cloned()))
            .chain(
                [K_OLD, K_NEW]
                    .iter()
                    .filter(|_| headers)
                    .map(|k| format!("linux-headers-{k}")),
            );
        for name in names {
            if seen.contains(&name) {
                continue;
            }
            let version = pinned(&name);
            let held = version.is_some() || def.stages.iter().any(|s| s.hold.contains(&name));
            status += &format!(
                "Package: {name}\nStatus: {} ok installed\nArchitecture: amd64\nVersion: {}\n\n",
                if held { "hold" } else { "install" },
                version.as_deref().unwrap_or(default_version(&name))
            );
            seen.push(name);
        }
        w("var/lib/dpkg/status", &status);

        // Overlays, in stage order, with their modes.
        for dir in def.stages.iter().flat_map(|s| &s.overlays) {
            copy_tree(dir, root);
        }

        // What the hooks leave: containerd's config, units masked and enabled (each
        // unit installed by its package).
        if let Some(c) = &def.expect.containerd {
            w(&c.config[1..], &containerd_config(!c.runtimes.is_empty()));
        }
        for u in &def.expect.masked_units {
            ln("/dev/null", &format!("etc/systemd/system/{u}"));
        }
        for u in &def.expect.enabled_units {
            w(
                &format!("usr/lib/systemd/system/{u}"),
                "[Unit]\n[Install]\nWantedBy=multi-user.target\n",
            );
            ln(
                &format!("/lib/systemd/system/{u}"),
                &format!("etc/systemd/system/multi-user.target.wants/{u}"),
            );
        }
        w(
            "etc/fstab",
            "LABEL=cloudimg-rootfs\t/\t ext4\tdiscard,errors=remount-ro\t0 1\nLABEL=UEFI\t/boot/efi\tvfat\tumask=0077\t0 1\n",
        );
        w("etc/sysctl.conf", "# kernel parameters\n#net.ipv4.ip_forward=1\n");
        ln("../sysctl.conf", "etc/sysctl.d/99-sysctl.conf");
        w(
            "usr/lib/sysctl.d/50-default.conf",
            "net.ipv4.conf.default.rp_filter = 2\n",
        );
        w("etc/modules", "# /etc/modules\n");
        ln("../modules", "etc/modules-load.d/modules.conf");

        // The scrubbed identity.
        w("etc/machine-id", "");
        w("etc/ssh/sshd_config", "# sshd\n");
        w("etc/ssh/ssh_config", "# ssh\n");
        w("root/.profile", "# profile\n");
        w("home/ubuntu/.bashrc", "# bashrc\n");
        w(
            "etc/shadow",
            "root:*:19000:0:99999:7:::\ndaemon:*:19000:0:99999:7:::\nubuntu:!:19000:0:99999:7:::\n",
        );
        ln("../run/systemd/resolve/stub-resolv.conf", "etc/resolv.conf");
        std::fs::create_dir_all(root.join("var/lib/apt/lists/partial")).unwrap();
        w("var/lib/apt/lists/lock", "");
        std::fs::create_dir_all(root.join("tmp")).unwrap();
        std::fs::create_dir_all(root.join("var/lib/cloud")).unwrap();
        w(
            "etc/initramfs-tools/update-initramfs.conf",
            "# update-initramfs\nupdate_initramfs=yes\nbackup_initramfs=no\n",
        );
        w("etc/apt/apt.conf.d/20auto-upgrades", "");
        w("etc/hostname", "");
        w(
            "etc/hosts",
            "127.0.0.1 localhost\n\n::1 ip6-localhost ip6-loopback\nff02::1 ip6-allnodes\n",
        );
        // Disabled units are installed, with no link; fail-soft units installed (their
        // ExecStart= as the package has it, the overlays' drop-ins on top); commands.
        for u in def.expect.disabled_units.iter().chain(&def.expect.fail_soft_units) {
            w(
                &format!("usr/lib/systemd/system/{u}"),
                "[Unit]\n[Service]\nExecStart=/usr/bin/x --no-persistence-mode\n[Install]\nWantedBy=timers.target\n",
            );
        }
        for c in &def.expect.commands {
            w(&format!("usr/bin/{c}"), "#!/bin/sh\n");
            std::fs::set_permissions(
                root.join(format!("usr/bin/{c}")),
                std::fs::Permissions::from_mode(0o755),
            )
            .unwrap();
        }

        for r in &def.repositories {
            let key = std::fs::read_to_string(def.project_root.join(&r.key)).unwrap();
            w(&format!("etc/apt/keyrings/{}.asc", r.id), &key);
            let comps = r.components.iter().map(|c| format!(" {c}")).collect::<String>();
            w(
                &format!("etc/apt/sources.list.d/{}.list", r.id),
                &format!(
                    "deb [signed-by=/etc/apt/keyrings/{}.asc] {} {}{comps}",
                    r.id, r.uri, r.suite
                ),
            );
        }
    }

    /// A sparse raw disk of `size` bytes: a GPT with one Linux partition at 1 MiB
    /// holding an ext4 `cloudimg-rootfs` made from `root` by mkfs.ext4 -d. No root needed.
    fn make_image(root: &Path, out: &Path, size: u64) {
        std::fs::File::create(out).unwrap().set_len(size).unwrap();
        Cmd::new(tool("sgdisk", "gdisk"))
            .args(["-n", "1:2048:0", "-t", "1:8300", "-c", "1:rootfs"])
            .arg(out)
            .run()
            .unwrap();
        let last = size / 512 - 34; // the backup GPT takes the last 33 sectors
        let blocks_4k = (last + 1 - 2048) * 512 / 4096;
        Cmd::new(tool("mkfs.ext4", "e2fsprogs"))
            .args(["-q", "-F", "-b", "4096", "-L", "cloudimg-rootfs"])
            .args(["-E", "offset=1048576,nodiscard,lazy_itable_init=1,lazy_journal_init=1"])
            .arg("-d")
            .arg(root)
            .arg(out)
            .arg(format!("{}k", blocks_4k * 4))
            .run()
            .unwrap();
    }

    /// A project, its definition and a well-formed root; edit `root()` (and the project)
    /// before [`Fixture::image`].
    struct Fixture {
        dir: TempDir,
        def: ImageDef,
    }

    impl Fixture {
        fn new() -> Fixture {
            let dir = tempfile::Builder::new().prefix("kiln-verify-test-").tempdir().unwrap();
            let def = crate::definition::load(&project(&dir.path().join("project"))).unwrap();
            lay_out(&def, &dir.path().join("root"));
            Fixture { dir, def }
        }

        fn root(&self) -> PathBuf {
            self.dir.path().join("root")
        }

        fn image(&self) -> PathBuf {
            let out = self.dir.path().join("disk.raw");
            make_image(&self.root(), &out, self.def.disk_size);
            out
        }

        fn verify(&self) -> Vec<Check> {
            verify_image(&self.image(), &self.def).unwrap()
        }
    }

    fn failed(checks: &[Check]) -> Vec<&str> {
        checks.iter().filter(|c| !c.ok).map(|c| c.name.as_str()).collect()
    }

    /// A defect in an otherwise good image fails exactly the named checks.
    fn assert_only_fails(edit: impl FnOnce(&Fixture), want: &[&str]) {
        let f = Fixture::new();
        edit(&f);
        let checks = f.verify();
        assert_eq!(failed(&checks), want, "\n{}", render_table(&checks));
    }

    #[test]
    fn well_formed_image_passes_every_check() {
        let f = Fixture::new();
        let checks = f.verify();
        assert_eq!(failed(&checks), Vec::<&str>::new(), "\n{}", render_table(&checks));
        let names: Vec<&str> = checks.iter().map(|c| c.name.as_str()).collect();
        let mut want: Vec<String> = [
            "os release",
            "architecture",
            "disk size",
            "package curl",
            "package kubelet",
            "package nvidia-driver-565-server",
            "kernels",
            "overlay /etc/modprobe.d/nvidia.conf",
            "overlay /usr/local/share/kubernetes/runtimeclass-nvidia.yaml",
            "nouveau blacklisted",
            "modprobe nvidia NVreg_EnableGpuFirmware",
            "modprobe nvidia NVreg_PreserveVideoMemoryAllocations",
            "modules-load overlay",
            "modules-load br_netfilter",
            "sysctl net.bridge.bridge-nf-call-iptables",
            "sysctl net.bridge.bridge-nf-call-ip6tables",
            "sysctl net.ipv4.ip_forward",
            "containerd SystemdCgroup",
            "containerd socket",
            "containerd nvidia runtime",
            "RuntimeClass nvidia",
            "containerd version",
            "runc version",
            "kubelet version",
            "kubeadm version",
            "kubectl version",
            "fstab swap",
            "swap.target masked",
            "containerd.service enabled",
            "kubelet.service enabled",
            "apt-daily.timer disabled",
            "nvidia-persistenced.service installed",
            "nvidia-persistenced.service ExecStart",
            "command unpigz",
            "sysctl vm.overcommit_memory",
            "sysctl kernel.panic",
            "machine-id empty",
            "hostname neutral",
            "hosts names no host",
            "mailname absent",
            "dbus machine-id absent",
            "ssh host keys",
            "shell history",
            "cloud-init state",
            "shadow passwords",
            "policy-rc.d absent",
            "resolv.conf symlink",
            "apt lists",
            "tmp empty",
            "build leftovers",
            "initramfs updates",
            "repository kubernetes",
        ]
        .map(String::from)
        .to_vec();
        for k in [K_OLD, K_NEW] {
            want.push(format!("kernel headers {k}"));
            want.push(format!("initrd {k}"));
            want.push(format!("nvidia.ko version ({k})"));
            for m in ["nvidia", "nvidia-uvm", "nvidia-modeset", "nvidia-drm"] {
                want.push(format!("module {m} ({k})"));
            }
        }
        for w in &want {
            assert!(
                names.contains(&w.as_str()),
                "no check `{w}` in:\n{}",
                render_table(&checks)
            );
        }
        // Packages: each once, in the order of the definition.
        assert_eq!(names.iter().filter(|n| n.starts_with("package ")).count(), 12);
        assert_eq!(names.iter().filter(|n| n.starts_with("overlay ")).count(), 8);
        let find = |n: &str| checks.iter().find(|c| c.name == n).unwrap();
        assert_eq!(
            find(&format!("module nvidia-drm ({K_NEW})")).found,
            format!("updates/dkms/nvidia-drm.ko.xz: vermagic={K_NEW} SMP mod_unload modversions")
        );
        assert_eq!(
            find(&format!("nvidia.ko version ({K_OLD})")).found,
            "updates/dkms/nvidia.ko: version=565.57.01"
        );
        assert_eq!(find("kernels").found, format!("{K_NEW}, {K_OLD}"));
        assert_eq!(find("package kubelet").found, "1.30.0-1.1 (hold ok installed)");
        assert_eq!(find("disk size").found, "1 GiB (1073741824 bytes)");
    }

    #[test]
    fn qcow2_image_passes_too() {
        let f = Fixture::new();
        let raw = f.image();
        let qcow2 = f.dir.path().join("disk.qcow2");
        to_qcow2(&raw, &qcow2);
        let checks = verify_image(&qcow2, &f.def).unwrap();
        assert_eq!(failed(&checks), Vec::<&str>::new(), "\n{}", render_table(&checks));
    }

    #[test]
    fn machine_id_not_empty() {
        assert_only_fails(
            |f| write(&f.root().join("etc/machine-id"), "0123456789abcdef0123456789abcdef\n"),
            &["machine-id empty"],
        );
    }

    /// Issue #17: each node-readiness defect fails its own check.
    #[test]
    fn node_readiness_defects() {
        let persistenced = "etc/systemd/system/nvidia-persistenced.service.d/10-kiln-persistence-mode.conf";
        type Edit = Box<dyn Fn(&Fixture)>;
        let cases: Vec<(Edit, Vec<&str>)> = vec![
            (
                Box::new(|f| write(&f.root().join("etc/hostname"), "vm\n")),
                vec!["hostname neutral"],
            ),
            (
                Box::new(|f| write(&f.root().join("etc/hosts"), "127.0.0.1 localhost\n127.0.1.1 vm\n")),
                vec!["hosts names no host"],
            ),
            (
                Box::new(|f| write(&f.root().join("etc/mailname"), "vm.example\n")),
                vec!["mailname absent"],
            ),
            (
                Box::new(|f| {
                    let d = f.root().join("etc/systemd/system/timers.target.wants");
                    std::fs::create_dir_all(&d).unwrap();
                    symlink("/lib/systemd/system/apt-daily.timer", d.join("apt-daily.timer")).unwrap();
                }),
                vec!["apt-daily.timer disabled"],
            ),
            (
                Box::new(|f| std::fs::remove_file(f.root().join("usr/bin/unpigz")).unwrap()),
                vec!["command unpigz"],
            ),
            (
                Box::new(|f| {
                    write(
                        &f.root().join("etc/sysctl.d/99-kubernetes-cri.conf"),
                        "net.bridge.bridge-nf-call-iptables = 1\nnet.bridge.bridge-nf-call-ip6tables = 1\nnet.ipv4.ip_forward = 1\nkernel.panic = 10\n",
                    )
                }),
                vec![
                    "overlay /etc/sysctl.d/99-kubernetes-cri.conf",
                    "sysctl vm.overcommit_memory",
                ],
            ),
            (
                Box::new(move |f| std::fs::remove_file(f.root().join(persistenced)).unwrap()),
                vec![
                    "overlay /etc/systemd/system/nvidia-persistenced.service.d/10-kiln-persistence-mode.conf",
                    "nvidia-persistenced.service ExecStart",
                ],
            ),
            (
                Box::new(|f| {
                    std::fs::remove_file(f.root().join("usr/lib/systemd/system/nvidia-persistenced.service")).unwrap()
                }),
                vec![
                    "nvidia-persistenced.service installed",
                    "nvidia-persistenced.service ExecStart",
                ],
            ),
        ];
        for (edit, want) in cases {
            assert_only_fails(edit, &want);
        }
        // What the checks say of a good image.
        let f = Fixture::new();
        let checks = f.verify();
        let find = |n: &str| checks.iter().find(|c| c.name == n).unwrap().found.clone();
        assert_eq!(find("hostname neutral"), "empty");
        assert_eq!(find("apt-daily.timer disabled"), "disabled");
        assert_eq!(find("command unpigz"), "/usr/bin/unpigz");
        assert_eq!(
            find("nvidia-persistenced.service ExecStart"),
            format!(
                "/usr/bin/nvidia-persistenced --user nvidia-persistenced --persistence-mode --verbose (/{persistenced})"
            )
        );
    }

    #[test]
    fn ssh_host_key_present() {
        assert_only_fails(
            |f| write(&f.root().join("etc/ssh/ssh_host_ed25519_key"), "secret"),
            &["ssh host keys"],
        );
    }

    #[test]
    fn module_signing_key_present() {
        assert_only_fails(
            |f| write(&f.root().join("var/lib/shim-signed/mok/MOK.priv"), "secret"),
            &["no module signing key"],
        );
    }

    /// Every NVIDIA module's signer is reported (and in `--json`); with
    /// `expect.module_signer` set, a module that is unsigned or signed by someone else
    /// fails, xz-compressed ones included.
    #[test]
    fn module_signers() {
        let mut f = Fixture::new();
        let keys = f.dir.path().join("keys");
        std::fs::create_dir_all(&keys).unwrap();
        let (key, cert) = modsig::testkeys::make(&keys, "Signer A");
        for k in [K_OLD, K_NEW] {
            let ko = f.root().join(format!("usr/lib/modules/{k}/updates/dkms/nvidia.ko"));
            let signed = modsig::testkeys::sign(&keys, &std::fs::read(&ko).unwrap(), &key, &cert);
            std::fs::write(&ko, signed).unwrap();
        }
        let image = f.image();
        let (checks, sigs) = verify_image_full(&image, &f.def).unwrap();
        assert_eq!(failed(&checks), Vec::<&str>::new(), "no signer expected: only reported");
        let signer_of = |sigs: &[ModuleSignature], k: &str, m: &str| {
            sigs.iter()
                .find(|s| s.kernel == k && s.path.ends_with(m))
                .map(|s| s.signature.as_ref().and_then(|x| x.signer.clone()))
        };
        for k in [K_OLD, K_NEW] {
            assert_eq!(signer_of(&sigs, k, "/nvidia.ko"), Some(Some("Signer A".into())));
            assert_eq!(signer_of(&sigs, k, "/nvidia-uvm.ko"), Some(None), "unsigned, reported");
            assert_eq!(signer_of(&sigs, k, "/nvidia-drm.ko.xz"), Some(None));
        }
        f.def.expect.module_signer = Some("Signer A".into());
        let checks = verify_image(&image, &f.def).unwrap();
        let mut want: Vec<String> = Vec::new();
        for k in [K_OLD, K_NEW] {
            for m in ["nvidia-drm.ko.xz", "nvidia-modeset.ko", "nvidia-uvm.ko"] {
                want.push(format!("module signature updates/dkms/{m} ({k})"));
            }
        }
        let mut got: Vec<&str> = failed(&checks);
        got.sort();
        want.sort();
        assert_eq!(got, want, "\n{}", render_table(&checks));
        let c = checks
            .iter()
            .find(|c| c.name == format!("module signature updates/dkms/nvidia.ko ({K_NEW})"))
            .unwrap();
        assert!(c.ok && c.found.starts_with("signed by Signer A (key "), "{c:?}");
        f.def.expect.module_signer = Some("Signer B".into());
        let checks = verify_image(&image, &f.def).unwrap();
        assert_eq!(
            failed(&checks)
                .iter()
                .filter(|n| n.starts_with("module signature"))
                .count(),
            8,
            "\n{}",
            render_table(&checks)
        );
    }

    #[test]
    fn module_signing_key_of_dkms3() {
        assert_only_fails(
            |f| write(&f.root().join("var/lib/dkms/mok.key"), "secret"),
            &["no module signing key"],
        );
    }

    #[test]
    fn wrong_vermagic() {
        let f = Fixture::new();
        let ko = f.root().join(format!("usr/lib/modules/{K_NEW}/updates/dkms/nvidia.ko"));
        std::fs::write(
            &ko,
            fake_module("5.15.0-1-generic SMP mod_unload modversions ", "565.57.01"),
        )
        .unwrap();
        let checks = f.verify();
        let name = format!("module nvidia ({K_NEW})");
        assert_eq!(failed(&checks), [name.as_str()], "\n{}", render_table(&checks));
        let c = checks.iter().find(|c| c.name == name).unwrap();
        assert_eq!(
            c.found,
            "updates/dkms/nvidia.ko: vermagic=5.15.0-1-generic SMP mod_unload modversions"
        );
        assert_eq!(c.expected, format!("nvidia.ko with vermagic={K_NEW} ..."));
    }

    #[test]
    fn nvidia_conf_without_gpu_firmware() {
        // A definition whose overlay lacks the option: the image matches its overlay,
        // only the spec check fails.
        assert_only_fails(
            |f| {
                let text = "options nvidia NVreg_PreserveVideoMemoryAllocations=1\n";
                write(
                    &f.def.project_root.join("overlays/nvidia/etc/modprobe.d/nvidia.conf"),
                    text,
                );
                write(&f.root().join("etc/modprobe.d/nvidia.conf"), text);
            },
            &["modprobe nvidia NVreg_EnableGpuFirmware"],
        );
    }

    /// The checks are the definition's `[expect]`: a definition extending the test one
    /// with another Kubernetes version, an extra sysctl and an extra unit makes verify
    /// demand exactly those of the same image; one without `[expect]` demands none of
    /// the spec's configuration.
    #[test]
    fn expectations_drive_the_checks() {
        let f = Fixture::new();
        let image = f.image();
        let images = f.def.project_root.join("images");
        write(
            &images.join("y.toml"),
            "extends = \"x.toml\"\n[expect]\nenabled_units = [\"nvidia-persistenced.service\"]\n\
             [expect.kubernetes]\nversion = \"1.31.0\"\n[expect.sysctl]\n\"vm.max_map_count\" = 262144\n",
        );
        let y = crate::definition::load(&images.join("y.toml")).unwrap();
        assert_eq!(
            y.expect.kubernetes.as_ref().unwrap().packages,
            ["kubelet", "kubeadm", "kubectl"]
        );
        let checks = verify_image(&image, &y).unwrap();
        assert_eq!(
            failed(&checks),
            [
                "sysctl vm.max_map_count",
                "kubelet version",
                "kubeadm version",
                "kubectl version",
                "nvidia-persistenced.service enabled",
            ],
            "\n{}",
            render_table(&checks)
        );
        let find = |n: &str| checks.iter().find(|c| c.name == n).unwrap();
        assert_eq!(
            (
                find("kubelet version").found.as_str(),
                find("kubelet version").expected.as_str()
            ),
            ("1.30.0-1.1", "1.31.0 (upstream)")
        );
        assert_eq!(
            find("sysctl vm.max_map_count").expected,
            "262144 (in /etc/sysctl.d/*.conf)"
        );
        assert_eq!(
            find("nvidia-persistenced.service enabled").found,
            "not enabled (no /etc/systemd/system/*.wants/nvidia-persistenced.service)"
        );
        // The same image against the test definition passes.
        assert_eq!(failed(&verify_image(&image, &f.def).unwrap()), Vec::<&str>::new());

        // Without [expect]: packages, kernels, modules, overlays, identity — no spec checks.
        let bare = X_TOML.split("[expect]").next().unwrap();
        write(&images.join("bare.toml"), bare);
        let bare = crate::definition::load(&images.join("bare.toml")).unwrap();
        assert_eq!(bare.expect, crate::definition::Expectations::default());
        let checks = verify_image(&image, &bare).unwrap();
        assert_eq!(failed(&checks), Vec::<&str>::new(), "\n{}", render_table(&checks));
        for c in &checks {
            let spec = [
                "os release",
                "sysctl ",
                "modprobe ",
                "modules-load ",
                "containerd",
                "RuntimeClass",
            ]
            .iter()
            .any(|p| c.name.starts_with(p))
                || c.name.ends_with(" version")
                || c.name.ends_with(" enabled")
                || c.name.ends_with(" masked")
                || c.name.ends_with(" blacklisted");
            assert!(!spec, "{} checked without [expect]", c.name);
        }
        assert!(checks.iter().any(|c| c.name == "package kubelet"));
    }

    #[test]
    fn units_not_enabled() {
        let f = Fixture::new();
        let wants = f.root().join("etc/systemd/system/multi-user.target.wants");
        std::fs::remove_file(wants.join("kubelet.service")).unwrap();
        std::fs::remove_file(f.root().join("usr/lib/systemd/system/containerd.service")).unwrap();
        let checks = f.verify();
        assert_eq!(
            failed(&checks),
            ["containerd.service enabled", "kubelet.service enabled"],
            "\n{}",
            render_table(&checks)
        );
        let find = |n: &str| checks.iter().find(|c| c.name == n).unwrap().found.clone();
        assert_eq!(
            find("containerd.service enabled"),
            "multi-user.target.wants/containerd.service -> /lib/systemd/system/containerd.service, which does not exist"
        );
        assert_eq!(
            find("kubelet.service enabled"),
            "not enabled (no /etc/systemd/system/*.wants/kubelet.service)"
        );

        // Enabled but masked is not enabled.
        let f = Fixture::new();
        symlink("/dev/null", f.root().join("etc/systemd/system/kubelet.service")).unwrap();
        let checks = f.verify();
        assert_eq!(
            failed(&checks),
            ["kubelet.service enabled"],
            "\n{}",
            render_table(&checks)
        );
    }

    #[test]
    fn swap_line_in_fstab() {
        assert_only_fails(
            |f| {
                let p = f.root().join("etc/fstab");
                let text = std::fs::read_to_string(&p).unwrap() + "/swap.img\tnone\tswap\tsw\t0\t0\n";
                std::fs::write(p, text).unwrap();
            },
            &["fstab swap"],
        );
    }

    #[test]
    fn kubelet_not_held() {
        let f = Fixture::new();
        let p = f.root().join("var/lib/dpkg/status");
        let text = std::fs::read_to_string(&p).unwrap();
        let text = text.replace(
            "Package: kubelet\nStatus: hold ok installed",
            "Package: kubelet\nStatus: install ok installed",
        );
        std::fs::write(&p, text).unwrap();
        let checks = f.verify();
        assert_eq!(failed(&checks), ["package kubelet"], "\n{}", render_table(&checks));
        let c = checks.iter().find(|c| c.name == "package kubelet").unwrap();
        assert_eq!(
            (c.found.as_str(), c.expected.as_str()),
            ("1.30.0-1.1 (install ok installed)", "1.30.0-1.1 (hold ok installed)")
        );
    }

    #[test]
    fn more_defects() {
        // Several unrelated defects in one image, each failing its own check.
        let f = Fixture::new();
        let root = f.root();
        write(&root.join("root/.bash_history"), "curl secret\n");
        write(
            &root.join("etc/shadow"),
            "root:$6$salt$hash:19000:0:99999:7:::\nubuntu:!:19000::::::\n",
        );
        write(&root.join("usr/sbin/policy-rc.d"), "exit 101\n");
        write(
            &root.join("var/lib/apt/lists/archive.ubuntu.com_ubuntu_dists_jammy_main_binary-amd64_Packages"),
            "",
        );
        write(&root.join("etc/dpkg/dpkg.cfg.d/kiln-unsafe-io"), "force-unsafe-io\n");
        std::fs::remove_file(root.join(format!("boot/initrd.img-{K_OLD}"))).unwrap();
        write(&root.join("etc/sysctl.d/99-zz-late.conf"), "net.ipv4.ip_forward = 0\n");
        write(
            &root.join("etc/modprobe.d/zz-nvidia.conf"),
            "options nvidia NVreg_PreserveVideoMemoryAllocations=0\n",
        );
        write(
            &root.join("etc/apt/sources.list.d/kubernetes.list"),
            "deb [signed-by=/etc/apt/keyrings/kubernetes.asc] file:///run/kiln/repos/kubernetes /\n",
        );
        std::fs::remove_file(root.join(format!("usr/lib/modules/{K_OLD}/updates/dkms/nvidia-uvm.ko"))).unwrap();
        std::fs::set_permissions(
            root.join("etc/sysctl.d/99-kubernetes-cri.conf"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        let checks = f.verify();
        let uvm = format!("module nvidia-uvm ({K_OLD})");
        let initrd = format!("initrd {K_OLD}");
        assert_eq!(
            failed(&checks),
            [
                uvm.as_str(),
                "overlay /etc/sysctl.d/99-kubernetes-cri.conf",
                "modprobe nvidia NVreg_PreserveVideoMemoryAllocations",
                "sysctl net.ipv4.ip_forward",
                "shell history",
                "shadow passwords",
                "policy-rc.d absent",
                "apt lists",
                "build leftovers",
                initrd.as_str(),
                "repository kubernetes",
            ],
            "\n{}",
            render_table(&checks)
        );
        let find = |n: &str| checks.iter().find(|c| c.name == n).unwrap().found.clone();
        assert_eq!(find("shadow passwords"), "usable password: root");
        assert_eq!(find("sysctl net.ipv4.ip_forward"), "0 (/etc/sysctl.d/99-zz-late.conf)");
        assert!(
            find("repository kubernetes").contains("not the definition's URI"),
            "{}",
            find("repository kubernetes")
        );
        assert_eq!(
            find("overlay /etc/sysctl.d/99-kubernetes-cri.conf"),
            "same content, mode 0600"
        );
    }

    #[test]
    fn command_output_and_exit() {
        let f = Fixture::new();
        write(&f.root().join("etc/ssh/ssh_host_rsa_key"), "secret");
        let image = f.image();
        let e = cmd_verify(&image, &f.def.file, &[], None, true).unwrap_err();
        assert_eq!(crate::error::exit_code(&e), 1);
        let total = verify_image(&image, &f.def).unwrap().len();
        assert_eq!(e.to_string(), format!("1 of {total} checks failed"));

        let checks = verify_image(&image, &f.def).unwrap();
        let report = Report {
            image: image.display().to_string(),
            checks: &checks,
            module_signatures: &[],
            passed: false,
        };
        let json = serde_json::to_value(&report).unwrap();
        let keys: Vec<&String> = json.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["image", "checks", "module_signatures", "passed"]);
        let keys: Vec<&String> = json["checks"][0].as_object().unwrap().keys().collect();
        assert_eq!(keys, ["name", "ok", "found", "expected"]);

        let table = render_table(&checks);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), checks.len() + 1);
        let col = lines[0].find("RESULT").unwrap();
        assert!(
            lines
                .iter()
                .skip(1)
                .all(|l| l[col..].starts_with("pass") || l[col..].starts_with("FAIL")),
            "{table}"
        );
        let ssh = lines
            .iter()
            .find(|l| l.trim_start().starts_with("ssh host keys"))
            .unwrap();
        assert!(
            ssh[col..].starts_with("FAIL") && ssh.contains("ssh_host_rsa_key"),
            "{table}"
        );

        let missing = cmd_verify(&f.dir.path().join("nope.raw"), &f.def.file, &[], None, false).unwrap_err();
        assert_eq!(crate::error::exit_code(&missing), 2);
    }

    /// The project's own definitions, on roots laid out from them, pass: the same code
    /// verifies the GPU-ready image (no NVIDIA checks) and the NVIDIA one.
    #[test]
    fn project_definitions_verify() {
        let images = Path::new(env!("CARGO_MANIFEST_DIR")).join("images");
        for (file, gpu) in [
            ("ubuntu-2204-gpu-ready-nodriver.toml", false),
            ("ubuntu-2204-nvidia-565-firmware1.toml", true),
        ] {
            let def = crate::definition::load(&images.join(file)).unwrap();
            let dir = tempfile::tempdir().unwrap();
            lay_out(&def, &dir.path().join("root"));
            let image = dir.path().join("disk.raw");
            make_image(&dir.path().join("root"), &image, def.disk_size);
            let checks = verify_image(&image, &def).unwrap();
            assert_eq!(failed(&checks), Vec::<&str>::new(), "{file}\n{}", render_table(&checks));
            let nvidia = checks.iter().filter(|c| c.name.contains("nvidia")).count();
            assert_eq!(nvidia > 0, gpu, "{file}\n{}", render_table(&checks));
            assert!(checks.iter().any(|c| c.name == "nouveau blacklisted"), "{file}");
            assert!(checks.iter().any(|c| c.name == "package kubelet"), "{file}");
        }
    }

    /// A minimal ELF64 with a `.modinfo` section, and strings outside it that must not count.
    fn elf_with_modinfo(modinfo: &[u8]) -> Vec<u8> {
        let shstrtab = b"\0.modinfo\0.shstrtab\0";
        let mut data = vec![0u8; 64];
        data[..6].copy_from_slice(b"\x7fELF\x02\x01");
        data.extend_from_slice(b"version=0.0-outside\0vermagic=9.9-outside\0");
        let modinfo_off = data.len();
        data.extend_from_slice(modinfo);
        let strtab_off = data.len();
        data.extend_from_slice(shstrtab);
        let shoff = data.len();
        let header = |name: u32, off: usize, size: usize| {
            let mut h = vec![0u8; 64];
            h[..4].copy_from_slice(&name.to_le_bytes());
            h[0x18..0x20].copy_from_slice(&(off as u64).to_le_bytes());
            h[0x20..0x28].copy_from_slice(&(size as u64).to_le_bytes());
            h
        };
        data.extend(header(0, 0, 0));
        data.extend(header(1, modinfo_off, modinfo.len()));
        data.extend(header(10, strtab_off, shstrtab.len()));
        data[0x28..0x30].copy_from_slice(&(shoff as u64).to_le_bytes());
        data[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        data[0x3c..0x3e].copy_from_slice(&3u16.to_le_bytes());
        data[0x3e..0x40].copy_from_slice(&2u16.to_le_bytes());
        data
    }

    #[test]
    fn modinfo_fields() {
        let elf = elf_with_modinfo(
            b"license=NVIDIA\0srcversion=ABC\0version=565.57.01\0vermagic=6.8.0-49-generic SMP preempt mod_unload \0",
        );
        assert_eq!(modinfo_field(&elf, "version").as_deref(), Some("565.57.01"));
        assert_eq!(
            modinfo_field(&elf, "vermagic").as_deref(),
            Some("6.8.0-49-generic SMP preempt mod_unload ")
        );
        assert_eq!(modinfo_field(&elf, "depends"), None);
        // Without a .modinfo section the whole file is searched; srcversion is not version.
        assert_eq!(
            modinfo_field(b"xx srcversion=1\0vermagic=5.15.0-1-generic SMP\0", "version"),
            None
        );
        assert_eq!(
            modinfo_field(b"xx vermagic=5.15.0-1-generic SMP\0", "vermagic").as_deref(),
            Some("5.15.0-1-generic SMP")
        );
        assert_eq!(
            decompress_module("a.ko.zst", vec![1]).unwrap_err(),
            "compressed (zstd), not checked"
        );
        assert_eq!(module_stem("nvidia-uvm.ko.zst"), Some("nvidia-uvm"));
        assert_eq!(module_stem("modules.dep"), None);
        assert_eq!(normalize_module("nvidia-uvm"), normalize_module("nvidia_uvm"));
    }

    #[test]
    fn config_parsing() {
        let files = vec![
            (
                "/etc/modprobe.d/nvidia.conf".to_string(),
                "# c\noptions nvidia NVreg_EnableGpuFirmware=1 NVreg_X=2\n".to_string(),
            ),
            (
                "/lib/modprobe.d/zz.conf".to_string(),
                "options nvidia NVreg_EnableGpuFirmware=0\n".to_string(),
            ),
        ];
        let conf = "/etc/modprobe.d/nvidia.conf";
        let (ok, found) = modprobe_option(&files, "nvidia", conf, "NVreg_EnableGpuFirmware", "1");
        assert!(!ok);
        assert_eq!(
            found,
            "NVreg_EnableGpuFirmware=0 (/lib/modprobe.d/zz.conf; /etc/modprobe.d/nvidia.conf sets 1)"
        );
        assert!(modprobe_option(&files[..1], "nvidia", conf, "NVreg_EnableGpuFirmware", "1").0);
        assert!(!modprobe_option(&files[1..], "nvidia", conf, "NVreg_X", "2").0);
        // Another module's options don't count; `-` and `_` in module names are alike.
        assert!(!modprobe_option(&files, "nvidia-drm", conf, "NVreg_X", "2").0);
        let drm = [(
            "/etc/modprobe.d/nvidia-drm.conf".to_string(),
            "options nvidia_drm modeset=1\n".to_string(),
        )];
        assert!(modprobe_option(&drm, "nvidia-drm", "/etc/modprobe.d/nvidia-drm.conf", "modeset", "1").0);

        let s = sysctl_values(&[(
            "a".into(),
            "net/ipv4/ip_forward=0\n-net.ipv4.ip_forward = 1\n; c\n".into(),
        )]);
        assert_eq!(s["net.ipv4.ip_forward"], ("1".to_string(), "a".to_string()));

        let yaml = "kind: Pod\nmetadata:\n  name: nvidia\n---\napiVersion: node.k8s.io/v1\nkind: RuntimeClass\nmetadata:\n  name: \"nvidia\"\nhandler: nvidia\n";
        assert_eq!(runtime_class_handler(yaml, "nvidia").as_deref(), Some("nvidia"));
        assert_eq!(
            runtime_class_handler("kind: RuntimeClass\nmetadata:\n  name: other\nhandler: x\n", "nvidia"),
            None
        );
        let json = r#"{"kind":"RuntimeClass","metadata":{"name":"nvidia"},"handler":"nv"}"#;
        assert_eq!(runtime_class_handler(json, "nvidia").as_deref(), Some("nv"));

        let d = parse_deb_line("deb [arch=amd64 signed-by=/etc/apt/keyrings/k.gpg] https://x/deb/ / main").unwrap();
        assert_eq!(
            (
                d.signed_by.as_deref(),
                d.uri.as_str(),
                d.suite.as_str(),
                d.components.as_slice()
            ),
            (
                Some("/etc/apt/keyrings/k.gpg"),
                "https://x/deb/",
                "/",
                ["main".to_string()].as_slice()
            )
        );

        let t: toml::Table = containerd_config(true).parse().unwrap();
        let (rt, path) = find_table(&t, "runtimes").unwrap();
        assert_eq!(path, "plugins.io.containerd.grpc.v1.cri.containerd.runtimes");
        assert!(rt.contains_key("nvidia") && rt.contains_key("runc"));
    }
}
