//! Image definitions: `images/NAME.toml`, validated with errors that name the file and
//! the key. Unknown keys are errors. A definition may `extends` another one (the NVIDIA
//! image builds on the GPU-ready one): it inherits its stages, repositories and payload
//! facts, and adds or replaces stages by name.
//!
//! `[expect]` says what `kiln verify` and `kiln boot-test` demand of the finished image
//! (the spec's facts: Kubernetes version, units, sysctls, modprobe options, driver
//! version...). The stages say how the image is made; the expectations what it must
//! be — each fact written once, read by both commands. A definition that extends
//! another adds to its expectations (see [`Expectations`]).
//!
//! `[base]` pins the base a build starts from when no `--base` is given (the cloud
//! image's URL, sha256, signed `SHA256SUMS` and the key that signs it; see
//! `build::base`). An extending definition inherits it, or replaces the whole table.
//!
//! `[parameters]` make one definition a family of variants (issue #16): each parameter
//! has a default and a table per allowed value (`[parameters.driver.values."550"]`)
//! whose fields say what the value means (the package list, the exact driver version).
//! `${driver}` (the value) and `${driver.FIELD}` in any string of the definition and in
//! its package lists are replaced before anything else is read, so a variant's name,
//! repositories, packages and `[expect]`ations all follow from `--set driver=550`.
//! Parameters are inherited down an `extends` chain; an extending definition may add
//! values or change the default.
//!
//! Paths inside a definition (package lists, overlays, hooks, keys) are named, not
//! pathed: `packages = ["kubernetes"]` is `package-lists/kubernetes.list` at the project
//! root, the directory holding `images/`.

use crate::error::user;
use crate::user_bail;
use anyhow::{Context, Result};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct RawDef {
    extends: Option<String>,
    name: Option<String>,
    description: Option<String>,
    disk_size: Option<String>,
    /// Install the cloud image's bootloader (UEFI shim+grub, BIOS grub) when assembling
    /// a disk from a root tarball. Default true; false for roots that aren't bootable
    /// systems (test fixtures, containers).
    bootloader: Option<bool>,
    payload: Option<RawPayload>,
    #[serde(default)]
    repository: Vec<Repository>,
    #[serde(default)]
    stage: Vec<RawStage>,
    expect: Option<RawExpect>,
    base: Option<RawBase>,
    parameters: Option<BTreeMap<String, RawParameter>>,
}

/// `[parameters.NAME]` as written. The allowed values are the keys of `values`; each
/// value's table maps field names to what `${NAME.FIELD}` becomes.
#[derive(Debug, Deserialize, Clone, Default)]
#[serde(deny_unknown_fields)]
struct RawParameter {
    description: Option<String>,
    default: Option<String>,
    #[serde(default)]
    values: BTreeMap<String, BTreeMap<String, String>>,
}

/// `[base]` as written: the pinned cloud image a build starts from when no `--base` is
/// given. A definition that sets it replaces its parent's whole table.
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct RawBase {
    url: String,
    sha256: String,
    sha256sums: String,
    signature: String,
    key: String,
    fingerprint: String,
}

/// `[expect]` as written; every key optional, merged down an `extends` chain.
#[derive(Debug, Deserialize, Clone, Default)]
#[serde(deny_unknown_fields)]
struct RawExpect {
    os: Option<RawOs>,
    architecture: Option<String>,
    kubernetes: Option<RawKubernetes>,
    min_versions: Option<BTreeMap<String, String>>,
    enabled_units: Option<Vec<String>>,
    masked_units: Option<Vec<String>>,
    disabled_units: Option<Vec<String>>,
    active_units: Option<Vec<String>>,
    fail_soft_units: Option<Vec<String>>,
    exec_start: Option<BTreeMap<String, String>>,
    commands: Option<Vec<String>>,
    swap_off: Option<bool>,
    modules_load: Option<Vec<String>>,
    modprobe_blacklist: Option<Vec<String>>,
    modprobe_options: Option<BTreeMap<String, String>>,
    sysctl: Option<BTreeMap<String, toml::Value>>,
    containerd: Option<RawContainerd>,
    runtime_classes: Option<BTreeMap<String, String>>,
    nvidia_driver_version: Option<String>,
    module_signer: Option<String>,
    kernel: Option<String>,
    absent_packages: Option<String>,
}

#[derive(Debug, Deserialize, Clone, Default)]
#[serde(deny_unknown_fields)]
struct RawOs {
    id: Option<String>,
    version_id: Option<String>,
    codename: Option<String>,
}

#[derive(Debug, Deserialize, Clone, Default)]
#[serde(deny_unknown_fields)]
struct RawKubernetes {
    version: Option<String>,
    packages: Option<Vec<String>>,
}

#[derive(Debug, Deserialize, Clone, Default)]
#[serde(deny_unknown_fields)]
struct RawContainerd {
    config: Option<String>,
    socket: Option<String>,
    systemd_cgroup: Option<bool>,
    runtimes: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Deserialize, Clone, Default)]
#[serde(deny_unknown_fields)]
struct RawPayload {
    uri: Option<String>,
    virtualization: Option<String>,
    variant: Option<String>,
    kubernetes_package: Option<String>,
    gpu: Option<GpuFacts>,
}

#[derive(Debug, Deserialize, Clone, PartialEq, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct GpuFacts {
    pub vendor: String,
    pub models: Vec<String>,
    /// The installed package whose upstream version is the payload's driver version.
    pub driver_package: String,
}

/// A third-party apt repository (never trusted=yes: a key file is required).
#[derive(Debug, Deserialize, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Repository {
    pub id: String,
    pub uri: String,
    pub suite: String,
    #[serde(default)]
    pub components: Vec<String>,
    /// Path of the signing key, relative to the project root (e.g. keys/x.asc).
    pub key: String,
}

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct RawStage {
    name: String,
    /// Place a new stage before this one (for definitions that extend another).
    before: Option<String>,
    #[serde(default)]
    full_upgrade: bool,
    /// `true`/`false`, or a parameter field holding one (`"${modules.kernel_headers}"`).
    #[serde(default)]
    kernel_headers: Flag,
    /// Pin the image kernel: once the stage's packages are in (the list installs
    /// linux-image-K), every other kernel and the meta packages that pull one in are
    /// removed. Empty (a parameter field) pins nothing.
    #[serde(default)]
    kernel: String,
    #[serde(default)]
    repositories: Vec<String>,
    #[serde(default)]
    packages: Vec<String>,
    #[serde(default)]
    hold: Vec<String>,
    #[serde(default)]
    overlays: Vec<String>,
    #[serde(default)]
    hooks: Vec<String>,
    /// Kernel modules that must exist, with a matching vermagic, for every image kernel.
    #[serde(default)]
    require_modules: Vec<String>,
}

/// A boolean key written as `true`/`false` or as a string that a parameter field makes
/// `"true"` or `"false"` (strings are what `${NAME.FIELD}` replaces).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Flag(bool);

impl<'de> Deserialize<'de> for Flag {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Written {
            Bool(bool),
            Text(String),
        }
        match Written::deserialize(d)? {
            Written::Bool(b) => Ok(Flag(b)),
            Written::Text(t) => match t.as_str() {
                "true" => Ok(Flag(true)),
                "false" => Ok(Flag(false)),
                // The shape check before `${...}` is replaced; the substituted file is read again.
                t if t.contains("${") => Ok(Flag(false)),
                _ => Err(serde::de::Error::custom(format!("`{t}` is not true or false"))),
            },
        }
    }
}

/// A validated, fully resolved image definition.
#[derive(Debug, Clone)]
pub struct ImageDef {
    pub file: PathBuf,
    /// The definition files read: this one, then what it extends, up the chain.
    pub chain: Vec<PathBuf>,
    pub project_root: PathBuf,
    pub name: String,
    pub description: String,
    pub disk_size: u64,
    pub bootloader: bool,
    pub payload: PayloadFacts,
    pub repositories: Vec<Repository>,
    pub stages: Vec<Stage>,
    /// What `verify` and `boot-test` demand of the image (`[expect]`).
    pub expect: Expectations,
    /// The pinned base (`[base]`), if the definition has one.
    pub base: Option<BaseSpec>,
    /// The definition's parameters with the values this variant was loaded with.
    pub parameters: Vec<Parameter>,
}

/// One parameter of a definition, resolved for a variant.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Parameter {
    pub name: String,
    pub description: String,
    pub default: String,
    /// Every allowed value, sorted.
    pub allowed: Vec<String>,
    /// The value of this variant (`--set NAME=VALUE`, else the default).
    pub value: String,
}

/// `--set NAME=VALUE`: a parameter value chosen on the command line.
#[derive(Debug, Clone, PartialEq)]
pub struct Setting {
    pub name: String,
    pub value: String,
}

impl std::str::FromStr for Setting {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.split_once('=') {
            Some((n, v)) if !n.trim().is_empty() && !v.trim().is_empty() => Ok(Setting {
                name: n.trim().to_string(),
                value: v.trim().to_string(),
            }),
            _ => Err(format!("`{s}` is not NAME=VALUE (e.g. driver=550)")),
        }
    }
}

/// What `${NAME}` and `${NAME.FIELD}` stand for in one variant.
#[derive(Debug, Clone, Default)]
pub struct Substitutions(BTreeMap<String, String>);

impl Substitutions {
    /// Replace every `${...}` in `s`; `origin` names the place for errors.
    pub fn apply(&self, s: &str, origin: &str) -> Result<String> {
        let mut out = String::with_capacity(s.len());
        let mut rest = s;
        while let Some(i) = rest.find("${") {
            out.push_str(&rest[..i]);
            let after = &rest[i + 2..];
            let Some(j) = after.find('}') else {
                user_bail!("{origin}: `${{` without a closing `}}` in \"{s}\"");
            };
            let key = &after[..j];
            match self.0.get(key) {
                Some(v) => out.push_str(v),
                None => {
                    let known: Vec<String> = self.0.keys().map(|k| format!("${{{k}}}")).collect();
                    user_bail!(
                        "{origin}: `${{{key}}}` names no parameter or field of one (known: {})",
                        if known.is_empty() {
                            "none: the definition has no [parameters]".to_string()
                        } else {
                            known.join(", ")
                        }
                    );
                }
            }
            rest = &after[j + 1..];
        }
        out.push_str(rest);
        Ok(out)
    }

