//! The dpkg database of an image: `/var/lib/dpkg/status` stanzas, the native
//! architecture, and Debian version ordering (`dpkg --compare-versions`). Used by
//! `inspect` and `verify` on an unmounted image and by the build's stages.

use crate::image::open::RootFs;
use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::cmp::Ordering;
use std::collections::BTreeMap;

/// The packages in the dpkg status file of an image root; none if it has no status file.
pub fn read_status(root: &RootFs) -> Result<Vec<DpkgPackage>> {
    Ok(match root.read_optional("/var/lib/dpkg/status")? {
        Some(bytes) => parse_dpkg_status(&String::from_utf8_lossy(&bytes)),
        None => Vec::new(),
    })
}

/// One stanza of `/var/lib/dpkg/status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DpkgPackage {
    /// `Package`.
    pub name: String,
    /// `Version` (empty for packages that were never unpacked).
    pub version: String,
    /// `Architecture` (`amd64`, `all`, ...).
    pub arch: String,
    /// `Status`: `want flag state`, e.g. `install ok installed`, `hold ok installed`.
    pub status: String,
    /// `Source`, if it differs from the name.
    pub source: Option<String>,
    /// Every field of the stanza; continuation lines joined with `\n`.
    pub fields: BTreeMap<String, String>,
}

impl DpkgPackage {
    /// The selection: `install`, `hold`, `deinstall`, `purge` or `unknown`.
    pub fn want(&self) -> &str {
        self.status.split_whitespace().next().unwrap_or("")
    }

    /// The state: `installed`, `config-files`, `half-configured`, ...
    pub fn state(&self) -> &str {
        self.status.split_whitespace().nth(2).unwrap_or("")
    }

    /// Fully installed (`... ok installed`).
    pub fn is_installed(&self) -> bool {
        self.state() == "installed" && self.status.split_whitespace().nth(1) == Some("ok")
    }

    /// On hold (`apt-mark hold`).
    pub fn is_held(&self) -> bool {
        self.want() == "hold"
    }
}

/// Parse dpkg's status file (deb822 stanzas separated by blank lines). Stanzas
/// without a `Package` field are skipped.
pub fn parse_dpkg_status(text: &str) -> Vec<DpkgPackage> {
    let mut packages = Vec::new();
    let mut fields: BTreeMap<String, String> = BTreeMap::new();
    let mut last_key: Option<String> = None;
    let mut finish = |fields: &mut BTreeMap<String, String>| {
        let mut f = std::mem::take(fields);
        let Some(name) = f.remove("Package") else { return };
        let get = |k: &str| f.get(k).cloned().unwrap_or_default();
        packages.push(DpkgPackage {
            version: get("Version"),
            arch: get("Architecture"),
            status: get("Status"),
            source: f
                .get("Source")
                .map(|s| s.split_whitespace().next().unwrap_or("").to_string()),
            name: name.clone(),
            fields: {
                f.insert("Package".into(), name);
                f
            },
        });
    };
    for line in text.lines() {
        if line.trim().is_empty() {
            finish(&mut fields);
            last_key = None;
        } else if line.starts_with([' ', '\t']) {
            if let Some(v) = last_key.as_ref().and_then(|k| fields.get_mut(k)) {
                v.push('\n');
                v.push_str(line.trim());
            }
        } else if let Some((k, v)) = line.split_once(':') {
            let k = k.trim().to_string();
            fields.insert(k.clone(), v.trim().to_string());
            last_key = Some(k);
        }
    }
    finish(&mut fields);
    packages
}

/// Compare two Debian version strings like `dpkg --compare-versions`: epoch
/// numerically, then upstream version, then revision, each with dpkg's rules (digit
/// runs numerically, letters before other characters, `~` before everything,
/// even the end of the string).
pub fn dpkg_version_cmp(a: &str, b: &str) -> Ordering {
    let (ea, ua, ra) = split_version(a);
    let (eb, ub, rb) = split_version(b);
    ea.cmp(&eb)
        .then_with(|| verrevcmp(ua, ub))
        .then_with(|| verrevcmp(ra, rb))
}

/// (epoch, upstream, revision) of a Debian version.
fn split_version(v: &str) -> (u64, &str, &str) {
    let v = v.trim();
    let (epoch, rest) = match v.split_once(':') {
        Some((e, r)) if !e.is_empty() && e.bytes().all(|c| c.is_ascii_digit()) => (e.parse().unwrap_or(u64::MAX), r),
        _ => (0, v),
    };
    match rest.rfind('-') {
        Some(i) => (epoch, &rest[..i], &rest[i + 1..]),
        None => (epoch, rest, ""),
    }
}

