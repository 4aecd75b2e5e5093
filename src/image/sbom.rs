//! The SBOM of an image: an SPDX 2.3 JSON document (`NAME.spdx.json`) made from the
//! finished image's dpkg database, read offline ([`RootFs`], no mount).
//!
//! One package element per installed package: name, version, supplier (from the
//! `Maintainer` field), download location and the `.deb`'s sha256 (from the build's
//! package records when given, else `NOASSERTION` and no checksum), a purl
//! (`pkg:deb/ubuntu/NAME@VERSION?arch=ARCH&distro=ubuntu-22.04`, the distro from the
//! image's os-release) and the declared license where the package's copyright file is
//! machine-readable ([`crate::image::copyright`]). Relationships: the document
//! DESCRIBES the image, the image CONTAINS every package, and each package DEPENDS_ON
//! the installed packages its `Depends`/`Pre-Depends` name (the first installed
//! alternative, virtual packages through `Provides`).
//!
//! The document types are `serde-spdx`'s, generated from the SPDX project's 2.3 JSON
//! schema. Everything in the document follows from the image (and the records), so two
//! runs on one image write the same bytes; `created` is `SOURCE_DATE_EPOCH` when set.

use crate::image::copyright::{self, DeclaredLicense};
use crate::image::dpkg::{self, DpkgPackage};
use crate::image::open::RootFs;
use crate::image::os_release;
use anyhow::{Context, Result};
use serde_spdx::spdx::v_2_3 as model;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

/// A package as the build's records know it: name, version, architecture.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PackageKey {
    pub name: String,
    pub version: String,
    pub arch: String,
}

/// Where a `.deb` came from and what it hashed to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DebRecord {
    /// Lower-case hex sha256 of the `.deb` file.
    pub sha256: String,
    /// The URL it was (or would be) downloaded from.
    pub url: String,
}

/// The build's package records (from the lock), by package.
pub type PackageRecords = BTreeMap<PackageKey, DebRecord>;

/// What the SBOM says about itself.
pub struct SbomInput<'a> {
    /// The image's name (the definition's `name`): the document's and the root package's.
    pub name: &'a str,
    /// The `.deb` records; without them (or for a package they lack) the download
    /// location is `NOASSERTION` and there is no checksum.
    pub records: Option<&'a PackageRecords>,
    /// The document's `created` time in seconds since 1970: a build's
    /// `SOURCE_DATE_EPOCH` (a locked build's comes from its lock). `None`: now.
    pub created: Option<u64>,
}

/// The file name of an image's SBOM.
pub fn file_name(image_name: &str) -> String {
    format!("{image_name}.spdx.json")
}

/// Counts for logs and reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SbomStats {
    pub packages: usize,
    pub with_license: usize,
    pub with_checksum: usize,
}