    /// Every string in a TOML tree (not the keys).
    fn apply_value(&self, v: &mut toml::Value, origin: &str) -> Result<()> {
        match v {
            toml::Value::String(s) => *s = self.apply(s, origin)?,
            toml::Value::Array(a) => {
                for x in a {
                    self.apply_value(x, origin)?;
                }
            }
            toml::Value::Table(t) => {
                for (k, x) in t.iter_mut() {
                    self.apply_value(x, &format!("{origin}.{k}"))?;
                }
            }
            _ => {}
        }
        Ok(())
    }
}

/// The validated `[base]` table: where the base image is, its sha256, the signed
/// checksum list that must agree, and the OpenPGP key (file and fingerprint) that must
/// have signed it.
#[derive(Debug, Clone, PartialEq)]
pub struct BaseSpec {
    /// A dated release serial, never a moving alias such as `current`.
    pub url: String,
    /// Lower-case hex.
    pub sha256: String,
    /// The `SHA256SUMS` listing the image.
    pub sha256sums: String,
    /// Its detached OpenPGP signature (`SHA256SUMS.gpg`).
    pub signature: String,
    /// The signing key's file (armored or binary), resolved against the project root.
    pub key: PathBuf,
    /// The fingerprint that key must have: 40 upper-case hex digits, no spaces.
    pub fingerprint: String,
    /// The definition file that set the table, for messages.
    pub origin: PathBuf,
}

/// The validated `[expect]` table: what the finished image must show. Empty or `None`
/// parts demand nothing. Down an `extends` chain lists are joined (the parent's
/// entries first), tables are merged key by key and single values replaced, the
/// extending definition winning.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Expectations {
    /// os-release `ID`, `VERSION_ID`, `VERSION_CODENAME`.
    pub os: Option<OsRelease>,
    /// The dpkg architecture (`amd64`).
    pub architecture: Option<String>,
    pub kubernetes: Option<KubernetesExpect>,
    /// Package → minimum upstream version (`containerd` → `1.7`).
    pub min_versions: Vec<(String, String)>,
    /// Units enabled in /etc/systemd/system/*.wants (or *.requires).
    pub enabled_units: Vec<String>,
    /// Units linked to /dev/null in /etc/systemd/system.
    pub masked_units: Vec<String>,
    /// Units with no enablement link (disabled or masked), not running at boot. A unit
    /// an extending definition lists in `enabled_units` leaves this list, and the other
    /// way round: the extending definition opts back in (or out).
    pub disabled_units: Vec<String>,
    /// Units running once the guest has booted (`boot-test` only; `verify` cannot see
    /// a running system — list them in `enabled_units` too).
    pub active_units: Vec<String>,
    /// Units whose hardware may be absent (the NVIDIA ones on a machine without a GPU
    /// or NVSwitch): installed, and never `failed` at boot — `boot-test`, which has no
    /// GPU, reports each one's state.
    pub fail_soft_units: Vec<String>,
    /// Unit → words its effective `ExecStart=` must hold (unit file and drop-ins); a
    /// word written `!--flag` must be absent.
    pub exec_start: Vec<(String, Vec<String>)>,
    /// Commands on the default PATH (`unpigz`).
    pub commands: Vec<String>,
    /// No swap in /etc/fstab, none on at boot.
    pub swap_off: bool,
    /// Modules listed in modules-load.d (loaded at boot).
    pub modules_load: Vec<String>,
    /// Modules blacklisted in modprobe.d (not loaded at boot).
    pub modprobe_blacklist: Vec<String>,
    /// Module → its `param=value` options, each set in /etc/modprobe.d/MODULE.conf and
    /// not overridden.
    pub modprobe_options: Vec<(String, Vec<(String, String)>)>,
    /// sysctl key → value, in effect after sysctl.d.
    pub sysctl: Vec<(String, String)>,
    pub containerd: Option<ContainerdExpect>,
    /// RuntimeClass name → handler, shipped as a manifest in the image.
    pub runtime_classes: Vec<(String, String)>,
    /// Upstream version of the loaded `nvidia` module (`modinfo -F version nvidia`).
    pub nvidia_driver_version: Option<String>,
    /// Who must have signed every NVIDIA module (`modinfo -F signer`: the CN of the
    /// signing certificate's issuer); unset: `verify` only reports the signers.
    pub module_signer: Option<String>,
    /// The image's only kernel release (a stage's `kernel` pin); the one booted.
    pub kernel: Option<String>,
    /// Packages that must not be installed: names, or patterns with `*` and `?`
    /// (`gcc-1?`, `linux-headers-*`). Written as one string of words, so that a
    /// parameter field can give the list (`"${modules.absent_packages}"`).
    pub absent_packages: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct OsRelease {
    pub id: String,
    pub version_id: String,
    pub codename: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct KubernetesExpect {
    /// Upstream version of each of `packages` (`1.30.0`).
    pub version: String,
    pub packages: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ContainerdExpect {
    /// Path of containerd's config in the image.
    pub config: String,
    /// Its gRPC socket.
    pub socket: String,
    /// `SystemdCgroup` of the runc runtime.
    pub systemd_cgroup: bool,
    /// Runtime name → `BinaryName`, configured next to runc.
    pub runtimes: Vec<(String, String)>,
}

#[derive(Debug, Clone)]
pub struct PayloadFacts {
    pub uri_template: String,
    pub virtualization: String,
    pub variant: String,
    pub kubernetes_package: String,
    pub gpu: Option<GpuFacts>,
}

#[derive(Debug, Clone)]
pub struct Stage {
    pub name: String,
    pub full_upgrade: bool,
    pub kernel_headers: bool,
    /// The kernel release (`5.15.0-191-generic`) the stage pins the image to: every
    /// other kernel is removed once its packages are installed.
    pub kernel: Option<String>,
    pub repositories: Vec<String>,
    pub packages: Vec<PackageSpec>,
    pub hold: Vec<String>,
    pub overlays: Vec<PathBuf>,
    pub hooks: Vec<PathBuf>,
    pub require_modules: Vec<String>,
}

/// One line of a package list.
#[derive(Debug, Clone, PartialEq)]
pub struct PackageSpec {
    pub name: String,
    pub version: Option<String>,
    /// `pool=PATH sha256=HEX`: fetched from the image's archive mirror by pool path.
    pub pool: Option<PoolPin>,
    /// Where it was declared, for error messages.
    pub origin: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PoolPin {
    pub path: String,
    pub sha256: String,
}

/// Parse a size like `20G`, `25GiB`, `512M`, `1T` or a plain number of bytes.
/// G/M/T are binary units (GiB), as `truncate -s` reads them.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let idx = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(idx);
    let n: u64 = num.parse().ok()?;
    // Binary units (KiB, MiB, GiB, TiB) and their one-letter forms (K, M, G, T), as
    // qemu-img and truncate read them; decimal units (KB, MB, GB, TB) are powers of ten.
    let mult: u64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "K" | "KIB" => 1 << 10,
        "M" | "MIB" => 1 << 20,
        "G" | "GIB" => 1 << 30,
        "T" | "TIB" => 1 << 40,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        _ => return None,
    };
    n.checked_mul(mult)
}

/// A definition file as written: its shape checked (with line numbers in errors), and
/// its TOML tree, in which `${...}` is replaced once the parameters are known.
fn read_raw(path: &Path) -> Result<(RawDef, toml::Value)> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| user(format!("cannot read image definition {}: {e}", path.display())))?;
    let raw: RawDef = toml::from_str(&text).map_err(|e| user(format!("image definition {}: {e}", path.display())))?;
    let value: toml::Value =
        toml::from_str(&text).map_err(|e| user(format!("image definition {}: {e}", path.display())))?;
    Ok((raw, value))
}

