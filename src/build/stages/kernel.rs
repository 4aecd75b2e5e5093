//! A stage's kernel pin (`kernel = "5.15.0-191-generic"`): the image keeps that one
//! kernel and boots it.
//!
//! Canonical's precompiled, signed NVIDIA modules (`linux-modules-nvidia-BRANCH-K`)
//! exist only for the kernels they were built for, so a definition that chooses them
//! fixes the kernel. The stage's package list installs `linux-image-K` and its modules;
//! once it has, every other kernel's packages are purged, which takes with them the meta
//! packages (`linux-image-virtual`, `linux-generic`, ...) that would pull a newer kernel
//! back in on the next upgrade. GRUB then has K alone to boot. The pin is made visible:
//! when the archive has a newer kernel of the same series and flavour, the build warns
//! (log, summary and `--json`) that the image's kernel is not the newest.

use crate::build::stages::apt::Apt;
use crate::image::dpkg::dpkg_version_cmp;
use anyhow::{Context, Result, bail};

/// `5.15.0-191-generic` → (`5.15.0`, `191`, `generic`).
fn split_release(k: &str) -> Option<(&str, &str, &str)> {
    let (series, rest) = k.split_once('-')?;
    let (abi, flavour) = rest.split_once('-')?;
    (!abi.is_empty() && abi.chars().all(|c| c.is_ascii_digit()) && !flavour.is_empty())
        .then_some((series, abi, flavour))
}

/// The kernel release a versioned kernel package is for: `linux-image-5.15.0-204-generic`
/// → `5.15.0-204-generic`; `None` for meta packages (`linux-image-virtual`) and others.
fn package_kernel(name: &str) -> Option<&str> {
    const PREFIXES: [&str; 6] = [
        "linux-image-unsigned-",
        "linux-image-",
        "linux-modules-extra-",
        "linux-modules-",
        "linux-headers-",
        "linux-tools-",
    ];
    let rest = PREFIXES.iter().find_map(|p| name.strip_prefix(p))?;
    rest.starts_with(|c: char| c.is_ascii_digit())
        .then_some(rest)
        .filter(|r| split_release(r).is_some())
}

/// The versioned kernel packages of `installed` that belong to another kernel than
/// `keep` (module packages of other kernels included: `linux-modules-nvidia-...-K'`).
fn other_kernel_packages<'a>(installed: impl Iterator<Item = &'a str>, keep: &str) -> Vec<String> {
    installed
        .filter(|n| {
            package_kernel(n).is_some_and(|k| k != keep)
                || n.strip_prefix("linux-modules-nvidia-")
                    .is_some_and(|r| !r.ends_with(&format!("-{keep}")) && r.contains(|c: char| c.is_ascii_digit()))
        })
        .map(str::to_string)
        .collect()
}

/// The newest kernel release the image's indexes offer in the series and flavour of
/// `kernel` (`linux-image-5.15.0-N-generic`), from `apt-cache pkgnames` output.
fn newest_in_series(pkgnames: &str, kernel: &str) -> Option<String> {
    let (series, _, flavour) = split_release(kernel)?;
    pkgnames
        .lines()
        .filter_map(|n| n.trim().strip_prefix("linux-image-"))
        .filter(|r| split_release(r).is_some_and(|(s, _, f)| s == series && f == flavour))
        .max_by(|a, b| dpkg_version_cmp(a, b))
        .map(str::to_string)
}

/// The warning a pinned kernel gets when the archive has a newer one.
pub fn pin_warning(kernel: &str, newest: Option<&str>) -> Option<String> {
    let newest = newest?;
    (dpkg_version_cmp(newest, kernel) == std::cmp::Ordering::Greater).then(|| {
        format!(
            "the image's kernel is pinned to {kernel} (the definition's `kernel`), not the newest available \
             {newest}: it gets no kernel updates past {kernel}"
        )
    })
}

/// Keep only `kernel` in the image (its packages are installed by now); returns the
/// warning when the archive has a newer kernel of its series.
pub fn pin(apt: &mut Apt, kernel: &str) -> Result<Option<String>> {
    let installed = apt
        .s
        .cmd("dpkg-query")
        .args(["-W", "-f", "${Package}\\t${db:Status-Status}\\n"])
        .run()
        .context("listing the image's packages")?
        .stdout_str();
    let names: Vec<&str> = installed
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .filter(|(_, st)| *st == "installed")
        .map(|(n, _)| n)
        .collect();
    if !names.contains(&format!("linux-image-{kernel}").as_str()) {
        bail!(
            "the stage pins kernel {kernel} but linux-image-{kernel} is not installed: add it to the stage's package list"
        );
    }
    let others = other_kernel_packages(names.iter().copied(), kernel);
    if !others.is_empty() {
        tracing::info!("kernel pinned to {kernel}: purging {}", others.join(" "));
        apt.purge(&others)
            .with_context(|| format!("removing the kernels other than the pinned {kernel}"))?;
    }
    let pkgnames = apt
        .s
        .cmd("apt-cache")
        .args(["pkgnames", "linux-image-"])
        .run()
        .context("apt-cache pkgnames linux-image-")?
        .stdout_str();
    let warning = pin_warning(kernel, newest_in_series(&pkgnames, kernel).as_deref());
    if let Some(w) = &warning {
        tracing::warn!("{w}");
    }
    Ok(warning)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn other_kernels_and_their_module_packages_are_found_metas_are_left_to_apt() {
        let installed = [
            "linux-base",
            "linux-image-virtual",
            "linux-image-5.15.0-204-generic",
            "linux-modules-5.15.0-204-generic",
            "linux-headers-5.15.0-204-generic",
            "linux-headers-5.15.0-204",
            "linux-image-5.15.0-191-generic",
            "linux-modules-5.15.0-191-generic",
            "linux-modules-nvidia-565-server-5.15.0-191-generic",
            "linux-modules-nvidia-565-server-5.15.0-204-generic",
            "linux-objects-nvidia-565-server-5.15.0-191-generic",
            "linux-signatures-nvidia-5.15.0-191-generic",
            "linux-firmware",
        ];
        assert_eq!(
            other_kernel_packages(installed.iter().copied(), "5.15.0-191-generic"),
            [
                "linux-image-5.15.0-204-generic",
                "linux-modules-5.15.0-204-generic",
                "linux-headers-5.15.0-204-generic",
                "linux-modules-nvidia-565-server-5.15.0-204-generic",
            ]
        );
    }

    #[test]
    fn the_newest_kernel_of_the_same_series_and_flavour_makes_the_warning() {
        let names = "linux-image-5.15.0-191-generic\nlinux-image-5.15.0-204-generic\nlinux-image-5.15.0-99-generic\n\
                     linux-image-6.8.0-138-generic\nlinux-image-5.15.0-1080-aws\nlinux-image-generic\n";
        let newest = newest_in_series(names, "5.15.0-191-generic");
        assert_eq!(newest.as_deref(), Some("5.15.0-204-generic"));
        let w = pin_warning("5.15.0-191-generic", newest.as_deref()).unwrap();
        assert!(
            w.contains("pinned to 5.15.0-191-generic") && w.contains("not the newest available 5.15.0-204-generic")
        );
        assert_eq!(pin_warning("5.15.0-204-generic", newest.as_deref()), None);
        assert_eq!(newest_in_series(names, "5.15.0-191-lowlatency"), None);
    }
}
