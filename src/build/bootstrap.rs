//! `kiln bootstrap`: a base root tarball made from the Ubuntu archive with mmdebstrap,
//! for machines that reach the archive but not the cloud-image host, and for sites that
//! build everything from the archive.
//!
//! The root has the package set of the server cloud image
//! (`package-lists/SUITE-cloudimg.list`) and what the cloud image's root looks like to a
//! build: `/etc/fstab` mounting `LABEL=cloudimg-rootfs` on `/`, no SSH host keys (each
//! instance makes its own), an empty `/etc/machine-id`. The archive mirror is the one
//! mmdebstrap knows for the suite name (Ubuntu's for Ubuntu suites, with -updates and
//! -security); no host is written here. `SOURCE_DATE_EPOCH`, when set, makes mmdebstrap
//! clamp timestamps for a reproducible tarball.

use crate::error::user;
use crate::host::cmd::Cmd;
use crate::user_bail;
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct BootstrapOpts {
    /// An Ubuntu suite (codename), e.g. `jammy`.
    pub suite: String,
    /// The tarball to write (`.tar`, `.tar.gz`, `.tar.xz`, `.tar.zst`: mmdebstrap picks
    /// the compression by the name).
    pub out: PathBuf,
    /// The package list (`package-lists/SUITE-cloudimg.list` if not given).
    pub package_list: Option<PathBuf>,
    /// The archive keyring (`keys/ubuntu-archive-keyring.gpg` if not given).
    pub keyring: Option<PathBuf>,
    /// Replace an existing output.
    pub force: bool,
}

/// The hooks that make the root look like the cloud image's to a build (run by
/// mmdebstrap with the root as `$1`).
const CUSTOMIZE_HOOKS: [&str; 3] = [
    r#"printf "LABEL=cloudimg-rootfs\t/\text4\tdefaults\t0 1\n" > "$1/etc/fstab""#,
    r#"rm -f "$1/etc/ssh/ssh_host_"*"#,
    r#": > "$1/etc/machine-id""#,
];

/// The components the cloud image's sources use.
const COMPONENTS: &str = "main,restricted,universe";

/// The mmdebstrap command line (without the output path), for the log and the tests.
pub fn mmdebstrap_args(suite: &str, keyring: &Path, include: &[String]) -> Vec<String> {
    let mut a = vec![
        "--variant=minbase".to_string(),
        "--mode=root".to_string(),
        "--architectures=amd64".to_string(),
        format!("--components={COMPONENTS}"),
        format!("--keyring={}", keyring.display()),
        "--aptopt=Acquire::Retries \"3\"".to_string(),
        "--dpkgopt=force-unsafe-io".to_string(),
        format!("--include={}", include.join(",")),
    ];
    for h in CUSTOMIZE_HOOKS {
        a.push(format!("--customize-hook={h}"));
    }
    a.push(suite.to_string());
    a
}