/// The parameters declared down an `extends` chain (root ancestor first), merged: a
/// later declaration replaces the description and default it gives and adds (or
/// replaces) values.
fn merge_parameters(chain: &[(PathBuf, RawDef, toml::Value)]) -> Result<BTreeMap<String, (RawParameter, PathBuf)>> {
    let mut params: BTreeMap<String, (RawParameter, PathBuf)> = BTreeMap::new();
    for (file, raw, _) in chain.iter().rev() {
        for (name, p) in raw.parameters.iter().flatten() {
            if !name.starts_with(|c: char| c.is_ascii_lowercase())
                || !name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            {
                user_bail!(
                    "image definition {}: parameter `{name}` must be lower-case letters, digits or '_'",
                    file.display()
                );
            }
            let (d, origin) = params
                .entry(name.clone())
                .or_insert_with(|| (RawParameter::default(), file.clone()));
            *origin = file.clone();
            if p.description.is_some() {
                d.description.clone_from(&p.description);
            }
            if p.default.is_some() {
                d.default.clone_from(&p.default);
            }
            d.values.extend(p.values.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
    }
    let plain = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "._+~:-".contains(c));
    for (name, (p, file)) in &params {
        let f = file.display();
        if p.values.is_empty() {
            user_bail!(
                "image definition {f}: parameter `{name}` has no values (add [parameters.{name}.values.\"VALUE\"])"
            );
        }
        for (v, fields) in &p.values {
            if !plain(v) {
                user_bail!(
                    "image definition {f}: parameter `{name}` value \"{v}\" must be letters, digits or . _ + ~ : -"
                );
            }
            for (k, x) in fields {
                let key_ok = !k.is_empty()
                    && k.chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
                if !key_ok || x.chars().any(|c| c.is_control() || "\"'\\`$".contains(c)) {
                    user_bail!(
                        "image definition {f}: `parameters.{name}.values.\"{v}\".{k}` = \"{x}\" is not a field name with a plain value"
                    );
                }
            }
        }
        match &p.default {
            None => user_bail!("image definition {f}: parameter `{name}` has no `default`"),
            Some(d) if !p.values.contains_key(d) => user_bail!(
                "image definition {f}: parameter `{name}` default \"{d}\" is not one of its values ({})",
                p.values.keys().cloned().collect::<Vec<_>>().join(", ")
            ),
            Some(_) => {}
        }
    }
    Ok(params)
}

/// Load and validate a definition (and what it extends) with its parameters' defaults.
pub fn load(path: &Path) -> Result<ImageDef> {
    load_with(path, &[])
}

/// Load and validate the variant of a definition that `sets` chooses (`--set
/// NAME=VALUE`); an unknown parameter or value is a user error listing the allowed ones.
pub fn load_with(path: &Path, sets: &[Setting]) -> Result<ImageDef> {
    let path = path
        .canonicalize()
        .map_err(|e| user(format!("image definition {}: {e}", path.display())))?;
    let project_root = path
        .parent()
        .and_then(|p| p.parent())
        .map(Path::to_path_buf)
        .context("image definition has no parent directory")?;
    let (raw, value) = read_raw(&path)?;
    let mut chain = vec![(path.clone(), raw, value)];
    while let Some(parent) = chain.last().unwrap().1.extends.clone() {
        let from = &chain.last().unwrap().0;
        let p = from.parent().unwrap().join(&parent);
        if chain.iter().any(|(q, _, _)| q == &p) || chain.len() > 8 {
            user_bail!(
                "image definition {}: `extends` forms a cycle at {parent}",
                from.display()
            );
        }
        let (raw, value) =
            read_raw(&p).map_err(|e| user(format!("{}: extends = \"{parent}\": {e:#}", from.display())))?;
        chain.push((p, raw, value));
    }
    // The variant: every parameter's value (the default unless --set), then `${...}`
    // replaced in every string of every file of the chain.
    let declared = merge_parameters(&chain)?;
    let describe =
        |name: &str, p: &RawParameter| format!("{name} ({})", p.values.keys().cloned().collect::<Vec<_>>().join(", "));
    for s in sets {
        let Some((p, _)) = declared.get(&s.name) else {
            user_bail!(
                "image definition {}: --set {}={}: no parameter `{}`; {}",
                path.display(),
                s.name,
                s.value,
                s.name,
                if declared.is_empty() {
                    "the definition has no [parameters]".to_string()
                } else {
                    format!(
                        "its parameters are: {}",
                        declared
                            .iter()
                            .map(|(n, (p, _))| describe(n, p))
                            .collect::<Vec<_>>()
                            .join("; ")
                    )
                }
            );
        };
        if !p.values.contains_key(&s.value) {
            user_bail!(
                "image definition {}: --set {}={}: `{}` is not an allowed value of parameter `{}`; allowed: {}",
                path.display(),
                s.name,
                s.value,
                s.value,
                s.name,
                p.values.keys().cloned().collect::<Vec<_>>().join(", ")
            );
        }
    }
    let mut parameters = Vec::new();
    let mut subst = BTreeMap::new();
    for (name, (p, _)) in &declared {
        let default = p.default.clone().unwrap_or_default();
        let value = sets
            .iter()
            .rev()
            .find(|s| &s.name == name)
            .map(|s| s.value.clone())
            .unwrap_or_else(|| default.clone());
        subst.insert(name.clone(), value.clone());
        for (k, v) in &p.values[&value] {
            subst.insert(format!("{name}.{k}"), v.clone());
        }
        parameters.push(Parameter {
            name: name.clone(),
            description: p.description.clone().unwrap_or_default(),
            default,
            allowed: p.values.keys().cloned().collect(),
            value,
        });
    }
    let subst = Substitutions(subst);
    let mut resolved = Vec::new();
    for (file, _, mut value) in chain {
        let f = file.display().to_string();
        if let Some(t) = value.as_table_mut() {
            t.remove("parameters");
        }
        subst.apply_value(&mut value, &format!("image definition {f}: key "))?;
        let raw: RawDef = value
            .try_into()
            .map_err(|e| user(format!("image definition {f} (parameters substituted): {e}")))?;
        resolved.push((file, raw));
    }
    let chain = resolved;
    // Merge from the root ancestor down.
    let mut name = None;
    let mut description = None;
    let mut disk_size = None;
    let mut bootloader = None;
    let mut payload = RawPayload::default();
    let mut repos: Vec<Repository> = Vec::new();
    let mut stages: Vec<(RawStage, PathBuf)> = Vec::new();
    let mut expect = RawExpect::default();
    let mut base: Option<(RawBase, PathBuf)> = None;
    for (file, raw) in chain.iter().rev() {
        if let Some(e) = &raw.expect {
            expect.merge(e);
        }
        if let Some(b) = &raw.base {
            base = Some((b.clone(), file.clone()));
        }
        name = raw.name.clone().or(name);
        description = raw.description.clone().or(description);
        bootloader = raw.bootloader.or(bootloader);
        if let Some(ds) = &raw.disk_size {
            disk_size = Some((ds.clone(), file.clone()));
        }
        if let Some(p) = &raw.payload {
            payload.uri = p.uri.clone().or(payload.uri);
            payload.virtualization = p.virtualization.clone().or(payload.virtualization);
            payload.variant = p.variant.clone().or(payload.variant);
            payload.kubernetes_package = p.kubernetes_package.clone().or(payload.kubernetes_package);
            payload.gpu = p.gpu.clone().or(payload.gpu);
        }
        for r in &raw.repository {
            repos.retain(|x| x.id != r.id);
            repos.push(r.clone());
        }
        for s in &raw.stage {
            if let Some(pos) = stages.iter().position(|(x, _)| x.name == s.name) {
                stages[pos] = (s.clone(), file.clone());
            } else if let Some(before) = &s.before {
                let Some(pos) = stages.iter().position(|(x, _)| &x.name == before) else {
                    user_bail!(
                        "image definition {}: stage `{}` has before = \"{before}\" but no stage is named {before}",
                        file.display(),
                        s.name
                    );
                };
                stages.insert(pos, (s.clone(), file.clone()));
            } else {
                stages.push((s.clone(), file.clone()));
            }
        }
    }
    let f = path.display();
    let name = name.ok_or_else(|| user(format!("image definition {f}: missing key `name`")))?;
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
        user_bail!("image definition {f}: `name` = \"{name}\" must be letters, digits, '-', '_' or '.'");
    }
    let description = description.ok_or_else(|| user(format!("image definition {f}: missing key `description`")))?;
    let (ds, ds_file) = disk_size.ok_or_else(|| {
        user(format!(
            "image definition {f}: missing key `disk_size` (e.g. \"20GiB\")"
        ))
    })?;
    // Rounded up to a whole MiB (partitions are MiB-aligned): "20GB" is 19074 MiB.
    let disk_size = match parse_size(&ds).and_then(|n| n.checked_next_multiple_of(1 << 20)) {
        Some(n) if n >= 1 << 30 => n,
        _ => user_bail!(
            "image definition {}: `disk_size` = \"{ds}\" is not a size of at least 1 GiB (e.g. \"20GiB\", or \"20GB\" \
             for 20·10⁹ bytes)",
            ds_file.display()
        ),
    };
    let uri_template = payload.uri.ok_or_else(|| {
        user(format!(
            "image definition {f}: missing key `payload.uri` (a template with {{name}})"
        ))
    })?;
    if !uri_template.contains("{name}") {
        user_bail!("image definition {f}: `payload.uri` = \"{uri_template}\" has no {{name}} placeholder");
    }
    let payload = PayloadFacts {
        uri_template,
        virtualization: payload.virtualization.unwrap_or_else(|| "virtualized".into()),
        variant: payload.variant.unwrap_or_else(|| "server".into()),
        kubernetes_package: payload.kubernetes_package.unwrap_or_else(|| "kubelet".into()),
        gpu: payload.gpu,
    };
    for r in &repos {
        if r.id.is_empty() || !r.id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
            user_bail!(
                "image definition {f}: repository id `{}` must be letters, digits, '-' or '_'",
                r.id
            );
        }
        let key = project_root.join(&r.key);
        if !key.is_file() {
            user_bail!(
                "image definition {f}: repository `{}` key `{}` not found at {}",
                r.id,
                r.key,
                key.display()
            );
        }
    }
    let expect = expect.resolve(&f.to_string())?;
    let base = base
        .map(|(b, file)| resolve_base(b, &file, &project_root))
        .transpose()?;
    let mut out_stages = Vec::new();
    for (s, file) in stages {
        let fd = file.display();
        for r in &s.repositories {
            if !repos.iter().any(|x| &x.id == r) {
                user_bail!(
                    "image definition {fd}: stage `{}` uses repository `{r}`, which no [[repository]] defines",
                    s.name
                );
            }
        }
        let kernel = match s.kernel.as_str() {
            "" => None,
            k if kernel_release(k) => Some(k.to_string()),
            k => user_bail!(
                "image definition {fd}: stage `{}` kernel = \"{k}\" is not a kernel release (e.g. 5.15.0-191-generic)",
                s.name
            ),
        };
        let mut packages = Vec::new();
        // A list name a parameter field leaves empty (`"${modules.toolchain}"`) names no list.
        for l in s.packages.iter().filter(|l| !l.is_empty()) {
            let p = project_root.join("package-lists").join(format!("{l}.list"));
            if !p.is_file() {
                user_bail!(
                    "image definition {fd}: stage `{}` package list `{l}` not found at {}",
                    s.name,
                    p.display()
                );
            }
            packages.extend(parse_package_list(&p, &subst)?);
        }
        let dir_list = |kind: &str, names: &[String]| -> Result<Vec<PathBuf>> {
            names
                .iter()
                .map(|n| {
                    let p = project_root.join(kind).join(n);
                    if p.is_dir() {
                        Ok(p)
                    } else {
                        Err(user(format!(
                            "image definition {fd}: stage `{}` {kind} `{n}` not found at {}",
                            s.name,
                            p.display()
                        )))
                    }
                })
                .collect()
        };
        out_stages.push(Stage {
            overlays: dir_list("overlays", &s.overlays)?,
            hooks: dir_list("hooks", &s.hooks)?,
            name: s.name,
            full_upgrade: s.full_upgrade,
            kernel_headers: s.kernel_headers.0,
            kernel,
            repositories: s.repositories,
            packages,
            hold: s.hold,
            require_modules: s.require_modules,
        });
    }
    Ok(ImageDef {
        file: path.clone(),
        chain: chain.iter().map(|(p, _)| p.clone()).collect(),
        project_root,
        name,
        description,
        disk_size,
        bootloader: bootloader.unwrap_or(true),
        payload,
        repositories: repos,
        stages: out_stages,
        expect,
        base,
        parameters,
    })
}

