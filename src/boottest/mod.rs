//! `kiln boot-test IMAGE`: boot the image through real firmware and check it from inside.
//!
//! Each boot runs on a throwaway qcow2 overlay of the image (the image itself is never
//! written) in QEMU — OVMF for UEFI, SeaBIOS for BIOS — with a cloud-init NoCloud seed (a
//! FAT volume labelled `cidata`, written with fatfs) whose user-data creates a test user
//! and starts a check script once cloud-init has finished. The script prints one line per
//! check on the serial console, `KILN-CHECK <name> <ok|fail> <value>`, then `KILN-DONE`,
//! and powers the guest off; kiln reads the serial log as it grows.
//!
//! - Acceleration: KVM only if it really runs guest code, and fast (a 512-byte boot
//!   sector that writes a marker to QEMU's debug port, timed under KVM and under TCG); a
//!   /dev/kvm that opens but crawls or hangs (nested virtualisation, as on our machines:
//!   the probe takes ~5 s instead of ~0.1 s, GRUB appears after a minute, and `-cpu
//!   host` aborts) falls back to TCG. `KILN_BOOTTEST_ACCEL=tcg|kvm` skips the probe.
//! - Phases, each with its own time limit (fractions of `--timeout-secs`): firmware and
//!   GRUB until the kernel prints `Linux version`; kernel until cloud-init is done; the
//!   checks. A guest that hangs fails with the phase it hung in and the last serial
//!   lines; a kernel that cannot mount its root filesystem (initramfs `ALERT! ... does
//!   not exist`, the `(initramfs)` prompt, a VFS panic) fails at once with that message.
//!   QEMU is killed when kiln is done with it, on every path (a guard, and
//!   PR_SET_PDEATHSIG if kiln itself dies).
//! - Two boots of two fresh overlays (UEFI and BIOS, or the one firmware twice) must
//!   report different machine-ids and SSH host keys: the image carries no identity.
//!
//! - `--secure-boot`: OVMF's Secure Boot build (SMM, variables writable only from SMM)
//!   with Microsoft's keys, so shim, GRUB and the kernel are verified as on a real
//!   machine; the guest also reports the `SecureBoot` variable, kernel lockdown and
//!   whether the kernel accepts `nvidia.ko`. `--mok CERT` adds the certificate to shim's
//!   `MokList` first (`virt-fw-vars`), as `mokutil --import` and MokManager would.
//!
//! `KILN_BOOTTEST_LOGS=DIR` keeps each boot's serial console and QEMU log in DIR
//! (`uefi-serial.log`, `bios-qemu.log`, ...), e.g. as CI artifacts.
//!
//! What is expected comes from the image definition's `[expect]` table (`--def`, the
//! same table `kiln verify` reads): modules blacklisted and loaded, sysctls, swap off,
//! units masked and enabled, containerd running with its cgroup driver, the Kubernetes
//! tools at `expect.kubernetes.version`, the NVIDIA driver at
//! `expect.nvidia_driver_version` (modinfo, vermagic = the running kernel) and the
//! modprobe options. The kernel expected to run is the image's newest (`inspect`).

use crate::definition::Expectations;
use crate::host::cmd::Cmd;
use crate::image::inspect::{ImageFacts, ImageFormat};
use crate::image::verify::Check;
use anyhow::{Context, Result, bail};
use serde::Serialize;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

/// Lines of serial output shown when a boot fails.
pub const TAIL_LINES: usize = 30;

/// The user cloud-init creates in the guest.
pub const TEST_USER: &str = "kiln-test";

/// The host name the seed's meta-data gives the guest (`local-hostname`): the guest
/// must run under it, set by cloud-init, not under a name the image carried.
const GUEST_HOSTNAME: &str = "kiln-boottest";

/// What kiln looks for (firmware code, variables template) for UEFI boots.
const OVMF: [(&str, &str); 3] = [
    ("/usr/share/OVMF/OVMF_CODE_4M.fd", "/usr/share/OVMF/OVMF_VARS_4M.fd"),
    ("/usr/share/OVMF/OVMF_CODE.fd", "/usr/share/OVMF/OVMF_VARS.fd"),
    ("/usr/share/edk2/ovmf/OVMF_CODE.fd", "/usr/share/edk2/ovmf/OVMF_VARS.fd"),
];

/// `--secure-boot`: OVMF built with Secure Boot and SMM (code), and a variables template
/// with Microsoft's keys enrolled (PK/KEK/db: the UEFI CA that signs shim), so the
/// image's own shim, GRUB and kernel boot as on a machine with Secure Boot enforced.
/// Debian and Ubuntu (`ovmf`), then Fedora (`edk2-ovmf`).
const OVMF_SECURE_BOOT: [(&str, &str); 3] = [
    (
        "/usr/share/OVMF/OVMF_CODE_4M.secboot.fd",
        "/usr/share/OVMF/OVMF_VARS_4M.ms.fd",
    ),
    (
        "/usr/share/OVMF/OVMF_CODE.secboot.fd",
        "/usr/share/OVMF/OVMF_VARS.ms.fd",
    ),
    (
        "/usr/share/edk2/ovmf/OVMF_CODE.secboot.fd",
        "/usr/share/edk2/ovmf/OVMF_VARS.secboot.fd",
    ),
];

/// The owner GUID `mokutil --import` gives a Machine Owner Key (shim's vendor GUID): what
/// an enrolment through MokManager leaves in shim's `MokList`.
const SHIM_LOCK_GUID: &str = "605dab50-e046-4300-abb6-3dd810dd8b23";

#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
pub enum FirmwareChoice {
    Uefi,
    Bios,
    Both,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Firmware {
    Uefi,
    Bios,
}

impl Firmware {
    pub fn name(self) -> &'static str {
        match self {
            Firmware::Uefi => "uefi",
            Firmware::Bios => "bios",
        }
    }
}

pub struct Opts {
    pub image: PathBuf,
    /// The image definition whose `[expect]` the guest is checked against.
    pub def: PathBuf,
    /// The variant of the definition (`--set NAME=VALUE`): its own `[expect]`.
    pub sets: Vec<crate::definition::Setting>,
    pub firmware: FirmwareChoice,
    /// One boot per firmware chosen, without the second boot (or the other firmware's)
    /// that proves each copy makes its own identity: no identity checks.
    pub once: bool,
    /// Boot through OVMF's Secure Boot firmware with Microsoft's keys enrolled (UEFI
    /// only), and check Secure Boot, kernel lockdown and that the NVIDIA module loads.
    pub secure_boot: bool,
    /// With `secure_boot`: a certificate (DER or PEM) put in shim's MokList first, as an
    /// enrolment would; the kernel must load it.
    pub mok: Option<PathBuf>,
    pub timeout_secs: u64,
    pub json: bool,
}

/// One phase of a boot.
#[derive(Debug, Clone, Serialize)]
pub struct Phase {
    pub name: &'static str,
    pub limit_s: u64,
    /// How long it took; `None` if it never finished.
    pub duration_s: Option<f64>,
    pub ok: bool,
}

/// One boot of a fresh overlay.
#[derive(Debug, Clone, Serialize)]
pub struct Boot {
    pub firmware: Firmware,
    /// 1 for the first boot with this firmware, 2 for the second.
    pub run: u32,
    /// From starting QEMU to QEMU gone.
    pub wall_s: f64,
    pub phases: Vec<Phase>,
    pub checks: Vec<Check>,
    /// Why the boot failed before all checks were in, if it did.
    pub error: Option<String>,
    /// The last serial lines, when the boot failed.
    pub serial_tail: Vec<String>,
    #[serde(skip)]
    machine_id: Option<String>,
    #[serde(skip)]
    host_key: Option<String>,
}

impl Boot {
    fn label(&self) -> String {
        if self.run == 1 {
            self.firmware.name().to_string()
        } else {
            format!("{}#{}", self.firmware.name(), self.run)
        }
    }

    fn passed(&self) -> bool {
        self.error.is_none() && self.phases.iter().all(|p| p.ok) && self.checks.iter().all(|c| c.ok)
    }
}

/// `kiln boot-test --json` output.
#[derive(Debug, Serialize)]
pub struct Report {
    pub image: String,
    pub accel: String,
    pub accel_note: String,
    /// Booted with Secure Boot enforced (`--secure-boot`).
    pub secure_boot: bool,
    /// The common name of the certificate put in shim's MokList (`--mok`).
    pub mok: Option<String>,
    pub boots: Vec<Boot>,
    /// Checks across boots (identity regenerated per machine).
    pub checks: Vec<Check>,
    pub passed: bool,
}

/// What the guest must show: the definition's expectations and the image's kernel.
#[derive(Debug, Clone)]
struct Expect {
    kernel: String,
    expect: Expectations,
    secure_boot: Option<SecureBootExpect>,
}

/// What a Secure Boot boot must show besides the definition's `[expect]`.
#[derive(Debug, Clone)]
struct SecureBootExpect {
    /// The subject CN of the certificate enrolled in shim's MokList (`--mok`): the kernel
    /// prints `Loaded X.509 cert 'CN: ...'` when it takes it into its platform keyring.
    mok_cn: Option<String>,
}

impl Expect {
    fn new(f: &ImageFacts, expect: &Expectations) -> Result<Expect> {
        let kernel = f
            .kernels
            .iter()
            .find(|k| k.vmlinuz && k.modules)
            .map(|k| k.version.clone())
            .context("the image has no bootable kernel (/boot/vmlinuz-V with /lib/modules/V)")?;
        if !safe_word(&kernel) {
            bail!("unexpected characters in {kernel:?} read from the image");
        }
        Ok(Expect {
            kernel,
            expect: expect.clone(),
            secure_boot: None,
        })
    }

