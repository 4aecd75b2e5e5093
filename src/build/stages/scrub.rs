//! Cleanup (the spec's stage 7): leave no identity, secret or history in the image.
//!
//! Every write goes through [`RootDir`], so a symlink planted in the image (say
//! `/var/log/syslog -> /etc/shadow`) can't turn a truncate into damage on the host.

use crate::host::rootdir::RootDir;
use anyhow::{Context, Result};

/// Scrub the image root. Idempotent.
pub fn scrub(rd: &RootDir) -> Result<()> {
    // Identity: an empty (present, zero-byte) machine-id makes systemd generate a new
    // one on first boot and run first-boot units; the D-Bus copy must go.
    rd.write_file("/etc/machine-id", b"", 0o444)
        .context("emptying /etc/machine-id")?;
    remove_if_exists(rd, "/var/lib/dbus/machine-id")?;
    remove_if_exists(rd, "/var/lib/systemd/random-seed")?;
    remove_if_exists(rd, "/var/lib/systemd/credential.secret")?;

    // SSH host keys are regenerated on first boot (cloud-init / ssh's sshd-keygen).
    remove_matching(rd, "/etc/ssh", |n| n.starts_with("ssh_host_"))?;

    // Shell histories of every account.
    let mut homes = vec!["/root".to_string()];
    if rd.exists("/home")? {
        for n in rd.read_dir("/home")? {
            homes.push(format!("/home/{n}"));
        }
    }
    for h in homes {
        for f in [
            ".bash_history",
            ".python_history",
            ".lesshst",
            ".viminfo",
            ".wget-hsts",
            ".sudo_as_admin_successful",
        ] {
            remove_if_exists(rd, &format!("{h}/{f}"))?;
        }
    }

    // Logs: truncate live logs (services expect their files), drop rotated ones and
    // the journal.
    truncate_logs(rd, "/var/log")?;
    if rd.exists("/var/log/journal")? {
        for n in rd.read_dir("/var/log/journal")? {
            rd.remove_dir_all(format!("/var/log/journal/{n}"))?;
        }
    }

    // Temporary files, apt lists and caches.
    for dir in ["/tmp", "/var/tmp", "/var/lib/apt/lists", "/var/cache/apt/archives"] {
        empty_dir(rd, dir, &["partial", "lock"])?;
    }
    remove_matching(rd, "/var/cache/apt", |n| n.ends_with(".bin"))?;
    if rd.exists("/var/lib/apt/lists")? {
        rd.create_dir_all("/var/lib/apt/lists/partial", 0o700)?;
    }

    // cloud-init state, so the image's first boot is cloud-init's first boot.
    empty_dir(rd, "/var/lib/cloud", &[])?;

    lock_passwords(rd)?;
    Ok(())
}

fn remove_if_exists(rd: &RootDir, path: &str) -> Result<()> {
    if rd.exists(path)? {
        rd.remove_file(path)?;
    }
    Ok(())
}

fn remove_matching(rd: &RootDir, dir: &str, pred: impl Fn(&str) -> bool) -> Result<()> {
    if !rd.exists(dir)? {
        return Ok(());
    }
    for n in rd.read_dir(dir)? {
        if pred(&n) {
            rd.remove_file(format!("{dir}/{n}"))?;
        }
    }
    Ok(())
}

/// Remove everything in `dir` except the names in `keep`.
fn empty_dir(rd: &RootDir, dir: &str, keep: &[&str]) -> Result<()> {
    if !rd.exists(dir)? {
        return Ok(());
    }
    for n in rd.read_dir(dir)? {
        if keep.contains(&n.as_str()) {
            continue;
        }
        let p = format!("{dir}/{n}");
        if rd.symlink_metadata(&p)?.is_dir() {
            rd.remove_dir_all(&p)?;
        } else {
            rd.remove_file(&p)?;
        }
    }
    Ok(())
}

fn is_rotated(name: &str) -> bool {
    name.ends_with(".gz")
        || name.ends_with(".xz")
        || name.ends_with(".old")
        || name
            .rsplit('.')
            .next()
            .is_some_and(|ext| !ext.is_empty() && ext.chars().all(|c| c.is_ascii_digit()))
}

fn truncate_logs(rd: &RootDir, dir: &str) -> Result<()> {
    if !rd.exists(dir)? {
        return Ok(());
    }
    for n in rd.read_dir(dir)? {
        let p = format!("{dir}/{n}");
        let md = rd.symlink_metadata(&p)?;
        if md.is_dir() {
            if p != "/var/log/journal" {
                truncate_logs(rd, &p)?;
            }
        } else if md.is_file() {
            if is_rotated(&n) || n.starts_with("cloud-init") {
                rd.remove_file(&p)?;
            } else if !md.is_empty() {
                rd.truncate(&p)?;
            }
        }
    }
    Ok(())
}

/// No account may log in with a password: real hashes and empty fields become `*`
/// (login by key only); `!`/`*` entries stay as they are.
fn lock_passwords(rd: &RootDir) -> Result<()> {
    if !rd.exists("/etc/shadow")? {
        return Ok(());
    }
    let text = rd.read_to_string("/etc/shadow")?;
    let (out, changed) = lock_shadow(&text);
    if changed > 0 {
        tracing::info!("locked the password of {changed} account(s)");
        let md = rd.symlink_metadata("/etc/shadow")?;
        rd.write_file("/etc/shadow", out.as_bytes(), md.mode() & 0o7777)?;
        // Ubuntu's shadow is root:shadow; keep its owner.
        rd.set_owner("/etc/shadow", md.uid(), md.gid())?;
    }
    Ok(())
}

pub fn lock_shadow(text: &str) -> (String, usize) {
    let mut changed = 0;
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        let mut f: Vec<&str> = line.split(':').collect();
        if f.len() >= 2 && !(f[1].starts_with('!') || f[1].starts_with('*')) {
            f[1] = "*";
            changed += 1;
        }
        out.push_str(&f.join(":"));
        out.push('\n');
    }
    (out, changed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shadow_locking() {
        let (out, n) = lock_shadow(
            "root:$6$abc$def:19000:0:99999:7:::\ndaemon:*:19000:0:99999:7:::\nubuntu::19000::::::\nsys:!:1::::::\n",
        );
        assert_eq!(n, 2);
        assert_eq!(
            out,
            "root:*:19000:0:99999:7:::\ndaemon:*:19000:0:99999:7:::\nubuntu:*:19000::::::\nsys:!:1::::::\n"
        );
    }

    #[test]
    fn rotated_names() {
        assert!(is_rotated("syslog.1"));
        assert!(is_rotated("dpkg.log.2.gz"));
        assert!(!is_rotated("syslog"));
        assert!(!is_rotated("dpkg.log"));
    }
}