/// Validate `[base]` as set in `file`.
fn resolve_base(b: RawBase, file: &Path, project_root: &Path) -> Result<BaseSpec> {
    let f = file.display();
    for (k, v) in [
        ("url", &b.url),
        ("sha256sums", &b.sha256sums),
        ("signature", &b.signature),
    ] {
        let scheme_ok = ["https://", "http://", "file://"].iter().any(|s| v.starts_with(s));
        if !scheme_ok || v.chars().any(|c| c.is_whitespace() || c.is_control()) {
            user_bail!("image definition {f}: `base.{k}` = \"{v}\" is not an http(s):// or file:// URL");
        }
        if v.split('/')
            .any(|seg| seg == "current" || seg == "release" || seg == "daily")
        {
            user_bail!(
                "image definition {f}: `base.{k}` = \"{v}\" names a moving alias; pin a dated serial \
                 (e.g. .../releases/jammy/release-20250516/...)"
            );
        }
    }
    if b.url.ends_with('/') {
        user_bail!(
            "image definition {f}: `base.url` = \"{}\" names a directory, not a file",
            b.url
        );
    }
    let sha256 = b.sha256.trim().to_ascii_lowercase();
    if sha256.len() != 64 || !sha256.chars().all(|c| c.is_ascii_hexdigit()) {
        user_bail!(
            "image definition {f}: `base.sha256` = \"{}\" is not a SHA-256 (64 hex digits)",
            b.sha256
        );
    }
    let fingerprint: String = b
        .fingerprint
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect::<String>()
        .to_ascii_uppercase();
    if fingerprint.len() != 40 || !fingerprint.chars().all(|c| c.is_ascii_hexdigit()) {
        user_bail!(
            "image definition {f}: `base.fingerprint` = \"{}\" is not an OpenPGP v4 fingerprint (40 hex digits)",
            b.fingerprint
        );
    }
    let key = project_root.join(&b.key);
    if !key.is_file() {
        user_bail!(
            "image definition {f}: `base.key` `{}` not found at {}",
            b.key,
            key.display()
        );
    }
    Ok(BaseSpec {
        url: b.url,
        sha256,
        sha256sums: b.sha256sums,
        signature: b.signature,
        key,
        fingerprint,
        origin: file.to_path_buf(),
    })
}

/// Lists are joined (new entries appended), tables merged key by key, single values
/// replaced: `other` is the extending definition's.
impl RawExpect {
    fn merge(&mut self, other: &RawExpect) {
        fn join(dst: &mut Option<Vec<String>>, src: &Option<Vec<String>>) {
            if let Some(src) = src {
                let d = dst.get_or_insert_with(Vec::new);
                for x in src {
                    if !d.contains(x) {
                        d.push(x.clone());
                    }
                }
            }
        }
        fn merge_map<V: Clone>(dst: &mut Option<BTreeMap<String, V>>, src: &Option<BTreeMap<String, V>>) {
            if let Some(src) = src {
                dst.get_or_insert_with(BTreeMap::new)
                    .extend(src.iter().map(|(k, v)| (k.clone(), v.clone())));
            }
        }
        fn replace<T: Clone>(dst: &mut Option<T>, src: &Option<T>) {
            if src.is_some() {
                dst.clone_from(src);
            }
        }
        if let Some(o) = &other.os {
            let d = self.os.get_or_insert_with(RawOs::default);
            replace(&mut d.id, &o.id);
            replace(&mut d.version_id, &o.version_id);
            replace(&mut d.codename, &o.codename);
        }
        replace(&mut self.architecture, &other.architecture);
        if let Some(k) = &other.kubernetes {
            let d = self.kubernetes.get_or_insert_with(RawKubernetes::default);
            replace(&mut d.version, &k.version);
            join(&mut d.packages, &k.packages);
        }
        merge_map(&mut self.min_versions, &other.min_versions);
        join(&mut self.masked_units, &other.masked_units);
        // Enabled and disabled exclude each other: the extending definition's word wins.
        if let (Some(d), Some(en)) = (&mut self.disabled_units, &other.enabled_units) {
            d.retain(|u| !en.contains(u));
        }
        if let (Some(en), Some(d)) = (&mut self.enabled_units, &other.disabled_units) {
            en.retain(|u| !d.contains(u));
        }
        join(&mut self.enabled_units, &other.enabled_units);
        join(&mut self.disabled_units, &other.disabled_units);
        join(&mut self.active_units, &other.active_units);
        join(&mut self.fail_soft_units, &other.fail_soft_units);
        merge_map(&mut self.exec_start, &other.exec_start);
        join(&mut self.commands, &other.commands);
        replace(&mut self.swap_off, &other.swap_off);
        join(&mut self.modules_load, &other.modules_load);
        join(&mut self.modprobe_blacklist, &other.modprobe_blacklist);
        merge_map(&mut self.modprobe_options, &other.modprobe_options);
        merge_map(&mut self.sysctl, &other.sysctl);
        if let Some(c) = &other.containerd {
            let d = self.containerd.get_or_insert_with(RawContainerd::default);
            replace(&mut d.config, &c.config);
            replace(&mut d.socket, &c.socket);
            replace(&mut d.systemd_cgroup, &c.systemd_cgroup);
            merge_map(&mut d.runtimes, &c.runtimes);
        }
        merge_map(&mut self.runtime_classes, &other.runtime_classes);
        replace(&mut self.nvidia_driver_version, &other.nvidia_driver_version);
        replace(&mut self.module_signer, &other.module_signer);
        replace(&mut self.kernel, &other.kernel);
        if let Some(a) = &other.absent_packages {
            let d = self.absent_packages.get_or_insert_with(String::new);
            d.push(' ');
            d.push_str(a);
        }
    }

    /// Validate the merged table of the definition `f`. Every value ends up in the
    /// guest's check script (quoted) and in error messages: names are restricted to
    /// what they can be, and nothing holds a line break.
    fn resolve(self, f: &str) -> Result<Expectations> {
        let bad = |key: &str, v: &str, what: &str| -> anyhow::Error {
            user(format!("image definition {f}: `expect.{key}` = \"{v}\" {what}"))
        };
        let word =
            |s: &str, extra: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || extra.contains(c));
        let version = |key: &str, v: &str| -> Result<String> {
            if word(v, "._+~:-") {
                Ok(v.to_string())
            } else {
                Err(bad(key, v, "is not a version (letters, digits, . _ + ~ : -)"))
            }
        };
        let module = |key: &str, m: &str| -> Result<String> {
            if word(m, "_-") {
                Ok(m.to_string())
            } else {
                Err(bad(key, m, "is not a kernel module name"))
            }
        };
        let unit = |key: &str, u: &str| -> Result<String> {
            const TYPES: [&str; 10] = [
                ".service",
                ".socket",
                ".target",
                ".timer",
                ".mount",
                ".swap",
                ".path",
                ".slice",
                ".device",
                ".automount",
            ];
            if word(u, ":_.@\\-") && TYPES.iter().any(|t| u.len() > t.len() && u.ends_with(t)) {
                Ok(u.to_string())
            } else {
                Err(bad(key, u, "is not a systemd unit name (e.g. kubelet.service)"))
            }
        };
        let path = |key: &str, p: &str| -> Result<String> {
            if p.starts_with('/') && !p.contains("..") && word(p, "/._+-") {
                Ok(p.to_string())
            } else {
                Err(bad(key, p, "is not an absolute path"))
            }
        };
        let os = match self.os {
            None => None,
            Some(o) => {
                let id =
                    o.id.ok_or_else(|| user(format!("image definition {f}: missing key `expect.os.id`")))?;
                let version_id = o
                    .version_id
                    .ok_or_else(|| user(format!("image definition {f}: missing key `expect.os.version_id`")))?;
                Some(OsRelease {
                    id: version("os.id", &id)?,
                    version_id: version("os.version_id", &version_id)?,
                    codename: o.codename.map(|c| version("os.codename", &c)).transpose()?,
                })
            }
        };
        let kubernetes = match self.kubernetes {
            None => None,
            Some(k) => {
                let v = k
                    .version
                    .ok_or_else(|| user(format!("image definition {f}: missing key `expect.kubernetes.version`")))?;
                let packages = k.packages.unwrap_or_default();
                if packages.is_empty() {
                    user_bail!("image definition {f}: `expect.kubernetes.packages` lists no package");
                }
                for p in &packages {
                    version("kubernetes.packages", p)?;
                }
                Some(KubernetesExpect {
                    version: version("kubernetes.version", &v)?,
                    packages,
                })
            }
        };
        let mut min_versions = Vec::new();
        for (p, v) in self.min_versions.unwrap_or_default() {
            version("min_versions", &p)?;
            let v = version(&format!("min_versions.{p}"), &v)?;
            min_versions.push((p, v));
        }
        let units = |key: &str, us: Option<Vec<String>>| -> Result<Vec<String>> {
            us.unwrap_or_default().iter().map(|u| unit(key, u)).collect()
        };
        let modules = |key: &str, ms: Option<Vec<String>>| -> Result<Vec<String>> {
            ms.unwrap_or_default().iter().map(|m| module(key, m)).collect()
        };
        let mut modprobe_options = Vec::new();
        for (m, opts) in self.modprobe_options.unwrap_or_default() {
            let key = format!("modprobe_options.{m}");
            module(&key, &m)?;
            let mut params = Vec::new();
            for w in opts.split_whitespace() {
                match w.split_once('=') {
                    Some((k, v)) if word(k, "_-") && word(v, "._,:+-") => params.push((k.to_string(), v.to_string())),
                    _ => return Err(bad(&key, &opts, "is not `param=value ...`")),
                }
            }
            if params.is_empty() {
                return Err(bad(&key, &opts, "sets no option"));
            }
            modprobe_options.push((m, params));
        }
        let mut sysctl = Vec::new();
        for (k, v) in self.sysctl.unwrap_or_default() {
            let key = format!("sysctl.\"{k}\"");
            let v = match v {
                toml::Value::String(s) => s,
                toml::Value::Integer(i) => i.to_string(),
                other => return Err(bad(&key, &other.to_string(), "is not a string or an integer")),
            };
            if !word(&k, "._/-") {
                return Err(bad("sysctl", &k, "is not a sysctl key"));
            }
            let v = v.split_whitespace().collect::<Vec<_>>().join(" ");
            if v.is_empty() || v.chars().any(|c| c.is_control() || "'\"\\`$".contains(c)) {
                return Err(bad(&key, &v, "is not a plain sysctl value"));
            }
            sysctl.push((k.replace('/', "."), v));
        }
        let containerd = match self.containerd {
            None => None,
            Some(c) => {
                let need = |k: &str, v: Option<String>| {
                    v.ok_or_else(|| user(format!("image definition {f}: missing key `expect.containerd.{k}`")))
                };
                let mut runtimes = Vec::new();
                for (name, binary) in c.runtimes.unwrap_or_default() {
                    let key = format!("containerd.runtimes.{name}");
                    if !word(&name, "_-") {
                        return Err(bad("containerd.runtimes", &name, "is not a runtime name"));
                    }
                    runtimes.push((name, path(&key, &binary)?));
                }
                Some(ContainerdExpect {
                    config: path("containerd.config", &need("config", c.config)?)?,
                    socket: path("containerd.socket", &need("socket", c.socket)?)?,
                    systemd_cgroup: c.systemd_cgroup.unwrap_or(true),
                    runtimes,
                })
            }
        };
        let disabled_units = units("disabled_units", self.disabled_units)?;
        if let Some(u) = disabled_units
            .iter()
            .find(|u| self.enabled_units.as_ref().is_some_and(|e| e.contains(u)))
        {
            return Err(bad("disabled_units", u, "is also in enabled_units"));
        }
        let mut exec_start = Vec::new();
        for (u, args) in self.exec_start.unwrap_or_default() {
            let key = format!("exec_start.\"{u}\"");
            unit("exec_start", &u)?;
            let words: Vec<String> = args.split_whitespace().map(str::to_string).collect();
            let plain = |w: &str| word(w.trim_start_matches('!'), "._,:=/+@-");
            if words.is_empty() || !words.iter().all(|w| plain(w)) {
                return Err(bad(
                    &key,
                    &args,
                    "is not a list of command-line words (`!word`: absent)",
                ));
            }
            exec_start.push((u, words));
        }
        let mut commands = Vec::new();
        for c in self.commands.unwrap_or_default() {
            if !word(&c, "._+-") {
                return Err(bad("commands", &c, "is not a command name"));
            }
            commands.push(c);
        }
        let mut runtime_classes = Vec::new();
        for (name, handler) in self.runtime_classes.unwrap_or_default() {
            if !word(&name, ".-") || !word(&handler, "_.-") {
                return Err(bad(
                    &format!("runtime_classes.{name}"),
                    &handler,
                    "is not a RuntimeClass handler",
                ));
            }
            runtime_classes.push((name, handler));
        }
        Ok(Expectations {
            os,
            architecture: self.architecture.map(|a| version("architecture", &a)).transpose()?,
            kubernetes,
            min_versions,
            enabled_units: units("enabled_units", self.enabled_units)?,
            masked_units: units("masked_units", self.masked_units)?,
            disabled_units,
            active_units: units("active_units", self.active_units)?,
            fail_soft_units: units("fail_soft_units", self.fail_soft_units)?,
            exec_start,
            commands,
            swap_off: self.swap_off.unwrap_or(false),
            modules_load: modules("modules_load", self.modules_load)?,
            modprobe_blacklist: modules("modprobe_blacklist", self.modprobe_blacklist)?,
            modprobe_options,
            sysctl,
            containerd,
            runtime_classes,
            nvidia_driver_version: self
                .nvidia_driver_version
                .map(|v| version("nvidia_driver_version", &v))
                .transpose()?,
            module_signer: match self.module_signer {
                // A parameter field may leave it unset (`module_signer = "${modules.signer}"`).
                Some(s) if s.is_empty() => None,
                Some(s) if s.trim().is_empty() || s.contains(['\n', '\r']) || s.trim() != s => {
                    return Err(bad(
                        "module_signer",
                        &s,
                        "is not a certificate's common name (one line, no surrounding space)",
                    ));
                }
                s => s,
            },
            kernel: match self.kernel.as_deref() {
                None | Some("") => None,
                Some(k) if kernel_release(k) => Some(k.to_string()),
                Some(k) => return Err(bad("kernel", k, "is not a kernel release (e.g. 5.15.0-191-generic)")),
            },
            absent_packages: self
                .absent_packages
                .unwrap_or_default()
                .split_whitespace()
                .map(|p| {
                    if word(p, "+-.*?") {
                        Ok(p.to_string())
                    } else {
                        Err(bad("absent_packages", p, "is not a package name or pattern (* and ?)"))
                    }
                })
                .collect::<Result<_>>()?,
        })
    }
}

