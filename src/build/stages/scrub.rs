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

    // The host's names: cloud-init sets the host name at boot (and the 127.0.1.1 line
    // of /etc/hosts when it manages the file). The base's /etc/hostname holds whatever
    // machine made it (`vm`, the builder of a root tarball); /etc/mailname the same.
    scrub_host_names(rd)?;

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
    // ldconfig's auxiliary cache records the build's inode numbers and change times (the
    // one file whose content differed between two locked builds); ldconfig remakes it.
    remove_if_exists(rd, "/var/cache/ldconfig/aux-cache")?;
    if rd.exists("/var/lib/apt/lists")? {
        rd.create_dir_all("/var/lib/apt/lists/partial", 0o700)?;
    }

    // cloud-init state, so the image's first boot is cloud-init's first boot.
    empty_dir(rd, "/var/lib/cloud", &[])?;

    lock_passwords(rd)?;
    Ok(())
}

/// Empty /etc/hostname, drop /etc/mailname, and take the names they held and the build
/// host's own name out of /etc/hosts (with any 127.0.1.1-style own-name line).
fn scrub_host_names(rd: &RootDir) -> Result<()> {
    let mut names: Vec<String> = Vec::new();
    let mut add = |n: &str| {
        let n = n.trim();
        if !n.is_empty() && !is_loopback_name(n) && !names.iter().any(|x| x == n) {
            names.push(n.to_string());
            // The short name of a FQDN too.
            if let Some((short, _)) = n.split_once('.')
                && !short.is_empty()
                && !is_loopback_name(short)
            {
                names.push(short.to_string());
            }
        }
    };
    for f in ["/etc/hostname", "/etc/mailname"] {
        if rd.exists(f)? && rd.symlink_metadata(f)?.is_file() {
            add(&rd.read_to_string(f)?);
        }
    }
    if let Ok(h) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
        add(&h);
    }
    if rd.exists("/etc/hostname")? {
        let md = rd.symlink_metadata("/etc/hostname")?;
        if md.is_file() && !md.is_empty() {
            rd.write_file("/etc/hostname", b"", md.mode() & 0o7777)?;
        }
    }
    remove_if_exists(rd, "/etc/mailname")?;
    if rd.exists("/etc/hosts")? && rd.symlink_metadata("/etc/hosts")?.is_file() {
        let text = rd.read_to_string("/etc/hosts")?;
        let out = scrub_hosts(&text, &names);
        if out != text {
            tracing::info!("removed the build host's names from /etc/hosts");
            let md = rd.symlink_metadata("/etc/hosts")?;
            rd.write_file("/etc/hosts", out.as_bytes(), md.mode() & 0o7777)?;
        }
    }
    Ok(())
}

fn is_loopback_name(n: &str) -> bool {
    n.starts_with("localhost") || n.starts_with("ip6-")
}

/// Clamp the modification and access times of everything under `root` (the mounted
/// image root; symlinks are not followed, other filesystems not entered) to at most
/// `epoch`, as reproducible-builds.org's SOURCE_DATE_EPOCH asks: what the build wrote
/// carries the lock's time, not the clock's. Returns how many entries were changed.
pub fn clamp_mtimes(root: &std::path::Path, epoch: u64) -> Result<u64> {
    use nix::sys::stat::{UtimensatFlags, utimensat};
    use nix::sys::time::TimeSpec;
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::symlink_metadata(root)?.dev();
    let t = TimeSpec::new(epoch as i64, 0);
    let mut changed = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let entries = std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))?;
        for e in entries {
            let p = e?.path();
            let md = std::fs::symlink_metadata(&p)?;
            if md.dev() != dev {
                continue;
            }
            if md.is_dir() {
                stack.push(p.clone());
            }
            if md.mtime() > epoch as i64 || md.atime() > epoch as i64 {
                utimensat(nix::fcntl::AT_FDCWD, &p, &t, &t, UtimensatFlags::NoFollowSymlink)
                    .with_context(|| format!("clamping the times of {}", p.display()))?;
                changed += 1;
            }
        }
    }
    let md = std::fs::symlink_metadata(root)?;
    if md.mtime() > epoch as i64 {
        utimensat(nix::fcntl::AT_FDCWD, root, &t, &t, UtimensatFlags::NoFollowSymlink)?;
        changed += 1;
    }
    Ok(changed)
}

/// /etc/hosts without `names` (a line left with no name goes) and without own-name
/// lines (`127.0.1.1 host`: any 127.* address but 127.0.0.1).
pub fn scrub_hosts(text: &str, names: &[String]) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        let (body, comment) = match line.find('#') {
            Some(i) => (&line[..i], &line[i..]),
            None => (line, ""),
        };
        let w: Vec<&str> = body.split_whitespace().collect();
        if w.is_empty() {
            out.push_str(line);
            out.push('\n');
            continue;
        }
        if w[0].starts_with("127.") && w[0] != "127.0.0.1" {
            continue;
        }
        let kept: Vec<&str> = w[1..]
            .iter()
            .copied()
            .filter(|n| !names.iter().any(|x| x == n))
            .collect();
        if kept.len() == w.len() - 1 {
            out.push_str(line);
        } else if kept.is_empty() {
            continue;
        } else {
            out.push_str(&format!("{}\t{}", w[0], kept.join(" ")));
            if !comment.is_empty() {
                out.push(' ');
                out.push_str(comment);
            }
        }
        out.push('\n');
    }
    out
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
    fn hosts_scrubbing() {
        let hosts = "127.0.0.1 localhost\n127.0.1.1 vm.example vm\n10.0.0.5 vm db # lab\n\n# The following lines are desirable for IPv6 capable hosts\n::1 ip6-localhost ip6-loopback\n";
        let names = ["vm".to_string(), "vm.example".to_string()];
        assert_eq!(
            scrub_hosts(hosts, &names),
            "127.0.0.1 localhost\n10.0.0.5\tdb # lab\n\n# The following lines are desirable for IPv6 capable hosts\n::1 ip6-localhost ip6-loopback\n"
        );
        // The cloud image's file is left as it is.
        let cloud = "127.0.0.1 localhost\n\n::1 ip6-localhost ip6-loopback\nfe00::0 ip6-localnet\n";
        assert_eq!(scrub_hosts(cloud, &names), cloud);
        assert!(is_loopback_name("localhost.localdomain") && !is_loopback_name("vm"));
    }

    #[test]
    fn rotated_names() {
        assert!(is_rotated("syslog.1"));
        assert!(is_rotated("dpkg.log.2.gz"));
        assert!(!is_rotated("syslog"));
        assert!(!is_rotated("dpkg.log"));
    }
}
