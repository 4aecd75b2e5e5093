//! Hooks: `hooks/NAME/NN-*.chroot` run inside the image (in the chroot session), and
//! `NN-*.host` run on the host with `KILN_ROOT` set to the image root; in name order.
//! A failing hook is named, with the last lines of its output.

use crate::build::stages::chroot::Session;
use crate::host::cmd::Cmd;
use crate::host::rootdir::RootDir;
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

/// The hooks of a directory, in order.
pub fn list(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading hook directory {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("chroot" | "host")))
        .collect();
    v.sort();
    Ok(v)
}

pub fn run_all(dir: &Path, session: &Session, rd: &RootDir) -> Result<()> {
    for hook in list(dir)? {
        let name = format!(
            "{}/{}",
            dir.file_name().unwrap().to_string_lossy(),
            hook.file_name().unwrap().to_string_lossy()
        );
        tracing::info!("hook {name}");
        let res = if hook.extension().unwrap() == "chroot" {
            // Copied into the image's /run (a tmpfs of the session) and run from there.
            let script = std::fs::read(&hook).with_context(|| format!("reading hook {}", hook.display()))?;
            rd.create_dir_all("/run/kiln/hooks", 0o700)?;
            let inside = format!("/run/kiln/hooks/{}", hook.file_name().unwrap().to_string_lossy());
            rd.write_file(&inside, &script, 0o755)?;
            let r = session.cmd(&inside).run();
            rd.remove_file(&inside).ok();
            r
        } else {
            // Host hooks write into the image with `$KILN root-write`, which resolves
            // paths inside KILN_ROOT (a symlink in the image can't send it to the host).
            let kiln = std::env::current_exe().unwrap_or_else(|_| "kiln".into());
            // In its own PID namespace, like chroot commands: whatever the hook starts
            // dies with it, even if kiln is SIGKILLed (nothing may keep kiln's mount
            // namespace, and so the image's loop device, alive).
            Cmd::new("unshare")
                .args(["--pid", "--fork", "--kill-child", "--"])
                .arg(&hook)
                .env("KILN_ROOT", session.root())
                .env("KILN", kiln)
                .current_dir(dir)
                .run()
        };
        res.with_context(|| format!("hook {name} failed"))?;
    }
    Ok(())
}
