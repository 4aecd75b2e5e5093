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
use serde::Serialize;

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

// The payload's shape. Field order is the spec's key order; serde_json keeps it
// because kiln enables its `preserve_order` feature.

#[derive(Serialize)]
struct Payload<'a> {
    metadata: Metadata<'a>,
    spec: Spec<'a>,
}

#[derive(Serialize)]
struct Metadata<'a> {
    name: &'a str,
    description: &'a str,
}

#[derive(Serialize)]
struct Spec<'a> {
    uri: String,
    architecture: &'static str,
    virtualization: &'a str,
    os: Os<'a>,
    #[serde(rename = "softwareVersions")]
    software_versions: SoftwareVersions,
    #[serde(skip_serializing_if = "Option::is_none")]
    gpu: Option<Gpu<'a>>,
}

#[derive(Serialize)]
struct Os<'a> {
    kernel: &'static str,
    family: &'a str,
    distro: &'a str,
    variant: &'a str,
    codename: &'a str,
    version: &'a str,
}

#[derive(Serialize)]
struct SoftwareVersions {
    kubernetes: String,
}

#[derive(Serialize)]
struct Gpu<'a> {
    vendor: &'a str,
    driver: &'a str,
    models: &'a [String],
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
            vendor: &g.vendor,
            driver: installed_upstream(facts, &g.driver_package, "spec.gpu.driver")?,
            models: &g.models,
        }),
    };

    let payload = Payload {
        metadata: Metadata {
            name: &input.name,
            description: &input.description,
        },
        spec: Spec {
            uri: input.payload.uri_template.replace("{name}", &input.name),
            architecture,
            virtualization: &input.payload.virtualization,
            os: Os {
                kernel: "linux",
                family,
                distro,
                variant: &input.payload.variant,
                codename,
                version,
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

/// The payload's architecture name for a dpkg architecture.
pub fn api_architecture(dpkg_arch: &str) -> Option<&'static str> {
    Some(match dpkg_arch {
        "amd64" => "x86_64",
        "arm64" => "aarch64",
        "armhf" => "armv7l",
        "i386" => "i686",
        "ppc64el" => "ppc64le",
        "s390x" => "s390x",
        "riscv64" => "riscv64",
        _ => return None,
    })
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