    /// (check name, what is expected), in the order the guest reports them.
    fn checks(&self) -> Vec<(String, String)> {
        let x = &self.expect;
        let mut v: Vec<(String, String)> = vec![
            ("cloud-init".into(), "status: done".into()),
            ("test-user".into(), format!("{TEST_USER} created by cloud-init")),
            ("kernel".into(), format!("{} (the image's newest)", self.kernel)),
        ];
        if let Some(sb) = &self.secure_boot {
            v.push(("secure boot".into(), "enabled (SecureBoot EFI variable = 1)".into()));
            v.push(("kernel lockdown".into(), "integrity or confidentiality".into()));
            if let Some(cn) = &sb.mok_cn {
                v.push(("MOK certificate".into(), format!("loaded by the kernel: '{cn}'")));
            }
            if x.nvidia_driver_version.is_some() {
                v.push((
                    "nvidia under Secure Boot".into(),
                    "accepted (modprobe loads it, or its init runs and finds no GPU)".into(),
                ));
            }
        }
        for m in &x.modprobe_blacklist {
            v.push((format!("module {m}"), "not loaded (blacklisted)".into()));
        }
        for m in &x.modules_load {
            v.push((format!("module {m}"), "loaded".into()));
        }
        for (k, want) in &x.sysctl {
            v.push((format!("sysctl {k}"), want.clone()));
        }
        if x.swap_off {
            v.push(("swap".into(), "off (swapon --show empty)".into()));
        }
        v.push(("machine-id".into(), "regenerated (32 hex digits)".into()));
        v.push(("ssh host keys".into(), "regenerated on first boot".into()));
        for u in &x.masked_units {
            v.push((format!("{u} masked"), "masked".into()));
        }
        for u in &x.enabled_units {
            v.push((format!("{u} enabled"), "enabled".into()));
        }
        v.push((
            "hostname".into(),
            format!("{GUEST_HOSTNAME} (cloud-init's, from the seed; not the image's)"),
        ));
        for u in &x.disabled_units {
            v.push((format!("{u} disabled"), "disabled or masked, not active".into()));
        }
        for u in &x.active_units {
            v.push((format!("{u} active"), "active".into()));
        }
        for c in &x.commands {
            v.push((format!("command {c}"), "on PATH".into()));
        }
        for (u, want) in &x.exec_start {
            v.push((format!("{u} ExecStart"), want.join(" ")));
        }
        if let Some(c) = &x.containerd {
            v.push(("containerd".into(), "active".into()));
            v.push((
                "containerd SystemdCgroup".into(),
                format!("SystemdCgroup = {}", c.systemd_cgroup),
            ));
        }
        if let Some(k) = &x.kubernetes {
            for p in &k.packages {
                v.push((format!("{p} version"), format!("v{}", k.version)));
            }
        }
        if let Some(nv) = &x.nvidia_driver_version {
            v.push(("nvidia modinfo version".into(), nv.clone()));
            v.push(("nvidia vermagic".into(), "the running kernel".into()));
        }
        for (m, params) in &x.modprobe_options {
            let opts: Vec<String> = params.iter().map(|(k, v)| format!("{k}={v}")).collect();
            v.push((format!("modprobe {m} options"), opts.join(" ")));
        }
        for u in &x.fail_soft_units {
            v.push((
                format!("{u} state"),
                "not failed, boot not held up (no GPU here: skipped or never started)".into(),
            ));
        }
        v.push(("systemd".into(), "running (no failed units)".into()));
        v
    }
}

fn safe_word(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "._+~:-".contains(c))
}

/// `kiln boot-test`: boot, check, print, and fail (exit 1) if anything failed.
pub fn cmd_boot_test(opts: &Opts) -> Result<()> {
    let report = boot_test(opts)?;
    let text = if opts.json {
        let mut s = serde_json::to_string_pretty(&report).context("serialising the report")?;
        s.push('\n');
        s
    } else {
        render(&report)
    };
    crate::host::progress::print_stdout(&text)?;
    if !report.passed {
        let mut msgs: Vec<String> = report
            .boots
            .iter()
            .filter_map(|b| b.error.as_ref().map(|e| format!("{}: {e}", b.label())))
            .collect();
        let failed: usize = report
            .boots
            .iter()
            .map(|b| b.checks.iter().filter(|c| !c.ok).count())
            .sum::<usize>()
            + report.checks.iter().filter(|c| !c.ok).count();
        if failed > 0 {
            msgs.push(format!("{failed} check(s) failed"));
        }
        bail!("boot test of {} failed: {}", opts.image.display(), msgs.join("; "));
    }
    Ok(())
}

/// Run the boots and collect the report (nothing printed).
pub fn boot_test(opts: &Opts) -> Result<Report> {
    if opts.timeout_secs < 30 {
        crate::user_bail!(
            "--timeout-secs {} is too short to boot anything; give at least 30",
            opts.timeout_secs
        );
    }
    let image = opts
        .image
        .canonicalize()
        .with_context(|| format!("opening {}", opts.image.display()))?;
    if opts.mok.is_some() && !opts.secure_boot {
        crate::user_bail!("--mok enrols a certificate for a Secure Boot boot: add --secure-boot");
    }
    if opts.secure_boot && opts.firmware == FirmwareChoice::Bios {
        crate::user_bail!("--secure-boot is a UEFI feature: use --firmware uefi (or leave --firmware out)");
    }
    let def = crate::definition::load_with(&opts.def, &opts.sets)?;
    let facts = crate::image::inspect::inspect_image(&image).with_context(|| format!("reading {}", image.display()))?;
    let mut expect = Expect::new(&facts, &def.expect)?;
    let tmp = tempfile::Builder::new()
        .prefix("kiln-boottest-")
        .tempdir()
        .context("creating a temporary directory")?;
    let secure_boot = if opts.secure_boot {
        let sb = SecureBootFirmware::prepare(tmp.path(), opts.mok.as_deref())?;
        expect.secure_boot = Some(SecureBootExpect {
            mok_cn: sb.mok_cn.clone(),
        });
        Some(sb)
    } else {
        None
    };
    let mok = secure_boot.as_ref().and_then(|sb| sb.mok_cn.clone());
    let (accel, accel_note) = detect_accel(tmp.path());
    tracing::info!("accelerator: {accel} ({accel_note})");
    let ctx = Ctx {
        image: image.clone(),
        format: facts.format,
        accel: accel.clone(),
        tmp: tmp.path().to_owned(),
        limits: Limits::from_total(opts.timeout_secs),
        expect,
        secure_boot,
    };
    let plan: Vec<(Firmware, u32)> = match opts.firmware {
        // Secure Boot is UEFI's: both boots go through it.
        FirmwareChoice::Both if opts.secure_boot => vec![(Firmware::Uefi, 1), (Firmware::Uefi, 2)],
        FirmwareChoice::Both => vec![(Firmware::Uefi, 1), (Firmware::Bios, 1)],
        FirmwareChoice::Uefi => vec![(Firmware::Uefi, 1), (Firmware::Uefi, 2)],
        FirmwareChoice::Bios => vec![(Firmware::Bios, 1), (Firmware::Bios, 2)],
    };
    let plan: Vec<(Firmware, u32)> = plan.into_iter().filter(|(_, run)| !opts.once || *run == 1).collect();
    let mut boots: Vec<Boot> = Vec::new();
    for (fw, run) in plan {
        // The second boot with the same firmware only proves a fresh identity: not
        // worth it once the first one failed.
        if run == 2 && boots.iter().any(|b| !b.passed()) {
            tracing::info!("skipping the second {} boot: the first one failed", fw.name());
            continue;
        }
        tracing::info!("booting {} through {} (run {run})", image.display(), fw.name());
        let b = boot(&ctx, fw, run)?;
        tracing::info!(
            "{} boot: {} in {:.1}s",
            b.label(),
            if b.passed() { "passed" } else { "FAILED" },
            b.wall_s
        );
        boots.push(b);
    }
    let checks = if opts.once { Vec::new() } else { identity_checks(&boots) };
    let passed = boots.iter().all(Boot::passed) && checks.iter().all(|c| c.ok);
    Ok(Report {
        image: image.display().to_string(),
        accel,
        accel_note,
        secure_boot: opts.secure_boot,
        mok,
        boots,
        checks,
        passed,
    })
}

/// machine-id and SSH host key differ between two fresh copies.
fn identity_checks(boots: &[Boot]) -> Vec<Check> {
    let mut out = Vec::new();
    for (name, get) in [
        (
            "machine-id differs between boots",
            (|b: &Boot| b.machine_id.clone()) as fn(&Boot) -> Option<String>,
        ),
        ("ssh host key differs between boots", |b: &Boot| b.host_key.clone()),
    ] {
        let vals: Vec<(String, Option<String>)> = boots.iter().map(|b| (b.label(), get(b))).collect();
        let found = vals
            .iter()
            .map(|(l, v)| format!("{l}: {}", v.as_deref().unwrap_or("-")))
            .collect::<Vec<_>>()
            .join(", ");
        let known: Vec<&String> = vals.iter().filter_map(|(_, v)| v.as_ref()).collect();
        let ok = known.len() >= 2 && known.len() == vals.len() && {
            let mut u = known.clone();
            u.sort();
            u.dedup();
            u.len() == known.len()
        };
        let found = if known.len() < 2 {
            format!("{found} (needs two completed boots)")
        } else {
            found
        };
        out.push(Check {
            name: name.into(),
            ok,
            found,
            expected: "different on every fresh copy".into(),
        });
    }
    out
}