/// `5.15.0-191-generic`: a kernel release as /lib/modules names it.
fn kernel_release(k: &str) -> bool {
    k.starts_with(|c: char| c.is_ascii_digit()) && k.chars().all(|c| c.is_ascii_alphanumeric() || "._+-".contains(c))
}

/// Parse `package-lists/X.list`: one package a line, `name=version` pins, `#` comments,
/// and `name=version pool=PATH sha256=HEX` for a package fetched by its pool path;
/// `${...}` is replaced by the variant's parameter values (`subst`).
pub fn parse_package_list(path: &Path, subst: &Substitutions) -> Result<Vec<PackageSpec>> {
    let text =
        std::fs::read_to_string(path).map_err(|e| user(format!("cannot read package list {}: {e}", path.display())))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap().trim();
        if line.is_empty() {
            continue;
        }
        let origin = format!("{}:{}", path.display(), i + 1);
        let line = subst.apply(line, &origin)?;
        let line = line.as_str();
        let mut words = line.split_whitespace();
        let first = words.next().unwrap();
        let (name, version) = match first.split_once('=') {
            Some((n, v)) => (n.to_string(), Some(v.to_string())),
            None => (first.to_string(), None),
        };
        let valid_name = name.len() >= 2
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+-.".contains(c));
        if !valid_name || version.as_deref() == Some("") {
            user_bail!("{origin}: `{first}` is not a package name or name=version");
        }
        let mut pool = None;
        let mut sha = None;
        for w in words {
            match w.split_once('=') {
                Some(("pool", p)) => pool = Some(p.trim_start_matches('/').to_string()),
                Some(("sha256", h)) => sha = Some(h.to_ascii_lowercase()),
                _ => user_bail!("{origin}: unknown field `{w}` (expected pool=PATH sha256=HEX)"),
            }
        }
        let pool = match (pool, sha) {
            (None, None) => None,
            (Some(path), Some(sha256)) if sha256.len() == 64 && sha256.chars().all(|c| c.is_ascii_hexdigit()) => {
                if version.is_none() {
                    user_bail!("{origin}: a pool pin needs the exact version too (name=version pool=... sha256=...)");
                }
                if !path.starts_with("pool/") || path.contains("..") || !path.ends_with(".deb") {
                    user_bail!("{origin}: pool path `{path}` must be pool/.../*.deb relative to the archive mirror");
                }
                Some(PoolPin { path, sha256 })
            }
            _ => user_bail!("{origin}: a pool pin needs both pool=PATH and sha256=<64 hex digits>"),
        };
        out.push(PackageSpec {
            name,
            version,
            pool,
            origin,
        });
    }
    Ok(out)
}

impl ImageDef {
    pub fn repository(&self, id: &str) -> Option<&Repository> {
        self.repositories.iter().find(|r| r.id == id)
    }
}

/// One definition as `kiln list` shows it: what a CI matrix needs to build it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Listing {
    pub name: String,
    /// The definition file, as `dir` joined with its file name (`images/NAME.toml`).
    pub file: PathBuf,
    /// The name of the definition it extends, if any.
    pub extends: Option<String>,
    /// The disk size in bytes (rounded up to a MiB, as built).
    pub disk_size: u64,
    /// Its parameters (inherited ones included): `--set NAME=VALUE` builds a variant.
    /// `value` is the default here.
    pub parameters: Vec<Parameter>,
}