/// The SBOM of the image whose root is `root`.
pub fn sbom(root: &RootFs, input: &SbomInput) -> Result<(model::Spdx, SbomStats)> {
    let os = os_release::read(root)?;
    let distro = match (os.get("ID"), os.get("VERSION_ID")) {
        (Some(id), Some(v)) => Some(format!("{id}-{v}")),
        (Some(id), None) => Some(id.clone()),
        _ => None,
    };
    let purl_type_ns = os.get("ID").map_or("debian", String::as_str).to_string();
    let status = dpkg::read_status(root)?;
    let mut installed: Vec<&DpkgPackage> = status.iter().filter(|p| p.is_installed()).collect();
    installed.sort_by(|a, b| (&a.name, &a.arch).cmp(&(&b.name, &b.arch)));

    let mut ids = SpdxIds::default();
    let root_id = "SPDXRef-Image".to_string();
    let pkg_ids: Vec<String> = installed
        .iter()
        .map(|p| ids.make(&format!("deb-{}-{}", p.name, p.arch)))
        .collect();
    let mut stats = SbomStats {
        packages: installed.len(),
        with_license: 0,
        with_checksum: 0,
    };
    let mut extracted: BTreeMap<String, copyright::ExtractedLicense> = BTreeMap::new();
    let mut packages = vec![
        model::SpdxItemPackagesBuilder::default()
            .spdxid(root_id.clone())
            .name(input.name)
            .download_location("NOASSERTION")
            .files_analyzed(false)
            .primary_package_purpose("OPERATING-SYSTEM")
            .description(os.get("PRETTY_NAME").cloned().unwrap_or_default())
            .build()
            .context("building the image's SPDX package")?,
    ];
    for (p, id) in installed.iter().zip(&pkg_ids) {
        let key = PackageKey {
            name: p.name.clone(),
            version: p.version.clone(),
            arch: p.arch.clone(),
        };
        let record = input.records.and_then(|r| r.get(&key));
        let license = declared_license(root, &p.name)?;
        let mut b = model::SpdxItemPackagesBuilder::default();
        b.spdxid(id.clone())
            .name(p.name.clone())
            .version_info(p.version.clone())
            .download_location(record.map_or("NOASSERTION".to_string(), |r| r.url.clone()))
            .files_analyzed(false)
            .license_concluded("NOASSERTION")
            .copyright_text("NOASSERTION")
            .external_refs(vec![model::SpdxItemPackagesItemExternalRefs {
                comment: None,
                reference_category: "PACKAGE-MANAGER".into(),
                reference_type: "purl".into(),
                reference_locator: purl(&purl_type_ns, p, distro.as_deref()),
            }]);
        if let Some(s) = p.fields.get("Maintainer").and_then(|m| supplier(m)) {
            b.supplier(s);
        }
        if let Some(summary) = p.fields.get("Description").and_then(|d| d.lines().next()) {
            b.summary(summary.trim().to_string());
        }
        if let Some(h) = p.fields.get("Homepage").filter(|h| is_plain_url(h)) {
            b.homepage(h.clone());
        }
        if let Some(src) = &p.source {
            b.source_info(format!("built from the Debian source package {src}"));
        }
        match license {
            Some(l) => {
                stats.with_license += 1;
                b.license_declared(l.expression);
                for e in l.extracted {
                    extracted.entry(e.id.clone()).or_insert(e);
                }
            }
            None => {
                b.license_declared("NOASSERTION");
            }
        }
        if let Some(r) = record {
            stats.with_checksum += 1;
            b.checksums(vec![model::SpdxItemPackagesItemChecksums {
                algorithm: "SHA256".into(),
                checksum_value: r.sha256.to_ascii_lowercase(),
            }]);
        }
        packages.push(
            b.build()
                .with_context(|| format!("building the SPDX package of {}", p.name))?,
        );
    }

    let rel = |from: &str, kind: &str, to: &str| model::SpdxItemRelationships {
        comment: None,
        spdx_element_id: from.to_string(),
        relationship_type: kind.to_string(),
        related_spdx_element: to.to_string(),
    };
    let mut relationships = vec![rel("SPDXRef-DOCUMENT", "DESCRIBES", &root_id)];
    relationships.extend(pkg_ids.iter().map(|id| rel(&root_id, "CONTAINS", id)));
    for (from, to) in dependencies(&installed) {
        relationships.push(rel(&pkg_ids[from], "DEPENDS_ON", &pkg_ids[to]));
    }

    // The namespace is unique to this content: the image name and its package set.
    let mut h = Sha256::new();
    h.update(input.name.as_bytes());
    for p in &installed {
        h.update(format!("\n{} {} {}", p.name, p.version, p.arch).as_bytes());
    }
    let digest = crate::disk::checksum::hex(&h.finalize().into());
    let doc = model::SpdxBuilder::default()
        .spdx_version("SPDX-2.3")
        .data_license("CC0-1.0")
        .spdxid("SPDXRef-DOCUMENT")
        .name(input.name)
        .document_namespace(format!(
            "https://spdx.org/spdxdocs/kiln/{}-{}",
            input.name,
            &digest[..32]
        ))
        .creation_info(model::SpdxCreationInfo {
            comment: Some(
                "Installed packages read from the image's dpkg database (/var/lib/dpkg/status) without mounting it."
                    .into(),
            ),
            created: created(input.created)?,
            creators: vec![format!("Tool: kiln-{}", env!("CARGO_PKG_VERSION"))],
            license_list_version: Some(license_list_version()),
        })
        .document_describes(vec![root_id.clone()])
        .packages(packages)
        .relationships(relationships)
        .has_extracted_licensing_infos(
            extracted
                .into_values()
                .map(|e| model::SpdxItemHasExtractedLicensingInfos {
                    comment: Some("The license text of the package's /usr/share/doc/PKG/copyright".into()),
                    cross_refs: None,
                    extracted_text: e.text,
                    license_id: e.id,
                    name: Some(e.name),
                    see_alsos: None,
                })
                .collect::<Vec<_>>(),
        )
        .build()
        .context("building the SPDX document")?;
    Ok((doc, stats))
}