// ---------------------------------------------------------------------------------
// One boot
// ---------------------------------------------------------------------------------

struct Ctx {
    image: PathBuf,
    format: ImageFormat,
    accel: String,
    tmp: PathBuf,
    limits: Limits,
    expect: Expect,
    secure_boot: Option<SecureBootFirmware>,
}

/// The firmware of a `--secure-boot` boot: OVMF's Secure Boot build and a variables
/// template (Microsoft's keys; the `--mok` certificate added to shim's MokList), copied
/// for each boot.
struct SecureBootFirmware {
    code: &'static str,
    vars: PathBuf,
    mok_cn: Option<String>,
}

impl SecureBootFirmware {
    fn prepare(tmp: &Path, mok: Option<&Path>) -> Result<SecureBootFirmware> {
        let (code, ms_vars) = OVMF_SECURE_BOOT
            .iter()
            .find(|(c, v)| Path::new(c).exists() && Path::new(v).exists())
            .copied()
            .ok_or_else(|| {
                crate::error::user(format!(
                    "--secure-boot: no OVMF Secure Boot firmware with Microsoft's keys found (looked for {}); \
                     install the ovmf package",
                    OVMF_SECURE_BOOT.map(|o| format!("{} + {}", o.0, o.1)).join(", ")
                ))
            })?;
        let vars = tmp.join("OVMF_VARS.secure-boot.fd");
        let Some(cert) = mok else {
            std::fs::copy(ms_vars, &vars).with_context(|| format!("copying {ms_vars}"))?;
            return Ok(SecureBootFirmware {
                code,
                vars,
                mok_cn: None,
            });
        };
        let bytes = std::fs::read(cert).map_err(|e| crate::error::user(format!("--mok {}: {e}", cert.display())))?;
        let (parsed, der) = crate::image::modsig::certificate_der(&bytes)
            .map_err(|e| crate::error::user(format!("--mok {}: {e}", cert.display())))?;
        let cn = crate::image::modsig::common_name(&parsed.tbs_certificate.subject).ok_or_else(|| {
            crate::error::user(format!(
                "--mok {}: the certificate's subject has no name",
                cert.display()
            ))
        })?;
        let cert_der = tmp.join("mok.der");
        std::fs::write(&cert_der, der).with_context(|| format!("writing {}", cert_der.display()))?;
        // Writing an authenticated variable into OVMF's variable store (firmware volume,
        // fault-tolerant-write journal) is virt-firmware's job; no crate does it.
        if crate::host::cmd::on_path("virt-fw-vars").is_none() {
            crate::user_bail!(
                "--mok needs virt-fw-vars on PATH to put the certificate in shim's MokList \
                 (PyPI virt-firmware: pip install virt-firmware)"
            );
        }
        Cmd::new("virt-fw-vars")
            .arg("-i")
            .arg(ms_vars)
            .arg("-o")
            .arg(&vars)
            .args(["--add-mok", SHIM_LOCK_GUID])
            .arg(&cert_der)
            .run()
            .with_context(|| format!("adding {} to shim's MokList in a copy of {ms_vars}", cert.display()))?;
        tracing::info!("Secure Boot: {code}, {ms_vars} with '{cn}' in shim's MokList");
        Ok(SecureBootFirmware {
            code,
            vars,
            mok_cn: Some(cn),
        })
    }
}

#[derive(Debug, Clone, Copy)]
struct Limits {
    firmware: u64,
    cloud_init: u64,
    checks: u64,
}

impl Limits {
    /// Firmware and GRUB get a fifth of the budget, the kernel until cloud-init is done
    /// three fifths, the checks a fifth.
    fn from_total(total: u64) -> Limits {
        Limits {
            firmware: total / 5,
            cloud_init: total * 3 / 5,
            checks: total - total / 5 - total * 3 / 5,
        }
    }
}

const PHASE_FIRMWARE: &str = "firmware -> kernel start";
const PHASE_CLOUD_INIT: &str = "kernel -> cloud-init done";
const PHASE_CHECKS: &str = "checks";

/// A running QEMU, killed (and reaped) when dropped.
struct Qemu {
    child: Child,
}

