//! The API registration payload of a finished image (SPEC.md, "API Registration
//! Schema"): exactly the spec's keys, in the spec's order, nothing else.
//!
//! What the definition decides (name, description, URI, virtualization, variant, GPU
//! vendor and models) comes from [`PayloadInput`] (the definition's name, description
//! and [`PayloadFacts`]); every fact that can be read from
//! the image (architecture, OS, Kubernetes and driver versions) comes from the
//! image's [`ImageFacts`], never from the definition, so the payload describes what
//! was really built.

use crate::definition::{ImageDef, PayloadFacts};
use crate::error::user;
use crate::image::dpkg::upstream_version;
use crate::image::inspect::{ImageFacts, is_key_package};
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// What the image definition contributes to the payload.
#[derive(Debug, Clone)]
pub struct PayloadInput {
    pub name: String,
    pub description: String,
    /// The definition's `[payload]`: URI template, virtualization, variant, the
    /// Kubernetes package and (only for GPU images) the GPU.
    pub payload: PayloadFacts,
}

impl PayloadInput {
    /// The payload part of a definition.
    pub fn of(def: &ImageDef) -> PayloadInput {
        PayloadInput {
            name: def.name.clone(),
            description: def.description.clone(),
            payload: def.payload.clone(),
        }
    }
}