/// Write the SBOM of `image` to `out` as pretty-printed JSON.
pub fn write_sbom(root: &RootFs, input: &SbomInput, out: &Path) -> Result<SbomStats> {
    let (doc, stats) = sbom(root, input)?;
    let mut json = serde_json::to_vec_pretty(&doc).context("serialising the SPDX document")?;
    json.push(b'\n');
    std::fs::write(out, json).with_context(|| format!("writing {}", out.display()))?;
    Ok(stats)
}

/// `kiln sbom IMAGE [--name NAME] [--out FILE]`: the SBOM of an existing image, on stdout
/// or into a file.
pub fn cmd_sbom(image: &Path, name: Option<&str>, out: Option<&Path>) -> Result<()> {
    let root = RootFs::open(image)?;
    let name = match name {
        Some(n) => n.to_string(),
        None => image
            .file_stem()
            .map_or_else(|| "image".to_string(), |s| s.to_string_lossy().into_owned()),
    };
    let input = SbomInput {
        name: &name,
        records: None,
        created: crate::build::pipeline::source_date_epoch_env()?,
    };
    match out {
        Some(out) => {
            let stats = write_sbom(&root, &input, out)?;
            eprintln!(
                "wrote {} ({} packages, {} with a declared license)",
                out.display(),
                stats.packages,
                stats.with_license
            );
        }
        None => {
            let (doc, _) = sbom(&root, &input)?;
            println!("{}", serde_json::to_string_pretty(&doc)?);
        }
    }
    Ok(())
}

/// The declared license of an installed package, from its copyright file.
fn declared_license(root: &RootFs, package: &str) -> Result<Option<DeclaredLicense>> {
    let Some(bytes) = root.read_optional(&format!("/usr/share/doc/{package}/copyright"))? else {
        return Ok(None);
    };
    Ok(copyright::declared_license(&String::from_utf8_lossy(&bytes)))
}

/// `pkg:deb/ubuntu/NAME@VERSION?arch=ARCH&distro=ubuntu-22.04` (purl-spec's deb type;
/// the version percent-encoded, so an epoch's `:` is `%3A`).
pub fn purl(namespace: &str, p: &DpkgPackage, distro: Option<&str>) -> String {
    use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
    const KEEP: &AsciiSet = &NON_ALPHANUMERIC.remove(b'.').remove(b'-').remove(b'_').remove(b'~');
    let enc = |s: &str| utf8_percent_encode(s, KEEP).to_string();
    let mut s = format!(
        "pkg:deb/{}/{}@{}?arch={}",
        enc(&namespace.to_ascii_lowercase()),
        enc(&p.name),
        enc(&p.version),
        enc(&p.arch)
    );
    if let Some(d) = distro {
        s.push_str(&format!("&distro={}", enc(d)));
    }
    s
}

/// An SPDX supplier from a Debian `Maintainer` (`Name <email>`): `Organization:` for a
/// team, list or company, `Person:` otherwise.
pub fn supplier(maintainer: &str) -> Option<String> {
    let m = maintainer.trim();
    let (name, email) = match m.split_once('<') {
        Some((n, e)) => (n.trim(), Some(e.trim_end_matches('>').trim())),
        None => (m, None),
    };
    if name.is_empty() {
        return None;
    }
    const ORG_WORDS: [&str; 15] = [
        "team",
        "developers",
        "maintainers",
        "project",
        "group",
        "community",
        "foundation",
        "ubuntu",
        "debian",
        "kubernetes",
        "nvidia",
        "inc",
        "ltd",
        "corporation",
        "authors",
    ];
    let lower = name.to_ascii_lowercase();
    let org = lower
        .split(|c: char| !c.is_ascii_alphanumeric())
        .any(|w| ORG_WORDS.contains(&w))
        || email.is_some_and(|e| e.starts_with("pkg-") || e.contains("lists."));
    let kind = if org { "Organization" } else { "Person" };
    // SPDX: `Organization: NAME (EMAIL)`; parentheses inside the name would confuse it.
    let name = name.replace(['(', ')'], "");
    Some(match email {
        Some(e) if !e.is_empty() => format!("{kind}: {name} ({e})"),
        _ => format!("{kind}: {name}"),
    })
}