impl Drop for Qemu {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

fn spawn_qemu(mut cmd: Cmd, log: &Path) -> Result<Qemu> {
    tracing::info!(target: "kiln::cmd", "$ {}", cmd.display());
    let out = File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let err = out.try_clone()?;
    let c = cmd.command_mut();
    c.stdin(Stdio::null()).stdout(out).stderr(err);
    // If kiln dies, so does QEMU.
    unsafe {
        use std::os::unix::process::CommandExt;
        c.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = c
        .spawn()
        .context("could not start qemu-system-x86_64 (install qemu-system-x86)")?;
    Ok(Qemu { child })
}

fn boot(ctx: &Ctx, fw: Firmware, run: u32) -> Result<Boot> {
    let dir = ctx.tmp.join(format!("{}-{run}", fw.name()));
    std::fs::create_dir_all(&dir)?;
    let overlay = dir.join("overlay.qcow2");
    Cmd::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", ctx.format.as_str(), "-b"])
        .arg(&ctx.image)
        .arg(&overlay)
        .run()
        .context("creating the copy-on-write overlay")?;
    let seed = dir.join("seed.img");
    let instance = format!("kiln-boottest-{}-{run}-{}", fw.name(), std::process::id());
    let user_data = user_data(&ctx.expect);
    let meta_data = format!("instance-id: {instance}\nlocal-hostname: {GUEST_HOSTNAME}\n");
    crate::disk::fat::make_cidata(
        &seed,
        &[("user-data", user_data.as_bytes()), ("meta-data", meta_data.as_bytes())],
    )?;
    let serial = dir.join("serial.log");
    File::create(&serial)?;

    let mut cmd = Cmd::new("qemu-system-x86_64")
        .args([
            "-name",
            &format!("kiln-boottest-{}", fw.name()),
            "-machine",
            // OVMF's Secure Boot build keeps its variables behind SMM.
            if ctx.secure_boot.is_some() { "q35,smm=on" } else { "q35" },
            "-accel",
            &ctx.accel,
        ])
        // -nographic (not -display none) makes SeaBIOS mirror its text console, and so
        // GRUB's messages before GRUB's own serial terminal is up, to the serial port.
        .args([
            "-m",
            "2048",
            "-smp",
            "2",
            "-nodefaults",
            "-nographic",
            "-monitor",
            "none",
            "-no-reboot",
        ])
        .arg("-serial")
        .arg(format!("file:{}", serial.display()))
        .arg("-drive")
        .arg(format!(
            "file={},if=virtio,format=qcow2,cache=unsafe",
            overlay.display()
        ))
        .arg("-drive")
        .arg(format!("file={},if=virtio,format=raw,readonly=on", seed.display()))
        // The guest gets DHCP from QEMU but no way out: the boot test is offline. No
        // option ROM on the NIC: no iPXE, no network boot entries to try.
        .args([
            "-netdev",
            "user,id=net0,restrict=on",
            "-device",
            "virtio-net-pci,netdev=net0,romfile=",
        ])
        .args(["-device", "virtio-rng-pci"]);
    // No -cpu host under KVM: QEMU's default model boots Ubuntu everywhere, and -cpu host
    // aborts on some nested hosts (an MSR the host refuses).
    if fw == Firmware::Uefi {
        let (code, vars) = match &ctx.secure_boot {
            Some(sb) => (sb.code, sb.vars.as_path()),
            None => {
                let (c, v) = ovmf()?;
                (c, Path::new(v))
            }
        };
        let my_vars = dir.join("OVMF_VARS.fd");
        std::fs::copy(vars, &my_vars).with_context(|| format!("copying {}", vars.display()))?;
        if ctx.secure_boot.is_some() {
            // Only SMM code may write the variable store: the OS cannot turn Secure Boot off.
            cmd = cmd.args(["-global", "driver=cfi.pflash01,property=secure,value=on"]);
        }
        cmd = cmd
            .arg("-drive")
            .arg(format!("if=pflash,format=raw,unit=0,readonly=on,file={code}"))
            .arg("-drive")
            .arg(format!("if=pflash,format=raw,unit=1,file={}", my_vars.display()));
    }
    let qemu_log = dir.join("qemu.log");
    let start = Instant::now();
    let mut qemu = spawn_qemu(cmd, &qemu_log)?;
    let mut w = Watch::new(ctx, fw, run, &serial)?;
    let outcome = w.run(&mut qemu, start);
    // Powered off, or killed now.
    drop(qemu);
    crate::host::cancel::check()?;
    let wall_s = start.elapsed().as_secs_f64();
    let mut b = w.finish(outcome, wall_s);
    if let Some(logs) = std::env::var_os("KILN_BOOTTEST_LOGS") {
        let logs = PathBuf::from(logs);
        std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
        for (from, name) in [(&serial, "serial.log"), (&qemu_log, "qemu.log")] {
            let to = logs.join(format!("{}-{name}", b.label().replace('#', "-")));
            std::fs::copy(from, &to).with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
        }
    }
    if b.error.is_some() {
        let q = std::fs::read_to_string(&qemu_log).unwrap_or_default();
        let q: Vec<&str> = q
            .lines()
            .filter(|l| !l.trim().is_empty() && !l.contains("terminating on signal"))
            .collect();
        if !q.is_empty() {
            b.serial_tail
                .push(format!("--- qemu: {}", q[q.len().saturating_sub(5)..].join(" | ")));
        }
    }
    Ok(b)
}

fn ovmf() -> Result<(&'static str, &'static str)> {
    OVMF.iter()
        .find(|(c, v)| Path::new(c).exists() && Path::new(v).exists())
        .copied()
        .ok_or_else(|| {
            crate::error::user(format!(
                "no OVMF firmware found (looked for {}); install the ovmf package",
                OVMF.map(|o| o.0).join(", ")
            ))
        })
}

/// How a boot ended.
enum Outcome {
    Done,
    Failed(String),
}

/// Follows one boot's serial log.
struct Watch<'a> {
    ctx: &'a Ctx,
    fw: Firmware,
    run: u32,
    log: SerialLog,
    t_kernel: Option<f64>,
    t_cloud_init: Option<f64>,
    t_done: Option<f64>,
    /// name → (ok, value) as the guest reported them.
    reported: Vec<(String, bool, String)>,
    host_key: Option<String>,
}

impl<'a> Watch<'a> {
    fn new(ctx: &'a Ctx, fw: Firmware, run: u32, serial: &Path) -> Result<Watch<'a>> {
        Ok(Watch {
            ctx,
            fw,
            run,
            log: SerialLog::open(serial)?,
            t_kernel: None,
            t_cloud_init: None,
            t_done: None,
            reported: Vec::new(),
            host_key: None,
        })
    }

    fn run(&mut self, qemu: &mut Qemu, start: Instant) -> Outcome {
        let lim = self.ctx.limits;
        loop {
            // SIGINT/SIGTERM: stop now (the guard kills QEMU); `boot` turns it into the
            // cancellation error, not a failed boot.
            if crate::host::cancel::is_cancelled() {
                return Outcome::Failed("cancelled by a signal".into());
            }
            let now = start.elapsed().as_secs_f64();
            let lines = match self.log.poll() {
                Ok(l) => l,
                Err(e) => return Outcome::Failed(format!("reading the serial log: {e:#}")),
            };
            for line in lines {
                if let Some(msg) = self.line(&line, now) {
                    return Outcome::Failed(msg);
                }
            }
            if let Some(msg) = prompt_failure(&self.log.partial_line()) {
                return Outcome::Failed(msg);
            }
            if let Some(t_done) = self.t_done {
                // Give the guest a moment to power off; the guard kills it otherwise.
                match qemu.child.try_wait() {
                    Ok(Some(_)) => return Outcome::Done,
                    _ if now - t_done > 30.0 => {
                        tracing::warn!("the guest did not power off within 30 s; killing QEMU");
                        return Outcome::Done;
                    }
                    _ => {}
                }
            } else {
                match qemu.child.try_wait() {
                    Ok(Some(st)) => {
                        // A last look at what it printed.
                        if let Ok(lines) = self.log.poll() {
                            for line in lines {
                                if let Some(msg) = self.line(&line, now) {
                                    return Outcome::Failed(msg);
                                }
                            }
                        }
                        if self.t_done.is_some() {
                            return Outcome::Done;
                        }
                        return Outcome::Failed(format!("QEMU exited ({st}) during {}", self.current_phase()));
                    }
                    Err(e) => return Outcome::Failed(format!("waiting for QEMU: {e}")),
                    Ok(None) => {}
                }
                let (phase, since, limit) = match (self.t_kernel, self.t_cloud_init) {
                    (None, _) => (PHASE_FIRMWARE, 0.0, lim.firmware),
                    (Some(k), None) => (PHASE_CLOUD_INIT, k, lim.cloud_init),
                    (Some(_), Some(c)) => (PHASE_CHECKS, c, lim.checks),
                };
                if now - since > limit as f64 {
                    let what = match phase {
                        PHASE_FIRMWARE => "no kernel started (firmware or GRUB hung)",
                        PHASE_CLOUD_INIT => "cloud-init did not finish",
                        _ => "the checks did not finish",
                    };
                    return Outcome::Failed(format!("timed out after {limit} s in phase '{phase}': {what}"));
                }
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn current_phase(&self) -> &'static str {
        match (self.t_kernel, self.t_cloud_init) {
            (None, _) => PHASE_FIRMWARE,
            (Some(_), None) => PHASE_CLOUD_INIT,
            _ => PHASE_CHECKS,
        }
    }

    /// React to one serial line; `Some(message)` ends the boot as failed.
    fn line(&mut self, line: &str, now: f64) -> Option<String> {
        if self.t_kernel.is_none() && line.contains("Linux version ") {
            self.t_kernel = Some(now);
        }
        if marker(line, "KILN-PHASE cloud-init-done").is_some() {
            self.t_cloud_init.get_or_insert(now);
            self.t_kernel.get_or_insert(now);
            return None;
        }
        if let Some(rest) = marker(line, "KILN-CHECK") {
            let mut it = rest.splitn(3, ' ');
            let (name, status, value) = (
                it.next().unwrap_or(""),
                it.next().unwrap_or(""),
                it.next().unwrap_or("").trim(),
            );
            let name = name.replace('_', " ").replace("%u", "_");
            self.reported.retain(|(n, _, _)| *n != name);
            self.reported.push((name, status == "ok", value.to_string()));
            return None;
        }
        if let Some(rest) = marker(line, "KILN-INFO ssh-host-key") {
            self.host_key = Some(rest.to_string());
            return None;
        }
        if marker(line, "KILN-DONE").is_some() {
            self.t_done.get_or_insert(now);
            if self.t_cloud_init.is_none() {
                self.t_cloud_init = Some(now);
            }
            return None;
        }
        root_failure(line).or_else(|| prompt_failure(line))
    }

    fn finish(self, outcome: Outcome, wall_s: f64) -> Boot {
        let lim = self.ctx.limits;
        let d = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) => Some(b - a),
            _ => None,
        };
        let phases = vec![
            Phase {
                name: PHASE_FIRMWARE,
                limit_s: lim.firmware,
                duration_s: self.t_kernel,
                ok: self.t_kernel.is_some(),
            },
            Phase {
                name: PHASE_CLOUD_INIT,
                limit_s: lim.cloud_init,
                duration_s: d(self.t_kernel, self.t_cloud_init),
                ok: self.t_cloud_init.is_some(),
            },
            Phase {
                name: PHASE_CHECKS,
                limit_s: lim.checks,
                duration_s: d(self.t_cloud_init, self.t_done),
                ok: self.t_done.is_some(),
            },
        ];
        let error = match outcome {
            Outcome::Done => None,
            Outcome::Failed(m) => Some(m),
        };
        let mut checks = Vec::new();
        if error.is_none() || !self.reported.is_empty() {
            for (name, expected) in self.ctx.expect.checks() {
                let c = match self.reported.iter().find(|(n, _, _)| *n == name) {
                    Some((_, ok, value)) => Check {
                        name: name.clone(),
                        ok: *ok,
                        found: value.clone(),
                        expected,
                    },
                    None => Check {
                        name: name.clone(),
                        ok: false,
                        found: "not reported by the guest".into(),
                        expected,
                    },
                };
                checks.push(c);
            }
        }
        let machine_id = self
            .reported
            .iter()
            .find(|(n, ok, _)| n == "machine-id" && *ok)
            .map(|(_, _, v)| v.clone());
        let serial_tail = if error.is_some() {
            self.log.tail(TAIL_LINES)
        } else {
            Vec::new()
        };
        Boot {
            firmware: self.fw,
            run: self.run,
            wall_s,
            phases,
            checks,
            error,
            serial_tail,
            machine_id,
            host_key: self.host_key,
        }
    }
}

/// The rest of `line` after `tag` (a kiln marker the guest printed), if it has one.
fn marker<'l>(line: &'l str, tag: &str) -> Option<&'l str> {
    let i = line.find(tag)?;
    let rest = &line[i + tag.len()..];
    if rest.is_empty() || rest.starts_with(' ') {
        Some(rest.trim())
    } else {
        None
    }
}

/// The kernel or initramfs could not mount the root filesystem.
fn root_failure(line: &str) -> Option<String> {
    const PREFIX: &str = "kernel could not mount the root filesystem";
    if line.contains("ALERT!") && line.contains("does not exist") {
        let i = line.find("ALERT!").unwrap();
        return Some(format!("{PREFIX}: {}", line[i..].trim()));
    }
    // "Gave up waiting for root file system device" comes first; the ALERT line (with
    // the device) follows at once, and the (initramfs) prompt after it.
    if line.contains("VFS: Unable to mount root fs") {
        let msg = line.split("] ").last().unwrap_or(line).trim();
        return Some(format!("{PREFIX}: {msg}"));
    }
    None
}

/// An interactive prompt nobody will answer.
fn prompt_failure(partial: &str) -> Option<String> {
    if partial.trim_start().starts_with("(initramfs)") {
        return Some(
            "kernel could not mount the root filesystem: the initramfs dropped to its shell ((initramfs) prompt)"
                .into(),
        );
    }
    if partial.contains("grub rescue>") {
        return Some("GRUB could not load its modules or find its configuration (grub rescue> prompt)".into());
    }
    if partial.contains("Kernel panic - not syncing") {
        let i = partial.find("Kernel panic").unwrap();
        return Some(format!("kernel panic: {}", partial[i..].trim()));
    }
    None
}

/// A growing serial log file read line by line, with terminal escapes removed.
struct SerialLog {
    file: File,
    pos: u64,
    partial: Vec<u8>,
    lines: Vec<String>,
}

impl SerialLog {
    fn open(path: &Path) -> Result<SerialLog> {
        let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        Ok(SerialLog {
            file,
            pos: 0,
            partial: Vec::new(),
            lines: Vec::new(),
        })
    }

