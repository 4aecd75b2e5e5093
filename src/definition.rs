//! Image definitions: `images/NAME.toml`, validated with errors that name the file and
//! the key. Unknown keys are errors. A definition may `extends` another one (the NVIDIA
//! image builds on the GPU-ready one): it inherits its stages, repositories and payload
//! facts, and adds or replaces stages by name.
//!
//! Paths inside a definition (package lists, overlays, hooks, keys) are named, not
//! pathed: `packages = ["kubernetes"]` is `package-lists/kubernetes.list` at the project
//! root, the directory holding `images/`.

use crate::error::user;
use crate::user_bail;
use anyhow::{Context, Result};
use serde::Deserialize;
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
    #[serde(default)]
    kernel_headers: bool,
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

/// A validated, fully resolved image definition.
#[derive(Debug, Clone)]
pub struct ImageDef {
    pub file: PathBuf,
    pub project_root: PathBuf,
    pub name: String,
    pub description: String,
    pub disk_size: u64,
    pub bootloader: bool,
    pub payload: PayloadFacts,
    pub repositories: Vec<Repository>,
    pub stages: Vec<Stage>,
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
    let mult: u64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "K" | "KB" | "KIB" => 1 << 10,
        "M" | "MB" | "MIB" => 1 << 20,
        "G" | "GB" | "GIB" => 1 << 30,
        "T" | "TB" | "TIB" => 1 << 40,
        _ => return None,
    };
    n.checked_mul(mult)
}

fn read_raw(path: &Path) -> Result<RawDef> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| user(format!("cannot read image definition {}: {e}", path.display())))?;
    toml::from_str(&text).map_err(|e| user(format!("image definition {}: {e}", path.display())))
}

/// Load and validate a definition (and what it extends).
pub fn load(path: &Path) -> Result<ImageDef> {
    let path = path
        .canonicalize()
        .map_err(|e| user(format!("image definition {}: {e}", path.display())))?;
    let project_root = path
        .parent()
        .and_then(|p| p.parent())
        .map(Path::to_path_buf)
        .context("image definition has no parent directory")?;
    let mut chain = vec![(path.clone(), read_raw(&path)?)];
    while let Some(parent) = chain.last().unwrap().1.extends.clone() {
        let from = &chain.last().unwrap().0;
        let p = from.parent().unwrap().join(&parent);
        if chain.iter().any(|(q, _)| q == &p) || chain.len() > 8 {
            user_bail!(
                "image definition {}: `extends` forms a cycle at {parent}",
                from.display()
            );
        }
        let raw = read_raw(&p).map_err(|e| user(format!("{}: extends = \"{parent}\": {e:#}", from.display())))?;
        chain.push((p, raw));
    }
    // Merge from the root ancestor down.
    let mut name = None;
    let mut description = None;
    let mut disk_size = None;
    let mut bootloader = None;
    let mut payload = RawPayload::default();
    let mut repos: Vec<Repository> = Vec::new();
    let mut stages: Vec<(RawStage, PathBuf)> = Vec::new();
    for (file, raw) in chain.iter().rev() {
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
    let (ds, ds_file) =
        disk_size.ok_or_else(|| user(format!("image definition {f}: missing key `disk_size` (e.g. \"20G\")")))?;
    let disk_size = match parse_size(&ds) {
        Some(n) if n >= 1 << 30 && n % (1 << 20) == 0 => n,
        _ => user_bail!(
            "image definition {}: `disk_size` = \"{ds}\" is not a size of at least 1G in whole MiB (e.g. \"20G\")",
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
        let mut packages = Vec::new();
        for l in &s.packages {
            let p = project_root.join("package-lists").join(format!("{l}.list"));
            if !p.is_file() {
                user_bail!(
                    "image definition {fd}: stage `{}` package list `{l}` not found at {}",
                    s.name,
                    p.display()
                );
            }
            packages.extend(parse_package_list(&p)?);
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
            kernel_headers: s.kernel_headers,
            repositories: s.repositories,
            packages,
            hold: s.hold,
            require_modules: s.require_modules,
        });
    }
    Ok(ImageDef {
        file: path.clone(),
        project_root,
        name,
        description,
        disk_size,
        bootloader: bootloader.unwrap_or(true),
        payload,
        repositories: repos,
        stages: out_stages,
    })
}

/// Parse `package-lists/X.list`: one package a line, `name=version` pins, `#` comments,
/// and `name=version pool=PATH sha256=HEX` for a package fetched by its pool path.
pub fn parse_package_list(path: &Path) -> Result<Vec<PackageSpec>> {
    let text =
        std::fs::read_to_string(path).map_err(|e| user(format!("cannot read package list {}: {e}", path.display())))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap().trim();
        if line.is_empty() {
            continue;
        }
        let origin = format!("{}:{}", path.display(), i + 1);
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

    pub fn payload_input(&self) -> crate::image::payload::PayloadInput {
        crate::image::payload::PayloadInput {
            name: self.name.clone(),
            description: self.description.clone(),
            uri_template: self.payload.uri_template.clone(),
            virtualization: self.payload.virtualization.clone(),
            variant: self.payload.variant.clone(),
            kubernetes_package: self.payload.kubernetes_package.clone(),
            gpu: self.payload.gpu.as_ref().map(|g| crate::image::payload::GpuInput {
                vendor: g.vendor.clone(),
                models: g.models.clone(),
                driver_package: g.driver_package.clone(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            let e = parse_package_list(&p).unwrap_err().to_string();
            assert!(e.contains(want) && e.contains("l.list:1"), "{body}: {e}");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("20G"), Some(20 << 30));
        assert_eq!(parse_size("25GiB"), Some(25 << 30));
        assert_eq!(parse_size("512M"), Some(512 << 20));
        assert_eq!(parse_size("1024"), Some(1024));
        assert_eq!(parse_size("1X"), None);
        assert_eq!(parse_size(""), None);
    }
}