fn is_plain_url(s: &str) -> bool {
    (s.starts_with("https://") || s.starts_with("http://")) && !s.contains(char::is_whitespace)
}

/// `created`: the given time (a build's `SOURCE_DATE_EPOCH`), else now; UTC, seconds.
fn created(at: Option<u64>) -> Result<String> {
    let time = match at {
        Some(secs) => i64::try_from(secs)
            .ok()
            .and_then(|s| chrono::DateTime::from_timestamp(s, 0))
            .ok_or_else(|| crate::error::user(format!("SOURCE_DATE_EPOCH = {secs} is out of range")))?,
        None => chrono::Utc::now(),
    };
    Ok(time.format("%Y-%m-%dT%H:%M:%SZ").to_string())
}

/// The version of the SPDX license list the identifiers were checked against
/// (`MAJOR.MINOR`, as SPDX wants it).
fn license_list_version() -> String {
    let v = ::spdx::license_version();
    v.split('.').take(2).collect::<Vec<_>>().join(".")
}

/// SPDX element ids: `SPDXRef-` + letters, digits, `.` and `-`; unique.
#[derive(Default)]
struct SpdxIds(BTreeSet<String>);

impl SpdxIds {
    fn make(&mut self, what: &str) -> String {
        let clean: String = what
            .chars()
            .map(|c| match c {
                '+' => 'p',
                c if c.is_ascii_alphanumeric() || c == '.' || c == '-' => c,
                _ => '-',
            })
            .collect();
        let mut id = format!("SPDXRef-{clean}");
        let mut n = 2;
        while self.0.contains(&id) {
            id = format!("SPDXRef-{clean}-{n}");
            n += 1;
        }
        self.0.insert(id.clone());
        id
    }
}

/// (dependent, dependency) index pairs from `Depends` and `Pre-Depends`: for each clause,
/// the first alternative that is installed (by name, preferring the dependent's
/// architecture, or through `Provides`).
fn dependencies(installed: &[&DpkgPackage]) -> BTreeSet<(usize, usize)> {
    let mut by_name: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, p) in installed.iter().enumerate() {
        by_name.entry(p.name.as_str()).or_default().push(i);
        for provided in p.fields.get("Provides").into_iter().flat_map(|v| v.split(',')) {
            if let Some(name) = relation_name(provided) {
                by_name.entry(name).or_default().push(i);
            }
        }
    }
    let mut out = BTreeSet::new();
    for (i, p) in installed.iter().enumerate() {
        let fields = ["Pre-Depends", "Depends"].map(|f| p.fields.get(f));
        for clause in fields.iter().flatten().flat_map(|v| v.split(',')) {
            let target = clause.split('|').find_map(|alt| {
                let cands = by_name.get(relation_name(alt)?)?;
                cands
                    .iter()
                    .find(|&&j| installed[j].arch == p.arch || installed[j].arch == "all")
                    .or(cands.first())
                    .copied()
            });
            if let Some(j) = target.filter(|&j| j != i) {
                out.insert((i, j));
            }
        }
    }
    out
}