fn valid_suite(s: &str) -> bool {
    !s.is_empty()
        && s.len() < 32
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

/// Read the package list: names (or `name=version` pins) as apt takes them.
pub fn packages(list: &Path) -> Result<Vec<String>> {
    let specs = crate::definition::parse_package_list(list, &Default::default())?;
    let mut out = Vec::new();
    for s in specs {
        if s.pool.is_some() {
            user_bail!("{}: pool pins are not supported in a bootstrap package list", s.origin);
        }
        out.push(match s.version {
            Some(v) => format!("{}={v}", s.name),
            None => s.name,
        });
    }
    if out.is_empty() {
        user_bail!("package list {} lists no package", list.display());
    }
    Ok(out)
}

pub fn bootstrap(o: &BootstrapOpts) -> Result<()> {
    if !valid_suite(&o.suite) {
        user_bail!("--suite `{}` is not a suite codename (e.g. jammy)", o.suite);
    }
    if !nix::unistd::geteuid().is_root() {
        user_bail!(
            "kiln bootstrap must run as root (mmdebstrap --mode=root creates device nodes and chroots); run it with sudo"
        );
    }
    let list = o
        .package_list
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("package-lists/{}-cloudimg.list", o.suite)));
    if !list.is_file() {
        user_bail!(
            "package list {} not found; run kiln from the project root or pass --package-list FILE",
            list.display()
        );
    }
    let keyring = o
        .keyring
        .clone()
        .unwrap_or_else(|| PathBuf::from("keys/ubuntu-archive-keyring.gpg"));
    let keyring = keyring.canonicalize().map_err(|e| {
        user(format!(
            "archive keyring {}: {e}; pass --keyring FILE",
            keyring.display()
        ))
    })?;
    let include = packages(&list)?;
    if o.out.exists() && !o.force {
        user_bail!("{} already exists; pass --force to replace it", o.out.display());
    }
    let name = o
        .out
        .file_name()
        .ok_or_else(|| user(format!("--out {} names no file", o.out.display())))?
        .to_string_lossy()
        .into_owned();
    if !name.contains(".tar") {
        user_bail!(
            "--out {}: the name must end in .tar (or .tar.gz, .tar.xz, .tar.zst)",
            o.out.display()
        );
    }
    let dir = match o.out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    // Same directory and the same extension (mmdebstrap picks the format by it); renamed
    // into place only when mmdebstrap succeeded.
    let tmp = dir.join(format!(".kiln-bootstrap-{}-{name}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let epoch = match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(v) if !v.trim().is_empty() => {
            if v.trim().parse::<u64>().is_err() {
                user_bail!("SOURCE_DATE_EPOCH = `{v}` is not a number of seconds since 1970");
            }
            Some(v.trim().to_string())
        }
        _ => None,
    };
    tracing::info!(
        "bootstrapping {} ({} packages from {}) into {}{}",
        o.suite,
        include.len(),
        list.display(),
        o.out.display(),
        epoch
            .as_ref()
            .map(|e| format!(", SOURCE_DATE_EPOCH={e}"))
            .unwrap_or_default()
    );
    let started = std::time::Instant::now();
    let pb = crate::host::progress::spinner("mmdebstrap");
    let mut cmd = Cmd::new("mmdebstrap")
        .args(mmdebstrap_args(&o.suite, &keyring, &include))
        .arg(&tmp);
    if let Some(e) = &epoch {
        cmd = cmd.env("SOURCE_DATE_EPOCH", e);
    }
    let res = cmd.run();
    pb.finish_and_clear();
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        return Err(e.context(format!(
            "mmdebstrap could not make the {} root (is the Ubuntu archive reachable? is mmdebstrap installed?)",
            o.suite
        )));
    }
    std::fs::rename(&tmp, &o.out).with_context(|| format!("renaming {} to {}", tmp.display(), o.out.display()))?;
    let size = std::fs::metadata(&o.out).map(|m| m.len()).unwrap_or(0);
    println!(
        "bootstrapped {} ({}, {} packages requested) in {:.0} s",
        o.out.display(),
        crate::host::progress::human_size(size),
        include.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_list_parses_and_has_what_a_build_needs() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let p = packages(&root.join("package-lists/jammy-cloudimg.list")).unwrap();
        for need in [
            "linux-image-virtual",
            "grub-efi-amd64-signed",
            "shim-signed",
            "cloud-init",
            "openssh-server",
        ] {
            assert!(p.iter().any(|x| x == need), "{need} missing from {p:?}");
        }
        assert!(root.join("keys/ubuntu-archive-keyring.gpg").is_file());
    }

    #[test]
    fn command_line_has_no_mirror_and_the_cloud_image_hooks() {
        let a = mmdebstrap_args("jammy", Path::new("/k.gpg"), &["a".into(), "b".into()]);
        assert_eq!(a.last().unwrap(), "jammy");
        assert!(a.contains(&"--include=a,b".to_string()));
        assert!(a.iter().any(|x| x.contains("LABEL=cloudimg-rootfs")));
        assert!(a.iter().all(|x| !x.contains("http")), "{a:?}");
        assert!(!valid_suite("jammy http://x"));
        assert!(valid_suite("jammy"));
    }
}