/// dpkg's `verrevcmp`.
fn verrevcmp(a: &str, b: &str) -> Ordering {
    fn order(c: Option<u8>) -> i32 {
        match c {
            None => 0,
            Some(c) if c.is_ascii_digit() => 0,
            Some(c) if c.is_ascii_alphabetic() => c as i32,
            Some(b'~') => -1,
            Some(c) => c as i32 + 256,
        }
    }
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let (mut i, mut j) = (0, 0);
    let digit = |s: &[u8], k: usize| s.get(k).is_some_and(u8::is_ascii_digit);
    while i < a.len() || j < b.len() {
        // The non-digit prefix, character by character.
        while (i < a.len() && !digit(a, i)) || (j < b.len() && !digit(b, j)) {
            let (ac, bc) = (order(a.get(i).copied()), order(b.get(j).copied()));
            if ac != bc {
                return ac.cmp(&bc);
            }
            i += 1;
            j += 1;
        }
        // The digit run, numerically.
        while a.get(i) == Some(&b'0') {
            i += 1;
        }
        while b.get(j) == Some(&b'0') {
            j += 1;
        }
        let mut first_diff = Ordering::Equal;
        while digit(a, i) && digit(b, j) {
            if first_diff == Ordering::Equal {
                first_diff = a[i].cmp(&b[j]);
            }
            i += 1;
            j += 1;
        }
        if digit(a, i) {
            return Ordering::Greater;
        }
        if digit(b, j) {
            return Ordering::Less;
        }
        if first_diff != Ordering::Equal {
            return first_diff;
        }
    }
    Ordering::Equal
}

/// The upstream part of a Debian version, without epoch and revision:
/// `1:565.57.01-0ubuntu0.22.04.4` → `565.57.01`, `1.30.0-1.1` → `1.30.0`.
pub fn upstream_version(v: &str) -> &str {
    split_version(v).1
}

/// The native dpkg architecture: that of `base-files` (or of `dpkg`) in the status
/// file, else the first line of `/var/lib/dpkg/arch`.
pub fn native_arch(status: &[DpkgPackage], arch_file: Option<&str>) -> Option<String> {
    let from_status = ["base-files", "dpkg"].iter().find_map(|want| {
        status
            .iter()
            .find(|p| p.name == *want && p.is_installed() && !p.arch.is_empty() && p.arch != "all")
            .map(|p| p.arch.clone())
    });
    from_status.or_else(|| {
        arch_file?
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .map(str::to_string)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::inspect::test_images;

    fn cmp(a: &str, b: &str) -> Ordering {
        dpkg_version_cmp(a, b)
    }

    #[test]
    fn dpkg_version_ordering() {
        use Ordering::*;
        assert_eq!(cmp("1.0~rc1", "1.0"), Less);
        assert_eq!(cmp("1.0~rc1", "1.0~rc2"), Less);
        assert_eq!(cmp("1.0~~", "1.0~"), Less);
        assert_eq!(cmp("1.0", "1.0+b1"), Less);
        assert_eq!(cmp("1.0a", "1.0+"), Less, "letters sort before other characters");
        assert_eq!(cmp("5.15.0-91", "5.15.0-9"), Greater);
        assert_eq!(cmp("5.15.0-100-generic", "5.15.0-91-generic"), Greater);
        assert_eq!(cmp("1:1.0", "2.0"), Greater, "epoch wins");
        assert_eq!(
            cmp("1:565.57.01-0ubuntu0.22.04.4", "565.57.01-0ubuntu0.22.04.4"),
            Greater
        );
        assert_eq!(cmp("0:1.0", "1.0"), Equal, "a missing epoch is 0");
        assert_eq!(cmp("1.0-0", "1.0"), Equal, "a missing revision is 0");
        assert_eq!(cmp("1.01", "1.1"), Equal, "digit runs compare numerically");
        assert_eq!(cmp("1.30.0-1.1", "1.30.0-1.2"), Less);
        assert_eq!(cmp("1.30.0-1.1", "1.29.9-9"), Greater);
        assert_eq!(cmp("2.8.7-2ubuntu2.2", "2.8.7-2ubuntu2"), Greater);
        assert_eq!(cmp("1.0-1~bpo1", "1.0-1"), Less);
    }

    #[test]
    fn upstream_versions() {
        assert_eq!(upstream_version("1:565.57.01-0ubuntu0.22.04.4"), "565.57.01");
        assert_eq!(upstream_version("1.30.0-1.1"), "1.30.0");
        assert_eq!(upstream_version("565.57.01"), "565.57.01");
        assert_eq!(
            upstream_version("2:1.2-3-4"),
            "1.2-3",
            "the revision is after the last hyphen"
        );
    }

    #[test]
    fn dpkg_status_parsing() {
        let pkgs = parse_dpkg_status(test_images::DPKG_STATUS);
        assert_eq!(pkgs.len(), 11);
        let base = &pkgs[0];
        assert_eq!(
            (base.name.as_str(), base.version.as_str(), base.arch.as_str()),
            ("base-files", "12ubuntu4.6", "amd64")
        );
        assert!(base.is_installed() && !base.is_held());
        assert!(
            base.fields["Description"].ends_with("\nseveral important miscellaneous files."),
            "{:?}",
            base.fields
        );
        let kubelet = pkgs.iter().find(|p| p.name == "kubelet").unwrap();
        assert!(kubelet.is_installed() && kubelet.is_held());
        assert_eq!(
            kubelet.fields["Depends"],
            "iptables (>= 1.4.21), kubernetes-cni (>= 1.2.0)"
        );
        let nv = pkgs.iter().find(|p| p.name == "nvidia-driver-565-server").unwrap();
        assert_eq!(nv.source.as_deref(), Some("nvidia-graphics-drivers-565-server"));
        let rc = pkgs.iter().find(|p| p.name == "linux-image-5.15.0-88-generic").unwrap();
        assert!(!rc.is_installed());
        assert_eq!(rc.want(), "deinstall");
        assert!(
            parse_dpkg_status("\n\nVersion: 1\n\n").is_empty(),
            "stanzas need a Package"
        );
    }
}