    /// The complete lines that arrived since the last call.
    fn poll(&mut self) -> Result<Vec<String>> {
        self.file.seek(SeekFrom::Start(self.pos))?;
        let mut buf = Vec::new();
        self.file.read_to_end(&mut buf)?;
        self.pos += buf.len() as u64;
        let mut new = Vec::new();
        for &b in &buf {
            if b == b'\n' {
                let l = clean(&self.partial).trim_end().to_string();
                self.partial.clear();
                new.push(l.clone());
                self.lines.push(l);
            } else {
                self.partial.push(b);
            }
        }
        Ok(new)
    }

    /// The end of the line being written (prompts have no newline after them).
    fn partial_line(&self) -> String {
        clean(&self.partial[self.partial.len().saturating_sub(300)..])
    }

    fn tail(&self, n: usize) -> Vec<String> {
        let mut all: Vec<String> = self.lines.iter().filter(|l| !l.trim().is_empty()).cloned().collect();
        let p = clean(&self.partial);
        if !p.trim().is_empty() {
            all.push(p);
        }
        all[all.len().saturating_sub(n)..].to_vec()
    }
}

/// Serial bytes → printable text: ANSI escape sequences and control characters removed.
fn clean(bytes: &[u8]) -> String {
    let s = String::from_utf8_lossy(bytes);
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            match chars.peek() {
                Some('[') => {
                    chars.next();
                    // CSI: parameters, then one final byte in @..~.
                    for c in chars.by_ref() {
                        if ('@'..='~').contains(&c) {
                            break;
                        }
                    }
                }
                Some(_) => {
                    chars.next();
                }
                None => {}
            }
        } else if c == '\t' {
            out.push(' ');
        } else if !c.is_control() {
            out.push(c);
        }
    }
    out
}

// ---------------------------------------------------------------------------------
// The guest side
// ---------------------------------------------------------------------------------

/// The check script, run as root by a transient systemd unit started from runcmd, so
/// that it can wait for cloud-init to finish. One `check` line per [`Expect::checks`]
/// entry, in that order; every value from the definition is single-quoted.
fn check_script(e: &Expect) -> String {
    let x = &e.expect;
    let mut s = String::from(
        r#"#!/bin/bash
# kiln boot-test: checks run in the guest; results go to the serial console.
con=/dev/ttyS0
emit() { printf '\r\nKILN-%s\r\n' "$*" > "$con"; }
# check NAME OK(1/0) VALUE; NAME has '_' for ' ' (and %u for '_').
check() {
  v=$(printf '%s' "$3" | tr '\r\n\t' '   ' | cut -c1-200)
  [ -n "$v" ] || v=-
  if [ "$2" = 1 ]; then emit "CHECK $1 ok $v"; else emit "CHECK $1 fail $v"; fi
}
is() { if [ "$1" = "$2" ]; then echo 1; else echo 0; fi; }
has_word() { printf '%s\n' "$1" | tr ' ' '\n' | grep -qxF -- "$2" && echo 1 || echo 0; }
st=$(timeout 900 cloud-init status --wait 2>&1 | tail -n1)
# Keep kernel and systemd status messages from splitting the result lines.
dmesg -n 1 2>/dev/null
kill -s RTMIN+21 1 2>/dev/null
emit "PHASE cloud-init-done $st"
check cloud-init "$(printf '%s' "$st" | grep -q 'status: done' && echo 1 || echo 0)" "$st"
u=$(id TESTUSER 2>&1)
check test-user "$(id -u TESTUSER >/dev/null 2>&1 && echo 1 || echo 0)" "$u"
k=$(uname -r)
"#,
    );
    s.push_str(&format!(
        "check kernel \"$(is \"$k\" {})\" \"$k\"\n",
        sh_quote(&e.kernel)
    ));
    if let Some(sb) = &e.secure_boot {
        s.push_str(&secure_boot_script(sb, x.nvidia_driver_version.is_some()));
    }
    // /sys/module names have '_' for '-'.
    let sys_module = |m: &str| sh_quote(&format!("/sys/module/{}", m.replace('-', "_")));
    for m in &x.modprobe_blacklist {
        let t = tag(&format!("module {m}"));
        s.push_str(&format!(
            "if [ -e {} ]; then check {t} 0 loaded; else check {t} 1 \"not loaded\"; fi\n",
            sys_module(m)
        ));
    }
    for m in &x.modules_load {
        let t = tag(&format!("module {m}"));
        s.push_str(&format!(
            "if [ -e {} ]; then check {t} 1 loaded; else check {t} 0 \"not loaded\"; fi\n",
            sys_module(m)
        ));
    }
    for (k, v) in &x.sysctl {
        s.push_str(&format!(
            "v=$(sysctl -n {} 2>&1 | tr '\\t' ' ' | tr -s ' ')\ncheck {} \"$(is \"$v\" {})\" \"$v\"\n",
            sh_quote(k),
            tag(&format!("sysctl {k}")),
            sh_quote(v)
        ));
    }
    if x.swap_off {
        s.push_str("sw=$(swapon --show --noheadings 2>&1)\nif [ -z \"$sw\" ]; then check swap 1 off; else check swap 0 \"$sw\"; fi\n");
    }
    s.push_str(
        r#"mid=$(cat /etc/machine-id 2>&1)
check machine-id "$(printf '%s' "$mid" | grep -Eqx '[0-9a-f]{32}' && echo 1 || echo 0)" "$mid"
keys=$(ls /etc/ssh/ 2>/dev/null | sed -n 's/^ssh_host_\(.*\)_key$/\1/p' | tr '\n' ' ')
fp=$(ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub 2>/dev/null | awk '{print $2}')
check ssh_host_keys "$([ -n "$keys" ] && [ -n "$fp" ] && echo 1 || echo 0)" "${keys}(ed25519 ${fp:-missing})"
[ -n "$fp" ] && emit "INFO ssh-host-key $fp"
"#,
    );
    for (units, state) in [(&x.masked_units, "masked"), (&x.enabled_units, "enabled")] {
        for u in units {
            s.push_str(&format!(
                "a=$(systemctl is-enabled {} 2>&1)\ncheck {} \"$(is \"$a\" {state})\" \"$a\"\n",
                sh_quote(u),
                tag(&format!("{u} {state}"))
            ));
        }
    }
    s.push_str(&format!(
        "h=$(hostname 2>&1)\ncheck hostname \"$(is \"$h\" {})\" \"$h (/etc/hostname: $(cat /etc/hostname 2>&1))\"\n",
        sh_quote(GUEST_HOSTNAME)
    ));
    for u in &x.disabled_units {
        s.push_str(&format!(
            r#"a=$(systemctl is-enabled {q} 2>&1); b=$(systemctl is-active {q} 2>&1)
if {{ [ "$a" = disabled ] || [ "$a" = masked ]; }} && [ "$b" != active ]; then ok=1; else ok=0; fi
check {t} "$ok" "$a, $b"
"#,
            q = sh_quote(u),
            t = tag(&format!("{u} disabled"))
        ));
    }
    for u in &x.active_units {
        s.push_str(&format!(
            r#"for i in $(seq 60); do systemctl is-active -q {q} && break; sleep 1; done
a=$(systemctl is-active {q} 2>&1)
check {t} "$(is "$a" active)" "$a"
"#,
            q = sh_quote(u),
            t = tag(&format!("{u} active"))
        ));
    }
    for c in &x.commands {
        s.push_str(&format!(
            "p=$(command -v {q} 2>/dev/null)\nif [ -n \"$p\" ]; then check {t} 1 \"$p\"; else check {t} 0 \"not on PATH\"; fi\n",
            q = sh_quote(c),
            t = tag(&format!("command {c}"))
        ));
    }
    for (u, want) in &x.exec_start {
        let mut conds = Vec::new();
        for w in want {
            match w.strip_prefix('!') {
                Some(absent) => conds.push(format!("[ \"$(has_word \"$x\" {})\" = 0 ]", sh_quote(absent))),
                None => conds.push(format!("[ \"$(has_word \"$x\" {})\" = 1 ]", sh_quote(w))),
            }
        }
        s.push_str(&format!(
            r#"x=$(systemctl show -p ExecStart --value {q} 2>&1 | tr ';' '\n' | sed -n 's/^ *argv\[\]=//p' | tr '\n' ' ')
if {conds}; then ok=1; else ok=0; fi
check {t} "$ok" "${{x:-no ExecStart}}"
"#,
            q = sh_quote(u),
            conds = conds.join(" && "),
            t = tag(&format!("{u} ExecStart"))
        ));
    }
    if let Some(c) = &x.containerd {
        s.push_str(
            r#"for i in $(seq 90); do systemctl is-active -q containerd && break; sleep 1; done
a=$(systemctl is-active containerd 2>&1)
check containerd "$(is "$a" active)" "$a"
"#,
        );
        let (good, bad) = if c.systemd_cgroup {
            ("true", "false")
        } else {
            ("false", "true")
        };
        s.push_str(&format!(
            r#"sc=$(cat {cfg} 2>/dev/null | grep -E '^[[:space:]]*SystemdCgroup[[:space:]]*=' | tr -d ' \t' | sort | uniq -c | tr -s ' ' | tr '\n' ' ')
if printf '%s' "$sc" | grep -q 'SystemdCgroup={good}' && ! printf '%s' "$sc" | grep -q 'SystemdCgroup={bad}'; then ok=1; else ok=0; fi
check containerd_SystemdCgroup "$ok" "${{sc:-no SystemdCgroup in {cfg_shown}}}"
"#,
            cfg = sh_quote(&c.config),
            cfg_shown = c.config,
        ));
    }
    if let Some(k) = &x.kubernetes {
        for p in &k.packages {
            let cmd = match p.as_str() {
                "kubelet" => "kubelet --version".to_string(),
                "kubeadm" => "kubeadm version -o short".to_string(),
                "kubectl" => "kubectl version --client".to_string(),
                other => format!("{} --version", sh_quote(other)),
            };
            s.push_str(&format!(
                "v=$(timeout 30 {cmd} 2>&1 | head -n1)\ncheck {} \"$(has_word \"$v\" {})\" \"$v\"\n",
                tag(&format!("{p} version")),
                sh_quote(&format!("v{}", k.version))
            ));
        }
    }
    if let Some(nv) = &x.nvidia_driver_version {
        s.push_str(&format!(
            r#"v=$(timeout 30 modinfo -F version nvidia 2>&1)
check nvidia_modinfo_version "$(is "$v" {nv})" "$v"
vm=$(timeout 30 modinfo -F vermagic nvidia 2>&1 | awk '{{print $1}}')
check nvidia_vermagic "$(is "$vm" "$(uname -r)")" "$vm (running $(uname -r))"
"#,
            nv = sh_quote(nv)
        ));
    }
    for (m, params) in &x.modprobe_options {
        let wants: Vec<String> = params.iter().map(|(k, v)| sh_quote(&format!("{k}={v}"))).collect();
        // modprobe -c prints every `options` line, module names with '_' for '-'.
        s.push_str(&format!(
            r#"o=$(timeout 30 modprobe -c 2>/dev/null | awk -v m={mq} '$1 == "options" && $2 == m {{ for (i = 3; i <= NF; i++) printf "%s ", $i }}')
ok=1
for want in {wants}; do [ "$(has_word "$o" "$want")" = 1 ] || ok=0; done
check {t} "$ok" "${{o:-no options for {m} in modprobe -c}}"
"#,
            mq = sh_quote(&m.replace('-', "_")),
            wants = wants.join(" "),
            t = tag(&format!("modprobe {m} options")),
        ));
    }
    s.push_str("ss=$(timeout 60 systemctl is-system-running --wait 2>&1)\n");
    // Units whose hardware is absent here: their state once boot is over.
    for u in &x.fail_soft_units {
        s.push_str(&format!(
            r#"st=$(systemctl show -p ActiveState --value {q} 2>&1); sub=$(systemctl show -p SubState --value {q} 2>&1); res=$(systemctl show -p Result --value {q} 2>&1)
if [ "$st" = active ] || [ "$st" = inactive ]; then ok=1; else ok=0; fi
check {t} "$ok" "$st/$sub result=$res $(systemctl is-enabled {q} 2>&1)"
"#,
            q = sh_quote(u),
            t = tag(&format!("{u} state"))
        ));
    }
    s.push_str(
        r#"failed=$(systemctl list-units --state=failed --no-legend --plain 2>/dev/null | awk '{print $1}' | tr '\n' ' ')
check systemd "$(is "$ss" running)" "$ss ${failed}"
emit DONE
sync
systemctl poweroff
"#,
    );
    s.replace("TESTUSER", TEST_USER)
}