/// Every definition (`*.toml`) in `dir`, loaded and validated like a build loads it,
/// sorted by file name.
pub fn list(dir: &Path) -> Result<Vec<Listing>> {
    let rd = std::fs::read_dir(dir).map_err(|e| user(format!("cannot read {}: {e}", dir.display())))?;
    let mut files: Vec<PathBuf> = rd
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml") && p.is_file())
        .collect();
    files.sort();
    let mut out = Vec::new();
    for file in files {
        let def = load(&file)?;
        let extends = match read_raw(&file)?.0.extends {
            Some(parent) => Some(load(&file.parent().unwrap_or(dir).join(parent))?.name),
            None => None,
        };
        out.push(Listing {
            name: def.name,
            file,
            extends,
            disk_size: def.disk_size,
            parameters: def.parameters,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_shows_every_shipped_definition_with_its_parent() {
        let images = Path::new(env!("CARGO_MANIFEST_DIR")).join("images");
        let l = list(&images).unwrap();
        assert!(l.len() >= 2, "{l:?}");
        let gpu = l.iter().find(|x| x.name == "ubuntu-2204-gpu-ready-nodriver").unwrap();
        assert_eq!(gpu.extends, None);
        assert_eq!(gpu.disk_size, 20 << 30);
        assert_eq!(gpu.file, images.join("ubuntu-2204-gpu-ready-nodriver.toml"));
        let nv = l.iter().find(|x| x.name == "ubuntu-2204-nvidia-565-firmware1").unwrap();
        assert_eq!(nv.extends.as_deref(), Some("ubuntu-2204-gpu-ready-nodriver"));
        assert_eq!(nv.disk_size, 25 << 30);
        // Parameters, inherited ones included, with their defaults and allowed values.
        let p = |l: &Listing, n: &str| l.parameters.iter().find(|p| p.name == n).cloned().unwrap();
        assert_eq!(p(gpu, "kubernetes").allowed, ["1.29", "1.30"]);
        assert_eq!(p(gpu, "kubernetes").default, "1.30");
        assert!(gpu.parameters.iter().all(|p| p.name != "driver"));
        assert_eq!(p(nv, "driver").allowed, ["550", "565"]);
        assert_eq!(p(nv, "driver").default, "565");
        assert_eq!(p(nv, "ubuntu").allowed, ["22.04", "24.04"]);
    }

    /// The shipped variants of the spec's compatibility matrix: each `--set` gives its
    /// own name, packages, repository, base and expectations; the defaults are the two
    /// seed images unchanged.
    #[test]
    fn shipped_variants_resolve() {
        let images = Path::new(env!("CARGO_MANIFEST_DIR")).join("images");
        let gpu = images.join("ubuntu-2204-gpu-ready-nodriver.toml");
        let nv = images.join("ubuntu-2204-nvidia-565-firmware1.toml");
        let set = |s: &str| s.parse::<Setting>().unwrap();
        let pkg = |d: &ImageDef, name: &str| -> PackageSpec {
            d.stages
                .iter()
                .flat_map(|s| &s.packages)
                .find(|p| p.name == name)
                .cloned()
                .unwrap_or_else(|| panic!("{name} not in {}", d.name))
        };
        let d = load(&nv).unwrap();
        assert_eq!(d.name, "ubuntu-2204-nvidia-565-firmware1");
        assert_eq!(
            d.repository("kubernetes").unwrap().uri,
            "https://pkgs.k8s.io/core:/stable:/v1.30/deb/"
        );
        assert_eq!(d.expect.nvidia_driver_version.as_deref(), Some("565.57.01"));
        assert_eq!(pkg(&d, "kubelet").version.as_deref(), Some("1.30.0-1.1"));
        assert!(d.base.as_ref().unwrap().url.contains("/jammy/release-20250516/"));

        let d = load_with(&nv, &[set("driver=550")]).unwrap();
        assert_eq!(d.name, "ubuntu-2204-nvidia-550-firmware1");
        assert_eq!(d.expect.nvidia_driver_version.as_deref(), Some("550.163.01"));
        assert_eq!(
            d.payload.gpu.as_ref().unwrap().driver_package,
            "nvidia-driver-550-server"
        );
        let dkms = pkg(&d, "nvidia-dkms-550-server");
        assert_eq!(dkms.version.as_deref(), Some("550.163.01-0ubuntu0.22.04.1"));
        assert!(dkms.pool.is_some(), "550 is pinned by pool path");
        assert!(
            d.stages
                .iter()
                .flat_map(|s| &s.packages)
                .all(|p| !p.name.contains("565"))
        );

        let d = load_with(&gpu, &[set("kubernetes=1.29")]).unwrap();
        assert_eq!(d.name, "ubuntu-2204-gpu-ready-nodriver-k8s1.29");
        assert_eq!(
            d.repository("kubernetes").unwrap().uri,
            "https://pkgs.k8s.io/core:/stable:/v1.29/deb/"
        );
        assert_eq!(d.expect.kubernetes.as_ref().unwrap().version, "1.29.15");
        assert_eq!(pkg(&d, "kubeadm").version.as_deref(), Some("1.29.15-1.1"));

        let d = load_with(&gpu, &[set("ubuntu=24.04")]).unwrap();
        assert_eq!(d.name, "ubuntu-2404-gpu-ready-nodriver");
        let os = d.expect.os.as_ref().unwrap();
        assert_eq!(
            (os.version_id.as_str(), os.codename.as_deref()),
            ("24.04", Some("noble"))
        );
        let b = d.base.unwrap();
        assert!(
            b.url
                .ends_with("/noble/release-20250430/ubuntu-24.04-server-cloudimg-amd64.img"),
            "{}",
            b.url
        );
        assert_eq!(
            b.sha256,
            "bc471ca49de03b5129c65b70f9862b7f4b5e721622fd34ade78132f6f7999e2d"
        );

        // 24.04 + 565: the noble pool pins (.3); 24.04 + 550 has no package list.
        let d = load_with(&nv, &[set("ubuntu=24.04")]).unwrap();
        assert_eq!(d.name, "ubuntu-2404-nvidia-565-firmware1");
        let drv = pkg(&d, "nvidia-driver-565-server");
        assert_eq!(drv.version.as_deref(), Some("565.57.01-0ubuntu0.24.04.3"));
        let e = load_with(&nv, &[set("ubuntu=24.04"), set("driver=550")]).unwrap_err();
        assert_eq!(crate::error::exit_code(&e), 2);
        assert!(format!("{e:#}").contains("nvidia-550-server-noble"), "{e:#}");

        // The default (DKMS): the toolchain, headers, no kernel pin, nothing forbidden.
        let d = load(&nv).unwrap();
        assert!(d.stages.iter().any(|s| s.kernel_headers));
        assert!(d.stages.iter().all(|s| s.kernel.is_none()));
        pkg(&d, "dkms");
        pkg(&d, "nvidia-dkms-565-server");
        assert_eq!((d.expect.kernel.as_ref(), d.expect.absent_packages.len()), (None, 0));

        // Canonical's precompiled modules: the kernel pinned, no compiler, DKMS or headers.
        let d = load_with(&nv, &[set("modules=precompiled")]).unwrap();
        assert_eq!(d.name, "ubuntu-2204-nvidia-565-firmware1-precompiled");
        let k = "5.15.0-191-generic";
        assert!(d.stages.iter().all(|s| !s.kernel_headers));
        assert_eq!(
            d.stages.iter().filter_map(|s| s.kernel.as_deref()).collect::<Vec<_>>(),
            [k]
        );
        assert_eq!(d.expect.kernel.as_deref(), Some(k));
        assert_eq!(
            pkg(&d, &format!("linux-modules-nvidia-565-server-{k}"))
                .version
                .as_deref(),
            Some("5.15.0-191.201+1")
        );
        assert_eq!(
            d.payload.gpu.as_ref().unwrap().driver_package,
            "nvidia-headless-no-dkms-565-server"
        );
        let names: Vec<&str> = d
            .stages
            .iter()
            .flat_map(|s| &s.packages)
            .map(|p| p.name.as_str())
            .collect();
        for forbidden in [
            "build-essential",
            "dkms",
            "linux-headers-generic",
            "nvidia-dkms-565-server",
            "nvidia-driver-565-server",
        ] {
            assert!(!names.contains(&forbidden), "{forbidden} in the precompiled variant");
            assert!(
                d.expect
                    .absent_packages
                    .iter()
                    .any(|p| glob::Pattern::new(p).unwrap().matches(forbidden))
                    || forbidden.starts_with("nvidia-"),
                "{forbidden} not forbidden by expect.absent_packages"
            );
        }
        assert!(
            !d.expect
                .absent_packages
                .iter()
                .any(|p| glob::Pattern::new(p).unwrap().matches("gcc-12-base")),
            "gcc-12-base (a runtime library's) must stay allowed"
        );
        // Only jammy + 565 has a precompiled list.
        let e = load_with(&nv, &[set("modules=precompiled"), set("driver=550")]).unwrap_err();
        assert!(format!("{e:#}").contains("nvidia-550-server-precompiled"), "{e:#}");
        // The GPU-ready definition knows only dkms.
        let e = load_with(&gpu, &[set("modules=precompiled")]).unwrap_err();
        assert!(format!("{e:#}").contains("allowed: dkms"), "{e:#}");
    }

    /// A boolean key may be a parameter field; anything but true/false is refused.
    #[test]
    fn flags_take_parameter_fields() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("images")).unwrap();
        let def = |headers: &str| {
            let p = d.path().join("images/x.toml");
            std::fs::write(
                &p,
                format!(
                    "name = \"x\"\ndescription = \"x\"\ndisk_size = \"2GiB\"\n[payload]\nuri = \"s3://b/{{name}}\"\n\
                     [parameters.h]\ndefault = \"a\"\n[parameters.h.values.a]\nv = \"{headers}\"\n\
                     [[stage]]\nname = \"s\"\nkernel_headers = \"${{h.v}}\"\nkernel = \"\"\n"
                ),
            )
            .unwrap();
            load(&p)
        };
        assert!(def("true").unwrap().stages[0].kernel_headers);
        assert!(!def("false").unwrap().stages[0].kernel_headers);
        let e = def("yes").unwrap_err();
        assert!(format!("{e:#}").contains("`yes` is not true or false"), "{e:#}");
    }

    /// Parameters down an `extends` chain: `${NAME}` and `${NAME.FIELD}` in names,
    /// repositories, expectations and package lists; an extending definition adds a
    /// parameter, a value, or changes a default.
    #[test]
    fn parameters_make_variants() {
        let d = project();
        std::fs::write(
            d.path().join("package-lists/k8s.list"),
            "kubelet=${k8s.deb} # pinned\nkubectl=${k8s.deb}\n",
        )
        .unwrap();
        let base = format!(
            "{}\n[parameters.k8s]\ndescription = \"Kubernetes\"\ndefault = \"1.30\"\n\
             [parameters.k8s.values.\"1.30\"]\ndeb = \"1.30.0-1.1\"\nup = \"1.30.0\"\n\
             [parameters.k8s.values.\"1.29\"]\ndeb = \"1.29.15-1.1\"\nup = \"1.29.15\"\n\
             [expect.kubernetes]\nversion = \"${{k8s.up}}\"\npackages = [\"kubelet\"]\n",
            BASE.replace("name = \"base-img\"", "name = \"base-k${k8s}\"")
                .replace("v1.30/deb/", "v${k8s}/deb/")
                .replace("packages = [\"base\"]", "packages = [\"base\", \"k8s\"]")
        );
        std::fs::write(d.path().join("images/base.toml"), &base).unwrap();
        std::fs::write(
            d.path().join("images/gpu.toml"),
            "extends = \"base.toml\"\nname = \"gpu-${drv}-k${k8s}\"\n\
             [parameters.drv]\ndefault = \"565\"\n[parameters.drv.values.\"565\"]\n[parameters.drv.values.\"550\"]\n\
             [parameters.k8s]\ndefault = \"1.29\"\n[parameters.k8s.values.\"1.28\"]\ndeb = \"1.28.1-1.1\"\nup = \"1.28.1\"\n",
        )
        .unwrap();
        let set = |s: &str| s.parse::<Setting>().unwrap();
        let b = load(&d.path().join("images/base.toml")).unwrap();
        assert_eq!(b.name, "base-k1.30");
        assert_eq!(b.repositories[0].uri, "https://pkgs.k8s.io/core:/stable:/v1.30/deb/");
        assert_eq!(b.expect.kubernetes.as_ref().unwrap().version, "1.30.0");
        let kubelet = b.stages[0].packages.iter().rfind(|p| p.name == "kubelet").unwrap();
        assert_eq!(kubelet.version.as_deref(), Some("1.30.0-1.1"));
        assert!(kubelet.origin.ends_with("k8s.list:1"), "{}", kubelet.origin);
        let b = load_with(&d.path().join("images/base.toml"), &[set("k8s=1.29")]).unwrap();
        assert_eq!(b.name, "base-k1.29");
        assert_eq!(b.repositories[0].uri, "https://pkgs.k8s.io/core:/stable:/v1.29/deb/");
        assert_eq!(
            b.stages[0].packages.last().unwrap().version.as_deref(),
            Some("1.29.15-1.1")
        );
        assert_eq!(
            b.parameters,
            [Parameter {
                name: "k8s".into(),
                description: "Kubernetes".into(),
                default: "1.30".into(),
                allowed: vec!["1.29".into(), "1.30".into()],
                value: "1.29".into(),
            }]
        );
        // Inherited, with a new default and value, and a parameter of its own.
        let g = load(&d.path().join("images/gpu.toml")).unwrap();
        assert_eq!(g.name, "gpu-565-k1.29");
        assert_eq!(g.expect.kubernetes.as_ref().unwrap().version, "1.29.15");
        let g = load_with(&d.path().join("images/gpu.toml"), &[set("drv=550"), set("k8s=1.28")]).unwrap();
        assert_eq!(g.name, "gpu-550-k1.28");
        assert_eq!(g.expect.kubernetes.as_ref().unwrap().version, "1.28.1");
        let k8s = g.parameters.iter().find(|p| p.name == "k8s").unwrap();
        assert_eq!(k8s.allowed, ["1.28", "1.29", "1.30"]);
    }

    /// An unknown parameter or value is a user error (exit 2) that lists the allowed
    /// ones; so are an undeclared `${...}`, a default that is not a value, and a
    /// malformed --set.
    #[test]
    fn unknown_parameters_and_values_are_refused_with_the_allowed_list() {
        let images = Path::new(env!("CARGO_MANIFEST_DIR")).join("images");
        let nv = images.join("ubuntu-2204-nvidia-565-firmware1.toml");
        let err = |sets: &[&str]| {
            let sets: Vec<Setting> = sets.iter().map(|s| s.parse().unwrap()).collect();
            let e = load_with(&nv, &sets).unwrap_err();
            assert_eq!(crate::error::exit_code(&e), 2, "{e:#}");
            format!("{e:#}")
        };
        let e = err(&["driver=999"]);
        assert!(
            e.contains("`999` is not an allowed value of parameter `driver`") && e.contains("allowed: 550, 565"),
            "{e}"
        );
        let e = err(&["kubernetes=1.31"]);
        assert!(e.contains("allowed: 1.29, 1.30"), "{e}");
        let e = err(&["drvier=550"]);
        assert!(
            e.contains("no parameter `drvier`")
                && e.contains("driver (550, 565)")
                && e.contains("kubernetes (1.29, 1.30)")
                && e.contains("ubuntu (22.04, 24.04)"),
            "{e}"
        );
        assert!("driver".parse::<Setting>().unwrap_err().contains("NAME=VALUE"));
        assert!("=550".parse::<Setting>().is_err());

        let params = "[parameters.k8s]\ndefault = \"1.30\"\n[parameters.k8s.values.\"1.30\"]\nup = \"1.30.0\"\n";
        let e = err_of(&format!(
            "{BASE}{params}[expect.kubernetes]\nversion = \"${{k8s.nope}}\"\npackages = [\"kubelet\"]\n"
        ));
        assert!(
            e.contains("${k8s.nope}") && e.contains("${k8s.up}") && e.contains("x.toml"),
            "{e}"
        );
        let e = err_of(&BASE.replace("name = \"base-img\"", "name = \"img-${v}\""));
        assert!(e.contains("${v}") && e.contains("no [parameters]"), "{e}");
        let e = err_of(&format!(
            "{BASE}{}",
            params.replace("default = \"1.30\"", "default = \"1.31\"")
        ));
        assert!(e.contains("default \"1.31\" is not one of its values (1.30)"), "{e}");
        let e = err_of(&format!("{BASE}{}", params.replace("\"1.30.0\"", "\"a\\\"b\"")));
        assert!(e.contains("parameters.k8s.values"), "{e}");
        let e = err_of(&format!("{BASE}[parameters.k8s]\ndefault = \"1\"\n"));
        assert!(e.contains("has no values"), "{e}");
        // A package list naming an undeclared parameter: the list and line.
        let d = project();
        std::fs::write(d.path().join("package-lists/base.list"), "curl\nkubelet=${k8s.deb}\n").unwrap();
        std::fs::write(d.path().join("images/x.toml"), BASE).unwrap();
        let e = format!("{:#}", load(&d.path().join("images/x.toml")).unwrap_err());
        assert!(e.contains("base.list:2") && e.contains("${k8s.deb}"), "{e}");
    }

    fn project() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        for sub in ["images", "package-lists", "overlays/k8s", "hooks/k8s", "keys"] {
            std::fs::create_dir_all(d.path().join(sub)).unwrap();
        }
        std::fs::write(d.path().join("keys/k.asc"), "key").unwrap();
        std::fs::write(
            d.path().join("package-lists/base.list"),
            "# base tools\ncurl\nvim # editor\n\nkubelet=1.30.0-1.1\n\
             nvidia-dkms-565-server=565.57.01-0ubuntu0.22.04.4 pool=pool/restricted/n/x/nvidia-dkms-565-server_565.57.01-0ubuntu0.22.04.4_amd64.deb sha256=ABABABABABABABABABABABABABABABABABABABABABABABABABABABABABABABAB\n",
        )
        .unwrap();
        d
    }

    const BASE: &str = r#"
name = "base-img"
description = "d"
disk_size = "20G"
[payload]
uri = "https://x/{name}.raw"
[[repository]]
id = "k8s"
uri = "https://pkgs.k8s.io/core:/stable:/v1.30/deb/"
suite = "/"
key = "keys/k.asc"
[[stage]]
name = "system-update"
full_upgrade = true
packages = ["base"]
[[stage]]
name = "kubernetes-tools"
repositories = ["k8s"]
overlays = ["k8s"]
hooks = ["k8s"]
"#;

    #[test]
    fn loads_and_extends() {
        let d = project();
        std::fs::write(d.path().join("images/base.toml"), BASE).unwrap();
        std::fs::write(
            d.path().join("images/gpu.toml"),
            "extends = \"base.toml\"\nname = \"gpu\"\ndisk_size = \"25G\"\n[payload.gpu]\nvendor = \"NVIDIA\"\nmodels = [\"A100\"]\ndriver_package = \"nvidia-driver-565-server\"\n[[stage]]\nname = \"nvidia-driver\"\nbefore = \"kubernetes-tools\"\n",
        )
        .unwrap();
        let def = load(&d.path().join("images/gpu.toml")).unwrap();
        assert_eq!(def.name, "gpu");
        assert_eq!(def.disk_size, 25 << 30);
        assert_eq!(def.description, "d");
        let names: Vec<_> = def.stages.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["system-update", "nvidia-driver", "kubernetes-tools"]);
        let pk = &def.stages[0].packages;
        assert_eq!(pk.len(), 4);
        assert_eq!(pk[2].version.as_deref(), Some("1.30.0-1.1"));
        assert_eq!(pk[3].pool.as_ref().unwrap().sha256, "ab".repeat(32));
        assert_eq!(def.payload.gpu.as_ref().unwrap().vendor, "NVIDIA");
    }

    fn err_of(toml: &str) -> String {
        let d = project();
        let p = d.path().join("images/x.toml");
        std::fs::write(&p, toml).unwrap();
        let e = load(&p).unwrap_err();
        assert_eq!(crate::error::exit_code(&e), 2, "{e:#}");
        format!("{e:#}")
    }

    #[test]
    fn errors_name_file_and_key() {
        let e = err_of(&format!("{BASE}\nbogus = 1\n"));
        assert!(e.contains("x.toml") && e.contains("bogus"), "{e}");
        let e = err_of(&BASE.replace("20G", "twenty"));
        assert!(e.contains("disk_size") && e.contains("twenty"), "{e}");
        let e = err_of(&BASE.replace("packages = [\"base\"]", "packages = [\"nope\"]"));
        assert!(e.contains("package list `nope`"), "{e}");
        let e = err_of(&BASE.replace("overlays = [\"k8s\"]", "overlays = [\"gone\"]"));
        assert!(e.contains("overlays `gone`"), "{e}");
        let e = err_of(&BASE.replace("hooks = [\"k8s\"]", "hooks = [\"gone\"]"));
        assert!(e.contains("hooks `gone`"), "{e}");
        let e = err_of(&BASE.replace("keys/k.asc", "keys/missing.asc"));
        assert!(e.contains("missing.asc"), "{e}");
        let e = err_of(&BASE.replace("repositories = [\"k8s\"]", "repositories = [\"other\"]"));
        assert!(e.contains("repository `other`"), "{e}");
        let e = err_of(&BASE.replace(
            "[[stage]]\nname = \"system-update\"",
            "[[stage]]\nnmae = \"system-update\"",
        ));
        assert!(e.contains("nmae"), "{e}");
    }

    /// `[expect]` down an `extends` chain: lists joined, tables merged by key, values
    /// replaced; bad values are errors naming the key.
    #[test]
    fn expectations_merge_and_validate() {
        let d = project();
        std::fs::write(
            d.path().join("images/base.toml"),
            format!(
                "{BASE}[expect]\nenabled_units = [\"containerd.service\", \"kubelet.service\"]\n\
                 modules_load = [\"overlay\"]\nswap_off = true\n\
                 os = {{ id = \"ubuntu\", version_id = \"22.04\" }}\n\
                 [expect.kubernetes]\nversion = \"1.30.0\"\npackages = [\"kubelet\"]\n\
                 [expect.sysctl]\n\"net.ipv4.ip_forward\" = 1\n\"net/ipv4/conf/all/rp_filter\" = \"2\"\n\
                 [expect.containerd]\nconfig = \"/etc/containerd/config.toml\"\nsocket = \"/run/containerd/containerd.sock\"\n"
            ),
        )
        .unwrap();
        std::fs::write(
            d.path().join("images/gpu.toml"),
            "extends = \"base.toml\"\nname = \"gpu\"\n[expect]\nenabled_units = [\"kubelet.service\", \"nvidia-persistenced.service\"]\n\
             nvidia_driver_version = \"565.57.01\"\nos = { codename = \"jammy\" }\n\
             [expect.kubernetes]\nversion = \"1.31.0\"\n[expect.sysctl]\n\"net.ipv4.ip_forward\" = \"0\"\n\
             [expect.modprobe_options]\nnvidia = \"NVreg_EnableGpuFirmware=1  NVreg_X=2\"\n\
             [expect.containerd.runtimes]\nnvidia = \"/usr/bin/nvidia-container-runtime\"\n",
        )
        .unwrap();
        let base = load(&d.path().join("images/base.toml")).unwrap().expect;
        let e = load(&d.path().join("images/gpu.toml")).unwrap().expect;
        assert_eq!(
            e.enabled_units,
            ["containerd.service", "kubelet.service", "nvidia-persistenced.service"]
        );
        assert_eq!(e.modules_load, ["overlay"]);
        assert!(e.swap_off);
        assert_eq!(
            e.os,
            Some(OsRelease {
                id: "ubuntu".into(),
                version_id: "22.04".into(),
                codename: Some("jammy".into())
            })
        );
        let k = e.kubernetes.as_ref().unwrap();
        assert_eq!(
            (k.version.as_str(), k.packages.as_slice()),
            ("1.31.0", ["kubelet".to_string()].as_slice())
        );
        assert_eq!(base.kubernetes.unwrap().version, "1.30.0");
        let pair = |a: &str, b: &str| (a.to_string(), b.to_string());
        assert_eq!(
            e.sysctl,
            [
                pair("net.ipv4.ip_forward", "0"),
                pair("net.ipv4.conf.all.rp_filter", "2")
            ]
        );
        assert_eq!(base.sysctl[0], pair("net.ipv4.ip_forward", "1"));
        assert_eq!(
            e.modprobe_options,
            [(
                "nvidia".to_string(),
                vec![pair("NVreg_EnableGpuFirmware", "1"), pair("NVreg_X", "2")]
            )]
        );
        let c = e.containerd.unwrap();
        assert_eq!(c.socket, "/run/containerd/containerd.sock");
        assert!(c.systemd_cgroup);
        assert_eq!(c.runtimes, [pair("nvidia", "/usr/bin/nvidia-container-runtime")]);
        assert_eq!(e.nvidia_driver_version.as_deref(), Some("565.57.01"));
        assert_eq!(base.nvidia_driver_version, None);

        for (bad, want) in [
            ("[expect]\nenabled_units = [\"kubelet\"]\n", "expect.enabled_units"),
            ("[expect]\nmodules_load = [\"br netfilter\"]\n", "expect.modules_load"),
            ("[expect]\nkubernete_version = \"1\"\n", "kubernete_version"),
            (
                "[expect.kubernetes]\npackages = [\"kubelet\"]\n",
                "expect.kubernetes.version",
            ),
            (
                "[expect.kubernetes]\nversion = \"1.30.0; reboot\"\npackages = [\"kubelet\"]\n",
                "expect.kubernetes.version",
            ),
            (
                "[expect.kubernetes]\nversion = \"1.30.0\"\n",
                "expect.kubernetes.packages",
            ),
            ("[expect.sysctl]\n\"a.b\" = \"$(reboot)\"\n", "expect.sysctl"),
            ("[expect.sysctl]\n\"a.b\" = true\n", "expect.sysctl"),
            (
                "[expect.modprobe_options]\nnvidia = \"NVreg_X\"\n",
                "expect.modprobe_options.nvidia",
            ),
            (
                "[expect.containerd]\nsocket = \"/run/c.sock\"\n",
                "expect.containerd.config",
            ),
            (
                "[expect.containerd]\nconfig = \"etc/c.toml\"\nsocket = \"/s\"\n",
                "expect.containerd.config",
            ),
        ] {
            let e = err_of(&format!("{BASE}{bad}"));
            assert!(e.contains("x.toml") && e.contains(want), "{bad}: {e}");
        }
    }

    /// Issue #17's kinds: disabled units (an extending definition opts back in through
    /// enabled_units), active, fail-soft units, ExecStart words, commands.
    #[test]
    fn node_expectations() {
        let d = project();
        std::fs::write(
            d.path().join("images/base.toml"),
            format!(
                "{BASE}[expect]\nenabled_units = [\"auditd.service\"]\n\
                 disabled_units = [\"apt-daily.timer\", \"apt-daily-upgrade.timer\"]\n\
                 active_units = [\"auditd.service\"]\ncommands = [\"unpigz\"]\n"
            ),
        )
        .unwrap();
        std::fs::write(
            d.path().join("images/gpu.toml"),
            "extends = \"base.toml\"\nname = \"gpu\"\n[expect]\nenabled_units = [\"apt-daily.timer\"]\n\
             fail_soft_units = [\"nvidia-fabricmanager.service\"]\n\
             [expect.exec_start]\n\"nvidia-persistenced.service\" = \"--persistence-mode  !--no-persistence-mode\"\n",
        )
        .unwrap();
        let base = load(&d.path().join("images/base.toml")).unwrap().expect;
        assert_eq!(base.disabled_units, ["apt-daily.timer", "apt-daily-upgrade.timer"]);
        assert_eq!(
            (base.active_units.len(), base.commands.as_slice()),
            (1, ["unpigz".to_string()].as_slice())
        );
        let e = load(&d.path().join("images/gpu.toml")).unwrap().expect;
        assert_eq!(e.disabled_units, ["apt-daily-upgrade.timer"]);
        assert_eq!(e.enabled_units, ["auditd.service", "apt-daily.timer"]);
        assert_eq!(e.fail_soft_units, ["nvidia-fabricmanager.service"]);
        assert_eq!(
            e.exec_start,
            [(
                "nvidia-persistenced.service".to_string(),
                vec!["--persistence-mode".to_string(), "!--no-persistence-mode".to_string()]
            )]
        );
        for (bad, want) in [
            ("[expect]\ndisabled_units = [\"apt-daily\"]\n", "expect.disabled_units"),
            (
                "[expect]\nenabled_units = [\"a.timer\"]\ndisabled_units = [\"a.timer\"]\n",
                "also in enabled_units",
            ),
            (
                "[expect]\nfail_soft_units = [\"x y.service\"]\n",
                "expect.fail_soft_units",
            ),
            ("[expect]\ncommands = [\"rm -rf\"]\n", "expect.commands"),
            (
                "[expect.exec_start]\n\"a.service\" = \"$(reboot)\"\n",
                "expect.exec_start",
            ),
            ("[expect.exec_start]\n\"a\" = \"--x\"\n", "expect.exec_start"),
        ] {
            let e = err_of(&format!("{BASE}{bad}"));
            assert!(e.contains("x.toml") && e.contains(want), "{bad}: {e}");
        }
    }

    #[test]
    fn package_list_errors() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("l.list");
        for (body, want) in [
            ("Bad_Name\n", "not a package name"),
            ("x=\n", "not a package name"),
            ("abc pool=pool/a.deb\n", "needs both"),
            ("abc pool=pool/a.deb sha256=12\n", "needs both"),
            (
                &format!("abc pool=pool/a.deb sha256={}\n", "a".repeat(64)),
                "exact version",
            ),
            (&format!("abc=1 pool=../a.deb sha256={}\n", "a".repeat(64)), "pool path"),
            ("abc foo=bar\n", "unknown field"),
        ] {
            std::fs::write(&p, body).unwrap();
            let e = parse_package_list(&p, &Substitutions::default())
                .unwrap_err()
                .to_string();
            assert!(e.contains(want) && e.contains("l.list:1"), "{body}: {e}");
        }
    }

    const BASE_TABLE: &str = "\n[base]\nurl = \"https://h.example/releases/jammy/release-20250516/u.img\"\n\
        sha256 = \"ABABABABABABABABABABABABABABABABABABABABABABABABABABABABABABABAB\"\n\
        sha256sums = \"https://h.example/releases/jammy/release-20250516/SHA256SUMS\"\n\
        signature = \"https://h.example/releases/jammy/release-20250516/SHA256SUMS.gpg\"\n\
        key = \"keys/k.asc\"\nfingerprint = \"D2EB 4462 6FDD C30B 513D  5BB7 1A5D 6C4C 7DB8 7C81\"\n";

    #[test]
    fn base_is_validated_and_inherited() {
        let d = project();
        std::fs::write(d.path().join("images/base.toml"), format!("{BASE}{BASE_TABLE}")).unwrap();
        std::fs::write(
            d.path().join("images/gpu.toml"),
            "extends = \"base.toml\"\nname = \"gpu\"\n",
        )
        .unwrap();
        let b = load(&d.path().join("images/gpu.toml")).unwrap().base.unwrap();
        assert_eq!(b.sha256, "ab".repeat(32));
        assert_eq!(b.fingerprint, "D2EB44626FDDC30B513D5BB71A5D6C4C7DB87C81");
        assert!(b.key.ends_with("keys/k.asc") && b.origin.ends_with("images/base.toml"));
        assert!(load(&d.path().join("images/gpu.toml")).is_ok());
        let e = err_of(&format!(
            "{BASE}{}",
            BASE_TABLE.replace("release-20250516/u.img", "current/u.img")
        ));
        assert!(e.contains("base.url") && e.contains("moving alias"), "{e}");
        let e = err_of(&format!("{BASE}{}", BASE_TABLE.replace("ABAB", "XY")));
        assert!(e.contains("base.sha256"), "{e}");
        let e = err_of(&format!("{BASE}{}", BASE_TABLE.replace("keys/k.asc", "keys/none.asc")));
        assert!(e.contains("base.key"), "{e}");
        let e = err_of(&format!("{BASE}{}", BASE_TABLE.replace("7DB8 7C81", "7DB8")));
        assert!(e.contains("base.fingerprint"), "{e}");
        let e = err_of(&format!("{BASE}{}", BASE_TABLE.replace("https://h.example", "ftp://h")));
        assert!(e.contains("not an http(s)://"), "{e}");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("20G"), Some(20 << 30));
        assert_eq!(parse_size("25GiB"), Some(25 << 30));
        assert_eq!(parse_size("25 GiB"), Some(25 << 30));
        assert_eq!(parse_size("20GB"), Some(20_000_000_000));
        assert_eq!(parse_size("500MB"), Some(500_000_000));
        assert_eq!(parse_size("512M"), Some(512 << 20));
        assert_eq!(parse_size("1024"), Some(1024));
        assert_eq!(parse_size("1X"), None);
        assert_eq!(parse_size(""), None);
    }
}