// The payload's shape, for writing it and for checking one before it is registered
// ([`validate`]). Field order is the spec's key order; serde_json keeps it because
// kiln enables its `preserve_order` feature.

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Payload {
    metadata: Metadata,
    spec: Spec,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Metadata {
    name: String,
    description: String,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Spec {
    uri: String,
    architecture: String,
    virtualization: String,
    os: Os,
    #[serde(rename = "softwareVersions")]
    software_versions: SoftwareVersions,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    gpu: Option<Gpu>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Os {
    kernel: String,
    family: String,
    distro: String,
    variant: String,
    codename: String,
    version: String,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SoftwareVersions {
    kubernetes: String,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Gpu {
    vendor: String,
    driver: String,
    models: Vec<String>,
}

/// Check that `json` is a registration payload of the spec's schema: exactly its keys
/// (`spec.gpu` optional), every value a non-empty string (GPU models a non-empty list),
/// an http(s) `uri` with no template placeholder left, a known architecture and a
/// `v`-prefixed Kubernetes version. `what` names the payload in the error, which lists
/// every problem and exits 2.
pub fn validate(json: &serde_json::Value, what: &str) -> Result<()> {
    let p: Payload = serde_json::from_value(json.clone()).map_err(|e| {
        user(format!(
            "{what} is not a registration payload of the spec's schema: {e}"
        ))
    })?;
    let mut problems = Vec::new();
    let strings = [
        ("metadata.name", &p.metadata.name),
        ("metadata.description", &p.metadata.description),
        ("spec.uri", &p.spec.uri),
        ("spec.architecture", &p.spec.architecture),
        ("spec.virtualization", &p.spec.virtualization),
        ("spec.os.kernel", &p.spec.os.kernel),
        ("spec.os.family", &p.spec.os.family),
        ("spec.os.distro", &p.spec.os.distro),
        ("spec.os.variant", &p.spec.os.variant),
        ("spec.os.codename", &p.spec.os.codename),
        ("spec.os.version", &p.spec.os.version),
        ("spec.softwareVersions.kubernetes", &p.spec.software_versions.kubernetes),
    ];
    for (k, v) in strings {
        if v.trim().is_empty() {
            problems.push(format!("{k} is empty"));
        }
    }
    let uri = &p.spec.uri;
    if !(uri.starts_with("https://") || uri.starts_with("http://")) || uri.contains(['{', '}', ' ']) {
        problems.push(format!("spec.uri `{uri}` is not an http(s) URL"));
    }
    if !API_ARCHITECTURES.iter().any(|(_, a)| *a == p.spec.architecture) {
        problems.push(format!(
            "spec.architecture `{}` is not a known architecture",
            p.spec.architecture
        ));
    }
    if !p.spec.software_versions.kubernetes.starts_with('v') {
        problems.push(format!(
            "spec.softwareVersions.kubernetes `{}` does not start with v",
            p.spec.software_versions.kubernetes
        ));
    }
    if let Some(g) = &p.spec.gpu {
        if g.vendor.is_empty() || g.driver.is_empty() {
            problems.push("spec.gpu.vendor and spec.gpu.driver must not be empty".into());
        }
        if g.models.is_empty() || g.models.iter().any(|m| m.is_empty()) {
            problems.push("spec.gpu.models must be a non-empty list of names".into());
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(user(format!(
            "{what} does not match the spec's schema: {}",
            problems.join("; ")
        )))
    }
}

/// Build the registration payload of an image from its facts and its definition.
///
/// A fact missing from the image (no dpkg architecture, an os-release key, the
/// Kubernetes package, the GPU driver package) is a `user` error naming what is
/// missing and in which image.
pub fn build_payload(facts: &ImageFacts, input: &PayloadInput) -> Result<serde_json::Value> {
    let image = &facts.image;

    let dpkg_arch = facts
        .arch
        .as_deref()
        .ok_or_else(|| user(format!("{image}: no dpkg architecture found (no installed base-files in /var/lib/dpkg/status, no /var/lib/dpkg/arch), so the payload has no spec.architecture")))?;
    let architecture = api_architecture(dpkg_arch).ok_or_else(|| {
        user(format!("{image}: dpkg architecture `{dpkg_arch}` has no payload architecture name (known: amd64, arm64, armhf, i386, ppc64el, s390x, riscv64)"))
    })?;

    let os_release = |key: &str| {
        facts
            .os_release
            .get(key)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
            .ok_or_else(|| {
                user(format!(
                    "{image}: /etc/os-release has no {key}, needed for the payload's spec.os"
                ))
            })
    };
    let distro = os_release("ID")?;
    // ID_LIKE may list several families ("rhel fedora"); the first is the closest.
    let family = match facts
        .os_release
        .get("ID_LIKE")
        .and_then(|v| v.split_whitespace().next())
    {
        Some(f) => f,
        None => distro,
    };
    let codename = os_release("VERSION_CODENAME")?;
    let version = os_release("VERSION_ID")?;

    let kubernetes = format!(
        "v{}",
        installed_upstream(
            facts,
            &input.payload.kubernetes_package,
            "spec.softwareVersions.kubernetes"
        )?
    );

    let gpu = match &input.payload.gpu {
        None => None,
        Some(g) => Some(Gpu {
            vendor: g.vendor.clone(),
            driver: installed_upstream(facts, &g.driver_package, "spec.gpu.driver")?.to_string(),
            models: g.models.clone(),
        }),
    };

    let payload = Payload {
        metadata: Metadata {
            name: input.name.clone(),
            description: input.description.clone(),
        },
        spec: Spec {
            uri: input.payload.uri_template.replace("{name}", &input.name),
            architecture: architecture.to_string(),
            virtualization: input.payload.virtualization.clone(),
            os: Os {
                kernel: "linux".to_string(),
                family: family.to_string(),
                distro: distro.to_string(),
                variant: input.payload.variant.clone(),
                codename: codename.to_string(),
                version: version.to_string(),
            },
            software_versions: SoftwareVersions { kubernetes },
            gpu,
        },
    };
    serde_json::to_value(&payload).context("serialising the registration payload")
}

/// The upstream version of an installed package, or an error saying which payload
/// field needs it.
fn installed_upstream<'f>(facts: &'f ImageFacts, package: &str, field: &str) -> Result<&'f str> {
    if !is_key_package(package) {
        // inspect only records the packages that matter; anything else would always
        // look "not installed".
        return Err(user(format!(
            "package `{package}` (for the payload's {field}) is not one kiln inspect records; use a kubelet/kubeadm/kubectl, containerd, runc, dkms, linux-*, nvidia-* or libnvidia-* package"
        )));
    }
    let p = facts.packages.get(package).ok_or_else(|| {
        user(format!(
            "{}: package `{package}` is not installed, so the payload's {field} is unknown",
            facts.image
        ))
    })?;
    Ok(upstream_version(&p.version))
}

/// dpkg architectures and their payload architecture names.
const API_ARCHITECTURES: [(&str, &str); 7] = [
    ("amd64", "x86_64"),
    ("arm64", "aarch64"),
    ("armhf", "armv7l"),
    ("i386", "i686"),
    ("ppc64el", "ppc64le"),
    ("s390x", "s390x"),
    ("riscv64", "riscv64"),
];

/// The payload's architecture name for a dpkg architecture.
pub fn api_architecture(dpkg_arch: &str) -> Option<&'static str> {
    API_ARCHITECTURES.iter().find(|(d, _)| *d == dpkg_arch).map(|(_, a)| *a)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::definition::GpuFacts;
    use crate::error::exit_code;
    use crate::image::inspect::test_images::images;
    use crate::image::inspect::{ImageFacts, inspect_image};
    use serde_json::json;
    use std::sync::OnceLock;

    /// Facts of the shared test image (read once).
    fn facts() -> ImageFacts {
        static FACTS: OnceLock<ImageFacts> = OnceLock::new();
        FACTS.get_or_init(|| inspect_image(&images().raw).unwrap()).clone()
    }

    fn input(gpu: bool) -> PayloadInput {
        PayloadInput {
            name: "ubuntu-2204-nvidia-565-firmware1".into(),
            description: "Ubuntu 22.04 with NVIDIA 565.x driver, NVreg_EnableGpuFirmware=1".into(),
            payload: PayloadFacts {
                uri_template: "https://bucket.s3.amazonaws.com/images/{name}.raw".into(),
                virtualization: "virtualized".into(),
                variant: "server".into(),
                kubernetes_package: "kubelet".into(),
                gpu: gpu.then(|| GpuFacts {
                    vendor: "NVIDIA".into(),
                    models: vec!["A100".into(), "H100".into(), "H200".into()],
                    driver_package: "nvidia-driver-565-server".into(),
                }),
            },
        }
    }

    /// Keys of every object in `v`, depth first, with their paths, in order.
    fn key_paths(v: &serde_json::Value, prefix: &str, out: &mut Vec<String>) {
        if let serde_json::Value::Object(m) = v {
            for (k, child) in m {
                let path = format!("{prefix}{k}");
                out.push(path.clone());
                key_paths(child, &format!("{path}."), out);
            }
        }
    }

    const SPEC_KEYS: [&str; 15] = [
        "metadata",
        "metadata.name",
        "metadata.description",
        "spec",
        "spec.uri",
        "spec.architecture",
        "spec.virtualization",
        "spec.os",
        "spec.os.kernel",
        "spec.os.family",
        "spec.os.distro",
        "spec.os.variant",
        "spec.os.codename",
        "spec.os.version",
        "spec.softwareVersions",
    ];

    #[test]
    fn gpu_payload_is_the_spec_shape_with_values_from_the_image() {
        let p = build_payload(&facts(), &input(true)).unwrap();
        // The spec's Image 2 example, byte for byte (keys in the spec's order).
        let expected = r#"{
  "metadata": {
    "name": "ubuntu-2204-nvidia-565-firmware1",
    "description": "Ubuntu 22.04 with NVIDIA 565.x driver, NVreg_EnableGpuFirmware=1"
  },
  "spec": {
    "uri": "https://bucket.s3.amazonaws.com/images/ubuntu-2204-nvidia-565-firmware1.raw",
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
    "softwareVersions": {
      "kubernetes": "v1.30.0"
    },
    "gpu": {
      "vendor": "NVIDIA",
      "driver": "565.57.01",
      "models": [
        "A100",
        "H100",
        "H200"
      ]
    }
  }
}"#;
        assert_eq!(serde_json::to_string_pretty(&p).unwrap(), expected);
        let mut keys = Vec::new();
        key_paths(&p, "", &mut keys);
        let mut want: Vec<String> = SPEC_KEYS.iter().map(|s| s.to_string()).collect();
        want.extend(
            [
                "spec.softwareVersions.kubernetes",
                "spec.gpu",
                "spec.gpu.vendor",
                "spec.gpu.driver",
                "spec.gpu.models",
            ]
            .map(String::from),
        );
        assert_eq!(keys, want);
    }

    #[test]
    fn non_gpu_payload_has_no_gpu_key() {
        let mut i = input(false);
        i.name = "ubuntu-2204-gpu-ready-nodriver".into();
        let p = build_payload(&facts(), &i).unwrap();
        let mut keys = Vec::new();
        key_paths(&p, "", &mut keys);
        let mut want: Vec<String> = SPEC_KEYS.iter().map(|s| s.to_string()).collect();
        want.push("spec.softwareVersions.kubernetes".into());
        assert_eq!(keys, want);
        assert_eq!(
            p["spec"]["uri"],
            "https://bucket.s3.amazonaws.com/images/ubuntu-2204-gpu-ready-nodriver.raw"
        );
    }

    #[test]
    fn facts_come_from_the_image_not_the_definition() {
        let mut f = facts();
        f.arch = Some("arm64".into());
        f.os_release.insert("ID_LIKE".into(), "rhel fedora".into());
        f.os_release.insert("VERSION_ID".into(), "24.04".into());
        f.packages.get_mut("kubelet").unwrap().version = "1.31.2-1.1".into();
        f.packages.get_mut("nvidia-driver-565-server").unwrap().version = "1:565.77-0ubuntu1".into();
        let p = build_payload(&f, &input(true)).unwrap();
        assert_eq!(p["spec"]["architecture"], "aarch64");
        assert_eq!(p["spec"]["os"]["family"], "rhel");
        assert_eq!(p["spec"]["os"]["version"], "24.04");
        assert_eq!(p["spec"]["softwareVersions"], json!({"kubernetes": "v1.31.2"}));
        assert_eq!(p["spec"]["gpu"]["driver"], "565.77");

        // Without ID_LIKE the family is the distro itself.
        f.os_release.remove("ID_LIKE");
        assert_eq!(
            build_payload(&f, &input(false)).unwrap()["spec"]["os"]["family"],
            "ubuntu"
        );
    }

    #[test]
    fn built_payloads_validate_and_wrong_shapes_do_not() {
        let p = build_payload(&facts(), &input(true)).unwrap();
        validate(&p, "p.json").unwrap();
        validate(&build_payload(&facts(), &input(false)).unwrap(), "p.json").unwrap();
        let bad = |f: &dyn Fn(&mut serde_json::Value), want: &str| {
            let mut v = p.clone();
            f(&mut v);
            let e = validate(&v, "p.json").unwrap_err();
            assert_eq!(exit_code(&e), 2);
            let msg = format!("{e:#}");
            assert!(msg.contains(want) && msg.contains("p.json"), "{msg}");
        };
        bad(&|v| v["spec"]["extra"] = json!(1), "extra");
        bad(&|v| drop(v["spec"].as_object_mut().unwrap().remove("os")), "os");
        bad(
            &|v| v["spec"]["uri"] = json!("https://b.example/{name}.raw"),
            "spec.uri",
        );
        bad(&|v| v["spec"]["architecture"] = json!("amd64"), "amd64");
        bad(
            &|v| v["spec"]["softwareVersions"]["kubernetes"] = json!("1.30.0"),
            "does not start with v",
        );
        bad(&|v| v["spec"]["gpu"]["models"] = json!([]), "spec.gpu.models");
        bad(&|v| v["metadata"]["name"] = json!(""), "metadata.name is empty");
        bad(&|v| v["spec"]["os"]["version"] = json!(22.04), "expected a string");
    }

    #[test]
    fn missing_facts_are_named() {
        let image = facts().image;
        let err = |f: &ImageFacts, i: &PayloadInput| {
            let e = build_payload(f, i).unwrap_err();
            assert_eq!(exit_code(&e), 2, "{e:#}");
            let msg = format!("{e:#}");
            assert!(msg.contains(&image), "names the image: {msg}");
            msg
        };

        let mut f = facts();
        f.packages.remove("kubelet");
        assert!(err(&f, &input(false)).contains("kubelet"));

        let mut f = facts();
        f.packages.remove("nvidia-driver-565-server");
        assert!(err(&f, &input(true)).contains("nvidia-driver-565-server"));
        // A non-GPU image does not need the driver.
        build_payload(&f, &input(false)).unwrap();

        let mut f = facts();
        f.arch = None;
        assert!(err(&f, &input(false)).contains("architecture"));

        let mut f = facts();
        f.os_release.remove("VERSION_CODENAME");
        assert!(err(&f, &input(false)).contains("VERSION_CODENAME"));

        let mut i = input(true);
        i.payload.gpu.as_mut().unwrap().driver_package = "cuda-drivers".into();
        let e = build_payload(&facts(), &i).unwrap_err();
        assert!(format!("{e:#}").contains("cuda-drivers"), "{e:#}");
    }
}