/// The guest's Secure Boot checks: the firmware's `SecureBoot` variable (no mokutil
/// needed), the kernel's lockdown mode (Ubuntu kernels lock down under Secure Boot), the
/// enrolled certificate in the kernel log, and whether the kernel accepts `nvidia.ko`
/// (lockdown refuses a module without a signature it trusts: `Key was rejected by
/// service` / `Operation not permitted`; with no GPU here, an accepted module's init
/// fails with `No such device`).
fn secure_boot_script(sb: &SecureBootExpect, nvidia: bool) -> String {
    let mut s = String::from(
        r#"sbv=$(od -An -tu1 -j4 -N1 /sys/firmware/efi/efivars/SecureBoot-8be4df61-93ca-11d2-aa0d-00e098032b8c 2>&1 | tr -d ' ')
case $sbv in 1) check secure_boot 1 enabled ;; 0) check secure_boot 0 "disabled (SecureBoot=0)" ;; *) check secure_boot 0 "no SecureBoot variable: $sbv" ;; esac
ld=$(cat /sys/kernel/security/lockdown 2>&1)
if printf '%s' "$ld" | grep -Eq '\[(integrity|confidentiality)\]'; then ok=1; else ok=0; fi
check kernel_lockdown "$ok" "$ld"
"#,
    );
    if let Some(cn) = &sb.mok_cn {
        s.push_str(&format!(
            r#"l=$( (journalctl -k -b -o cat --no-pager 2>/dev/null || dmesg 2>/dev/null) | grep -F "Loaded X.509 cert "{q} | head -n1)
if [ -n "$l" ]; then check MOK_certificate 1 "$l"; else check MOK_certificate 0 "no 'Loaded X.509 cert '"{q}" in the kernel log"; fi
"#,
            q = sh_quote(&format!("'{cn}"))
        ));
    }
    if nvidia {
        s.push_str(
            r#"o=$(timeout 60 modprobe nvidia 2>&1); rc=$?
if [ "$rc" = 0 ] || printf '%s' "$o" | grep -q 'No such device'; then ok=1; else ok=0; fi
check nvidia_under_Secure_Boot "$ok" "modprobe rc=$rc ${o:-loaded}"
"#,
        );
    }
    s
}

/// A check name as the guest prints it: one word, `_` for ' ' and `%u` for '_'
/// (decoded by [`Watch::line`]), single-quoted for the shell.
fn tag(name: &str) -> String {
    sh_quote(&name.replace('_', "%u").replace(' ', "_"))
}

/// `s` as one shell word: single-quoted, a `'` as `'\''`.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// cloud-init user-data: the test user and the check script, started once the final
/// stage runs.
fn user_data(e: &Expect) -> String {
    let script: String = check_script(e).lines().map(|l| format!("      {l}\n")).collect();
    format!(
        "#cloud-config\n\
         users:\n\
         \x20 - name: {TEST_USER}\n\
         \x20   gecos: kiln boot-test\n\
         \x20   groups: [sudo]\n\
         \x20   sudo: \"ALL=(ALL) NOPASSWD:ALL\"\n\
         \x20   shell: /bin/bash\n\
         \x20   lock_passwd: true\n\
         # The image is under test, not the network: no locale generation (it installs\n\
         # the locales package from the internet when the image lacks it).\n\
         locale: false\n\
         package_update: false\n\
         package_upgrade: false\n\
         bootcmd:\n\
         \x20 - [sh, -c, 'printf \"\\r\\nKILN-PHASE bootcmd\\r\\n\" > /dev/ttyS0']\n\
         write_files:\n\
         \x20 - path: /var/lib/kiln-boottest/checks.sh\n\
         \x20   permissions: '0755'\n\
         \x20   content: |\n\
         {script}\
         runcmd:\n\
         \x20 - [systemd-run, --no-block, --unit=kiln-boottest, /bin/bash, /var/lib/kiln-boottest/checks.sh]\n"
    )
}

// ---------------------------------------------------------------------------------
// KVM or TCG
// ---------------------------------------------------------------------------------

/// A boot sector that writes "KILN-KVM-OK" to QEMU's debug console (port 0x402) and
/// exits through isa-debug-exit (port 0xf4): real-mode guest code, what a broken nested
/// KVM fails to run.
fn probe_sector() -> Vec<u8> {
    let mut code: Vec<u8> = vec![
        0xFA, // cli
        0x31, 0xC0, // xor ax, ax
        0x8E, 0xD8, // mov ds, ax
        0xFC, // cld
        0xBE, 0x1D, 0x7C, // mov si, 0x7c1d (msg)
        0xBA, 0x02, 0x04, // mov dx, 0x402
        0xAC, // .loop: lodsb
        0x84, 0xC0, // test al, al
        0x74, 0x03, // jz .done
        0xEE, // out dx, al
        0xEB, 0xF8, // jmp .loop
        0xBA, 0xF4, 0x00, // .done: mov dx, 0xf4
        0x30, 0xC0, // xor al, al
        0xEE, // out dx, al
        0xF4, // hlt
        0xEB, 0xFD, // jmp hlt
    ];
    debug_assert_eq!(code.len(), 0x1D);
    code.extend_from_slice(b"KILN-KVM-OK\0");
    code.resize(510, 0);
    code.extend_from_slice(&[0x55, 0xAA]);
    code
}

/// A working KVM runs the probe (firmware POST and the boot sector) in well under a
/// second. The KVM on our machines opens, runs it in about 5 s (real-mode code crawls:
/// GRUB then takes a minute to appear) and never gets a kernel going: that counts as
/// not working.
const KVM_PROBE_LIMIT: Duration = Duration::from_secs(2);

/// ("kvm" | "tcg", why).
fn detect_accel(tmp: &Path) -> (String, String) {
    match std::env::var("KILN_BOOTTEST_ACCEL").as_deref() {
        Ok("tcg") => return ("tcg".into(), "KILN_BOOTTEST_ACCEL=tcg".into()),
        Ok("kvm") => return ("kvm".into(), "KILN_BOOTTEST_ACCEL=kvm".into()),
        _ => {}
    }
    if !Path::new("/dev/kvm").exists() {
        return ("tcg".into(), "no /dev/kvm".into());
    }
    let kvm = run_probe(tmp, "kvm");
    let tcg = run_probe(tmp, "tcg");
    match (kvm, tcg) {
        (Ok(k), Ok(t)) if k <= KVM_PROBE_LIMIT && k <= t * 2 => (
            "kvm".into(),
            format!("KVM probe ran in {:.2}s (TCG {:.2}s)", k.as_secs_f64(), t.as_secs_f64()),
        ),
        (Ok(k), Ok(t)) => (
            "tcg".into(),
            format!(
                "KVM works too slowly here: probe {:.2}s under KVM, {:.2}s under TCG",
                k.as_secs_f64(),
                t.as_secs_f64()
            ),
        ),
        (Ok(k), Err(_)) if k <= KVM_PROBE_LIMIT => ("kvm".into(), format!("KVM probe ran in {:.2}s", k.as_secs_f64())),
        (Ok(k), Err(_)) => (
            "tcg".into(),
            format!("KVM works too slowly here: probe {:.2}s", k.as_secs_f64()),
        ),
        (Err(e), _) => ("tcg".into(), format!("KVM does not work here: {e:#}")),
    }
}