/// The package name of one relation: `libc6 (>= 2.34)` → `libc6`, `python3:any` → `python3`.
fn relation_name(rel: &str) -> Option<&str> {
    let name = rel.split(['(', '[', '<']).next()?.trim();
    let name = name.split(':').next()?.trim();
    (!name.is_empty()).then_some(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::dpkg::parse_dpkg_status;

    #[test]
    fn purls_and_suppliers() {
        let pkgs = parse_dpkg_status(
            "Package: libstdc++6\nStatus: install ok installed\nArchitecture: amd64\nVersion: 1:12.3.0-1ubuntu1~22.04\n",
        );
        assert_eq!(
            purl("ubuntu", &pkgs[0], Some("ubuntu-22.04")),
            "pkg:deb/ubuntu/libstdc%2B%2B6@1%3A12.3.0-1ubuntu1~22.04?arch=amd64&distro=ubuntu-22.04"
        );
        assert_eq!(
            supplier("Ubuntu Developers <ubuntu-devel-discuss@lists.ubuntu.com>").as_deref(),
            Some("Organization: Ubuntu Developers (ubuntu-devel-discuss@lists.ubuntu.com)")
        );
        assert_eq!(
            supplier("Jane Doe <jane@example.org>").as_deref(),
            Some("Person: Jane Doe (jane@example.org)")
        );
        assert_eq!(
            supplier("Kubernetes Authors <dev@kubernetes.io>").as_deref(),
            Some("Organization: Kubernetes Authors (dev@kubernetes.io)")
        );
        assert_eq!(supplier(" "), None);
    }

    #[test]
    fn ids_are_valid_and_unique() {
        let mut ids = SpdxIds::default();
        assert_eq!(ids.make("deb-libstdc++6-amd64"), "SPDXRef-deb-libstdcpp6-amd64");
        assert_eq!(ids.make("deb-a_b-all"), "SPDXRef-deb-a-b-all");
        assert_eq!(ids.make("deb-a.b-all"), "SPDXRef-deb-a.b-all");
        assert_eq!(ids.make("deb-a-b-all"), "SPDXRef-deb-a-b-all-2");
    }

    #[test]
    fn dependency_edges() {
        let status = parse_dpkg_status(
            "Package: a\nStatus: install ok installed\nArchitecture: amd64\nVersion: 1\nDepends: b (>= 1) | c, mta, d:any, missing\nPre-Depends: a\n\n\
Package: b\nStatus: install ok installed\nArchitecture: amd64\nVersion: 1\n\n\
Package: postfix\nStatus: install ok installed\nArchitecture: amd64\nVersion: 1\nProvides: mta, default-mta (= 1)\n\n\
Package: d\nStatus: install ok installed\nArchitecture: all\nVersion: 1\n",
        );
        let installed: Vec<&DpkgPackage> = status.iter().collect();
        let edges: Vec<(&str, &str)> = dependencies(&installed)
            .into_iter()
            .map(|(i, j)| (installed[i].name.as_str(), installed[j].name.as_str()))
            .collect();
        assert_eq!(edges, [("a", "b"), ("a", "postfix"), ("a", "d")]);
    }

    #[test]
    fn sbom_of_an_image() {
        let root = RootFs::open(&crate::image::inspect::test_images::images().raw).unwrap();
        let mut records = PackageRecords::new();
        records.insert(
            PackageKey {
                name: "kubelet".into(),
                version: "1.30.0-1.1".into(),
                arch: "amd64".into(),
            },
            DebRecord {
                sha256: "AB".repeat(32),
                url: "https://pkgs.k8s.io/core:/stable:/v1.30/deb/amd64/kubelet_1.30.0-1.1_amd64.deb".into(),
            },
        );
        let (doc, stats) = sbom(
            &root,
            &SbomInput {
                name: "test-image",
                records: Some(&records),
                created: Some(1_700_000_000),
            },
        )
        .unwrap();
        assert_eq!(doc.creation_info.created, "2023-11-14T22:13:20Z");
        // 11 stanzas, two not installed (config-files, half-configured).
        assert_eq!(stats.packages, 9);
        assert_eq!(stats.with_checksum, 1);
        let pkgs = doc.packages.as_ref().unwrap();
        assert_eq!(pkgs.len(), 10, "the image and its packages");
        let kubelet = pkgs.iter().find(|p| p.name == "kubelet").unwrap();
        assert_eq!(kubelet.version_info.as_deref(), Some("1.30.0-1.1"));
        assert_eq!(kubelet.checksums.as_ref().unwrap()[0].checksum_value, "ab".repeat(32));
        assert!(kubelet.download_location.starts_with("https://pkgs.k8s.io/"));
        assert_eq!(
            kubelet.external_refs.as_ref().unwrap()[0].reference_locator,
            "pkg:deb/ubuntu/kubelet@1.30.0-1.1?arch=amd64&distro=ubuntu-22.04"
        );
        let bash = pkgs.iter().find(|p| p.name == "bash").unwrap();
        assert_eq!(bash.download_location, "NOASSERTION");
        assert!(bash.checksums.is_none());
        let json = serde_json::to_value(&doc).unwrap();
        assert_eq!(json["spdxVersion"], "SPDX-2.3");
        assert_eq!(json["relationships"][0]["relationshipType"], "DESCRIBES");
        assert_eq!(
            json["relationships"].as_array().unwrap().len(),
            10,
            "DESCRIBES and 9 CONTAINS"
        );
    }
}