/// Boot the probe sector under `accel`; how long until it printed its marker.
fn run_probe(tmp: &Path, accel: &str) -> Result<Duration> {
    const LIMIT: Duration = Duration::from_secs(10);
    let dir = tmp.join(format!("probe-{accel}"));
    std::fs::create_dir_all(&dir)?;
    let img = dir.join("probe.img");
    let mut disk = probe_sector();
    disk.resize(1 << 20, 0);
    std::fs::write(&img, disk)?;
    let out = dir.join("debugcon.log");
    File::create(&out)?;
    // The machine the boots use, with nothing but the probe disk.
    let cmd = Cmd::new("qemu-system-x86_64")
        .args([
            "-machine",
            "q35",
            "-accel",
            accel,
            "-m",
            "128",
            "-nodefaults",
            "-display",
            "none",
            "-monitor",
            "none",
        ])
        .args(["-serial", "none", "-no-reboot", "-chardev"])
        .arg(format!("file,id=dbg,path={}", out.display()))
        .args([
            "-device",
            "isa-debugcon,iobase=0x402,chardev=dbg",
            "-device",
            "isa-debug-exit,iobase=0xf4,iosize=0x04",
        ])
        .arg("-drive")
        .arg(format!("file={},format=raw,if=virtio", img.display()));
    let log = dir.join("qemu.log");
    let t0 = Instant::now();
    let mut q = spawn_qemu(cmd, &log)?;
    loop {
        let seen = std::fs::read(&out).unwrap_or_default();
        if seen.windows(11).any(|w| w == b"KILN-KVM-OK") {
            return Ok(t0.elapsed());
        }
        if let Some(st) = q.child.try_wait()? {
            let seen = std::fs::read(&out).unwrap_or_default();
            if seen.windows(11).any(|w| w == b"KILN-KVM-OK") {
                return Ok(t0.elapsed());
            }
            let msg = std::fs::read_to_string(&log).unwrap_or_default();
            let msg: Vec<&str> = msg.lines().filter(|l| !l.contains("warning:")).collect();
            bail!(
                "QEMU with -accel {accel} exited ({st}) without running the probe: {}",
                msg.join(" ")
            );
        }
        if t0.elapsed() > LIMIT {
            bail!(
                "the probe boot sector did not run within {} s under -accel {accel}",
                LIMIT.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------------
// Output
// ---------------------------------------------------------------------------------

fn render(r: &Report) -> String {
    let mut s = format!("Image: {}\nAccelerator: {} ({})\n", r.image, r.accel, r.accel_note);
    if r.secure_boot {
        match &r.mok {
            Some(cn) => s.push_str(&format!("Secure Boot: enforced, '{cn}' enrolled in shim's MokList\n")),
            None => s.push_str("Secure Boot: enforced, no MOK enrolled\n"),
        }
    }
    s.push('\n');
    s.push_str("  BOOT     PHASE                       LIMIT    TIME  RESULT\n");
    for b in &r.boots {
        for p in &b.phases {
            let t = p.duration_s.map(|d| format!("{d:.1}s")).unwrap_or_else(|| "-".into());
            s.push_str(&format!(
                "  {:<7}  {:<26}  {:>4}s  {:>6}  {}\n",
                b.label(),
                p.name,
                p.limit_s,
                t,
                if p.ok { "ok" } else { "FAIL" }
            ));
        }
        s.push_str(&format!(
            "  {:<7}  {:<26}  {:>5}  {:>6}\n",
            b.label(),
            "total (QEMU wall time)",
            "",
            format!("{:.1}s", b.wall_s)
        ));
    }
    for b in &r.boots {
        s.push_str(&format!("\n{} boot:\n", b.label()));
        if let Some(e) = &b.error {
            s.push_str(&format!("  FAILED: {e}\n  last serial lines:\n"));
            for l in &b.serial_tail {
                s.push_str(&format!("    | {l}\n"));
            }
        }
        if !b.checks.is_empty() {
            s.push_str(&crate::image::verify::render_table(&b.checks));
        }
    }
    s.push('\n');
    s.push_str(&crate::image::verify::render_table(&r.checks));
    if r.passed {
        let n: usize = r.boots.iter().map(|b| b.checks.len()).sum::<usize>() + r.checks.len();
        s.push_str(&format!("\nall {n} checks passed in {} boots\n", r.boots.len()));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The expectations of the project's own definitions (the NVIDIA one for `gpu`).
    fn expect(gpu: bool) -> Expect {
        let file = if gpu {
            "ubuntu-2204-nvidia-565-firmware1.toml"
        } else {
            "ubuntu-2204-gpu-ready-nodriver.toml"
        };
        let def = crate::definition::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("images").join(file)).unwrap();
        Expect {
            kernel: "5.15.0-204-generic".into(),
            expect: def.expect,
            secure_boot: None,
        }
    }

    #[test]
    fn probe_sector_layout() {
        let s = probe_sector();
        assert_eq!(s.len(), 512);
        assert_eq!(&s[510..], &[0x55, 0xAA]);
        assert_eq!(&s[0x1D..0x1D + 11], b"KILN-KVM-OK");
    }

    #[test]
    fn serial_cleaning_and_markers() {
        assert_eq!(clean(b"\x1b[0;32m  OK  \x1b[0m] Started\r"), "  OK  ] Started");
        assert_eq!(
            marker("[  12.3] foo KILN-CHECK kernel ok 5.15", "KILN-CHECK"),
            Some("kernel ok 5.15")
        );
        assert_eq!(marker("KILN-DONE", "KILN-DONE"), Some(""));
        assert_eq!(marker("KILN-DONEX", "KILN-DONE"), None);
        let alert = "ALERT!  UUID=0badc0de-0000-4000-8000-000000000000 does not exist.  Dropping to a shell!";
        let m = root_failure(alert).unwrap();
        assert!(
            m.starts_with("kernel could not mount the root filesystem: ALERT!"),
            "{m}"
        );
        assert!(root_failure("[    3.2] VFS: Unable to mount root fs on unknown-block(0,0)").is_some());
        assert!(root_failure("[  OK  ] Reached target Local File Systems.").is_none());
        assert!(prompt_failure("(initramfs) ").unwrap().contains("root filesystem"));
        assert!(prompt_failure("grub rescue> ").is_some());
        assert!(prompt_failure("Ubuntu 22.04 login: ").is_none());
    }

    #[test]
    fn user_data_is_yaml_with_the_script() {
        let ud = user_data(&expect(true));
        assert!(ud.starts_with("#cloud-config\n"));
        assert!(ud.contains("      #!/bin/bash\n"), "{ud}");
        assert!(ud.contains("5.15.0-204-generic"));
        assert!(ud.contains("has_word \"$v\" 'v1.30.0'"), "{ud}");
        assert!(ud.contains("'NVreg_EnableGpuFirmware=1' 'NVreg_PreserveVideoMemoryAllocations=1'"));
        assert!(!ud.contains('\t'), "YAML block scalars must not contain tabs");
        assert!(!user_data(&expect(false)).contains("modinfo"));
        // Every line of the script is indented inside the block scalar.
        let block: Vec<&str> = ud
            .lines()
            .skip_while(|l| !l.contains("content: |"))
            .skip(1)
            .take_while(|l| !l.starts_with("runcmd:"))
            .collect();
        assert!(
            block.iter().all(|l| l.starts_with("      ") || l.is_empty()),
            "{block:?}"
        );
    }

    #[test]
    fn script_check_names_match_expectations() {
        let sb = |gpu, mok: Option<&str>| Expect {
            secure_boot: Some(SecureBootExpect {
                mok_cn: mok.map(str::to_string),
            }),
            ..expect(gpu)
        };
        for e in [
            expect(false),
            expect(true),
            sb(false, None),
            sb(true, Some("Example Corp's module signing")),
        ] {
            let gpu = e.expect.nvidia_driver_version.is_some();
            let script = check_script(&e);
            let names: Vec<String> = e.checks().into_iter().map(|(n, _)| n).collect();
            for name in &names {
                let bare = name.replace('_', "%u").replace(' ', "_");
                let line = [format!("check {} ", tag(name)), format!("check {bare} ")];
                assert!(
                    line.iter().any(|l| script.contains(l.as_str())),
                    "no check line for {name:?} in\n{script}"
                );
            }
            for want in [
                "module nouveau",
                "module br_netfilter",
                "sysctl net.ipv4.ip_forward",
                "swap",
                "swap.target masked",
                "containerd.service enabled",
                "kubelet.service enabled",
                "containerd",
                "kubectl version",
            ] {
                assert!(names.iter().any(|n| n == want), "{want} not in {names:?}");
            }
            // The generated script parses.
            let out = std::process::Command::new("bash")
                .args(["-n", "-c", &script])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}\n{script}",
                String::from_utf8_lossy(&out.stderr)
            );
            let nvidia = ["nvidia modinfo version", "nvidia vermagic", "modprobe nvidia options"];
            for n in nvidia {
                assert_eq!(names.iter().any(|x| x == n), gpu, "{n} in {names:?}");
            }
            let secure = e.secure_boot.is_some();
            for n in ["secure boot", "kernel lockdown"] {
                assert_eq!(names.iter().any(|x| x == n), secure, "{n} in {names:?}");
            }
            assert_eq!(names.iter().any(|x| x == "nvidia under Secure Boot"), secure && gpu);
            let mok = e.secure_boot.as_ref().is_some_and(|s| s.mok_cn.is_some());
            assert_eq!(names.iter().any(|x| x == "MOK certificate"), mok, "{names:?}");
        }
    }

    /// The Secure Boot checks, run by bash against what a guest shows: the enrolled
    /// certificate found in a kernel log line as the kernel prints it (a CN with a quote
    /// in it), and `modprobe nvidia`'s outcomes under lockdown.
    #[test]
    fn secure_boot_checks_read_what_the_guest_shows() {
        let sb = SecureBootExpect {
            mok_cn: Some("Example Corp's module signing".into()),
        };
        let script = secure_boot_script(&sb, true);
        let run = |log: &str, modprobe: &str| -> String {
            // Stand-ins for the guest's journalctl and modprobe, first on PATH (`timeout`
            // runs modprobe as a program); `check` prints its verdict.
            let bin = tempfile::tempdir().unwrap();
            for (name, body) in [
                ("journalctl", format!("printf '%s\\n' {}", sh_quote(log))),
                ("modprobe", modprobe.to_string()),
            ] {
                let p = bin.path().join(name);
                std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
                std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
            }
            let path = format!("{}:{}", bin.path().display(), std::env::var("PATH").unwrap_or_default());
            let out = std::process::Command::new("bash")
                .args(["-c", &format!("check() {{ echo \"$1 $2\"; }}\n{script}")])
                .env("PATH", path)
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        let taken = run(
            "integrity: Loaded X.509 cert 'Example Corp's module signing: 3c1a...'",
            "echo 'modprobe: ERROR: could not insert nvidia: No such device' >&2; exit 1",
        );
        assert!(taken.contains("MOK_certificate 1"), "{taken}");
        assert!(taken.contains("nvidia_under_Secure_Boot 1"), "{taken}");
        let refused = run(
            "integrity: Loaded X.509 cert 'Canonical Ltd. Secure Boot Signing (2017): 242a...'",
            "echo 'modprobe: ERROR: could not insert nvidia: Key was rejected by service' >&2; exit 1",
        );
        assert!(refused.contains("MOK_certificate 0"), "{refused}");
        assert!(refused.contains("nvidia_under_Secure_Boot 0"), "{refused}");
        let loaded = run("", "exit 0");
        assert!(loaded.contains("nvidia_under_Secure_Boot 1"), "{loaded}");
        assert!(loaded.contains("MOK_certificate 0"), "{loaded}");
        // Both firmware checks report, whatever this host is.
        for c in ["secure_boot ", "kernel_lockdown "] {
            assert!(taken.lines().any(|l| l.starts_with(c)), "{c}: {taken}");
        }
    }

    /// The guest checks what the definition expects: another Kubernetes version, an
    /// extra sysctl or unit is a definition edit, and shows in the script.
    #[test]
    fn expectations_drive_the_script() {
        let mut e = expect(true);
        e.expect.kubernetes.as_mut().unwrap().version = "1.31.0".into();
        e.expect.sysctl.push(("vm.max_map_count".into(), "262144".into()));
        e.expect.enabled_units.push("nvidia-persistenced.service".into());
        e.expect.nvidia_driver_version = Some("570.86.15".into());
        let script = check_script(&e);
        assert!(script.contains("has_word \"$v\" 'v1.31.0'"), "{script}");
        assert!(!script.contains("1.30.0"), "{script}");
        assert!(script.contains("sysctl -n 'vm.max_map_count'"), "{script}");
        assert!(
            script.contains("check 'sysctl_vm.max%umap%ucount' \"$(is \"$v\" '262144')\""),
            "{script}"
        );
        assert!(
            script.contains("systemctl is-enabled 'nvidia-persistenced.service'"),
            "{script}"
        );
        assert!(script.contains("is \"$v\" '570.86.15'"), "{script}");
        let checks = e.checks();
        assert!(
            checks.contains(&("kubelet version".into(), "v1.31.0".into())),
            "{checks:?}"
        );
        assert!(checks.contains(&("sysctl vm.max_map_count".into(), "262144".into())));
        // Nothing expected, nothing checked but the basics.
        let bare = Expect {
            kernel: "5.15.0-204-generic".into(),
            expect: Expectations::default(),
            secure_boot: None,
        };
        let names: Vec<String> = bare.checks().into_iter().map(|(n, _)| n).collect();
        assert_eq!(
            names,
            [
                "cloud-init",
                "test-user",
                "kernel",
                "machine-id",
                "ssh host keys",
                "hostname",
                "systemd"
            ]
        );
        assert_eq!(sh_quote("it's"), "'it'\\''s'");
        assert_eq!(tag("sysctl net.ipv4.ip_forward"), "'sysctl_net.ipv4.ip%uforward'");
    }

    /// Issue #17 in the guest: the sysctls' live values, the apt timers disabled and
    /// inactive, the host name cloud-init's, unpigz, auditd active, and the NVIDIA
    /// units' state without a GPU (not failed) and persistenced's command line. Each
    /// expectation kind makes its check; without it, none.
    #[test]
    fn node_readiness_in_the_guest() {
        let gpu = expect(true);
        let names: Vec<String> = gpu.checks().into_iter().map(|(n, _)| n).collect();
        for want in [
            "sysctl vm.overcommit_memory",
            "sysctl kernel.panic",
            "sysctl kernel.panic_on_oops",
            "sysctl net.ipv6.conf.all.forwarding",
            "apt-daily.timer disabled",
            "apt-daily-upgrade.timer disabled",
            "hostname",
            "command unpigz",
            "auditd.service enabled",
            "auditd.service active",
            "nvidia-fabricmanager.service enabled",
            "nvidia-fabricmanager.service state",
            "nvidia-persistenced.service state",
            "nvidia-persistenced.service ExecStart",
        ] {
            assert!(names.iter().any(|n| n == want), "{want} not in {names:?}");
        }
        // The fail-soft states are read once boot is over, before the systemd check.
        let pos = |n: &str| names.iter().position(|x| x == n).unwrap();
        assert!(pos("nvidia-fabricmanager.service state") < pos("systemd"));
        let script = check_script(&gpu);
        assert!(script.contains("systemctl show -p ActiveState --value 'nvidia-fabricmanager.service'"));
        assert!(
            script.contains("[ \"$(has_word \"$x\" '--persistence-mode')\" = 1 ] && [ \"$(has_word \"$x\" '--no-persistence-mode')\" = 0 ]"),
            "{script}"
        );
        assert!(script.contains("systemctl is-enabled 'apt-daily.timer'"), "{script}");
        assert!(script.contains("command -v 'unpigz'"), "{script}");
        assert!(
            script.contains("check hostname \"$(is \"$h\" 'kiln-boottest')\""),
            "{script}"
        );
        let ss = script
            .find("ss=$(timeout 60 systemctl is-system-running --wait")
            .unwrap();
        assert!(ss < script.find("check 'nvidia-persistenced.service_state'").unwrap());
        // The ExecStart extraction and the state test work in a shell.
        let out = std::process::Command::new("bash")
            .args([
                "-c",
                r#"x=$(printf '%s' '{ path=/usr/bin/nvidia-persistenced ; argv[]=/usr/bin/nvidia-persistenced --user nvidia-persistenced --persistence-mode --verbose ; ignore_errors=no ; start_time=[n/a] }' | tr ';' '\n' | sed -n 's/^ *argv\[\]=//p' | tr '\n' ' '); printf '%s' "$x""#,
            ])
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "/usr/bin/nvidia-persistenced --user nvidia-persistenced --persistence-mode --verbose"
        );
        // The GPU-ready image: the node checks, none of the NVIDIA units.
        let plain: Vec<String> = expect(false).checks().into_iter().map(|(n, _)| n).collect();
        assert!(plain.iter().any(|n| n == "auditd.service active"));
        assert!(!plain.iter().any(|n| n.contains("nvidia")), "{plain:?}");
    }

    #[test]
    fn limits_split_the_budget() {
        let l = Limits::from_total(600);
        assert_eq!((l.firmware, l.cloud_init, l.checks), (120, 360, 120));
        let l = Limits::from_total(31);
        assert_eq!(l.firmware + l.cloud_init + l.checks, 31);
    }

    #[test]
    fn identity_must_differ() {
        let mk = |fw, mid: Option<&str>, key: Option<&str>| Boot {
            firmware: fw,
            run: 1,
            wall_s: 1.0,
            phases: vec![],
            checks: vec![],
            error: None,
            serial_tail: vec![],
            machine_id: mid.map(str::to_string),
            host_key: key.map(str::to_string),
        };
        let c = identity_checks(&[
            mk(Firmware::Uefi, Some("a"), Some("k1")),
            mk(Firmware::Bios, Some("b"), Some("k2")),
        ]);
        assert!(c.iter().all(|c| c.ok), "{c:?}");
        let c = identity_checks(&[
            mk(Firmware::Uefi, Some("a"), Some("k1")),
            mk(Firmware::Bios, Some("a"), Some("k2")),
        ]);
        assert!(!c[0].ok && c[1].ok);
        let c = identity_checks(&[mk(Firmware::Uefi, Some("a"), Some("k1"))]);
        assert!(c.iter().all(|c| !c.ok));
    }
}
