//! The bootloader of an image assembled from a root tarball: what an Ubuntu cloud image
//! has, made from the image's own packages (shim-signed, grub-efi-amd64-signed,
//! grub-pc-bin, grub2-common), so that it boots through UEFI and through a legacy BIOS.
//!
//! - **/boot/grub/grub.cfg** is written by the image's own `update-grub`, with a kiln
//!   drop-in (`/etc/default/grub.d/50-kiln-console.cfg`) putting the kernel and GRUB on
//!   the serial console. Two things keep grub-mkconfig from doing that right on a
//!   build host, and both are fixed by giving `update-grub` its own small /dev (a tmpfs
//!   over the session's bind of the host's /dev):
//!   the root is mounted from a loop device backed by a file, and Debian's
//!   `/etc/grub.d/10_linux` *silently writes no menu entry at all* for `/dev/loop[0-9]`
//!   ("We can't cope with devices loop-mounted from files here"); and root=UUID= is only
//!   used when `/dev/disk/by-uuid/UUID` exists, which needs udev (build hosts and
//!   containers have none), else it writes `root=/dev/loopN`. In the private /dev the
//!   mount source `/dev/loopN` is a symlink to a node `/dev/kiln-root` (grub-probe
//!   canonicalises the mount source, so GRUB_DEVICE becomes `/dev/kiln-root`) and
//!   `/dev/disk/by-uuid/UUID` points at it. The result is checked: every `linux` line
//!   must say `root=UUID=<root fs UUID>` (or `root=LABEL=`), never a /dev path, and the
//!   image's newest kernel must have an entry; otherwise the build fails.
//! - **UEFI**: shim (`/usr/lib/shim/shimx64.efi.signed`, the alternatives-managed link,
//!   read inside the image root), the signed monolithic GRUB and MokManager go to the
//!   ESP as `EFI/BOOT/BOOTX64.EFI` + `EFI/BOOT/grubx64.efi` (removable-media path, what
//!   firmware without boot entries starts) and `EFI/ubuntu/{shimx64,grubx64,mmx64}.efi`.
//!   The signed GRUB's built-in prefix is `/EFI/ubuntu`, so `EFI/ubuntu/grub.cfg` is a
//!   stub that finds the root filesystem by UUID and loads its /boot/grub/grub.cfg, as
//!   on Ubuntu's images. fbx64.efi is left out: with it shim would first create a boot
//!   entry and reset. Written with fatfs (the build host may have no vfat driver).
//! - **BIOS**: `grub-install --target=i386-pc` in the chroot against a loop device over
//!   the whole image file. GRUB reads the GPT itself (the host kernel needs no partition
//!   support), embeds core.img in the BIOS boot partition (14) and writes boot.img's
//!   code into the protective MBR; grub-bios-setup keeps the MBR's disk signature and
//!   partition table. The root filesystem it probes is on a loop device of its own
//!   with no partition table, so grub-install would leave `part_gpt` out of core.img and
//!   GRUB could not find its root at boot ("no such device: UUID"): `--modules=part_gpt`
//!   puts it in. core.img finds /boot/grub by the root filesystem's UUID (grub-install's
//!   load.cfg: the root is on another "disk" than the one installed to). Building
//!   core.img by hand with grub-mkimage and patching boot.img would duplicate
//!   grub-bios-setup (blocklists, boot-drive workaround) for no gain. Afterwards kiln
//!   checks that bytes 440..512 of the MBR and the GPT are unchanged and that the boot
//!   code points at partition 14.
//!
//! Images made from a cloud disk keep their own bootloader; `disk::gpt::grow` keeps the MBR
//! boot code and the BIOS boot partition where they are.

use crate::build::stages::chroot::Session;
use crate::build::timings::Timings;
use crate::disk::gpt::Layout;
use crate::host::loopdev::Loop;
use crate::host::mounts::MountStack;
use crate::host::rootdir::{NodeKind, RootDir};
use anyhow::{Context, Result, bail};
use nix::mount::MsFlags;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

/// kiln's GRUB settings drop-in (sourced by grub-mkconfig after /etc/default/grub).
pub const CONSOLE_DROPIN: &str = "/etc/default/grub.d/50-kiln-console.cfg";

/// The kernel command line kiln's images boot with: the VGA console and the first
/// serial port, as on Ubuntu's cloud images.
pub const CMDLINE: &str = "console=tty1 console=ttyS0,115200n8";

const SHIM_CANDIDATES: [&str; 2] = [
    "/usr/lib/shim/shimx64.efi.signed",
    "/usr/lib/shim/shimx64.efi.signed.latest",
];
const SIGNED_GRUB: &str = "/usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed";
const MOKMANAGER: &str = "/usr/lib/shim/mmx64.efi";
const BOOT_IMG: &str = "/usr/lib/grub/i386-pc/boot.img";
const DISKBOOT_IMG: &str = "/usr/lib/grub/i386-pc/diskboot.img";

/// Where the private /dev's node for the root filesystem's device is called.
const ROOT_NODE: &str = "kiln-root";

fn dropin() -> String {
    format!(
        "# kiln: GRUB and the kernel on the serial console as well as the screen, a short menu.\n\
         GRUB_CMDLINE_LINUX_DEFAULT=\"{CMDLINE}\"\n\
         GRUB_TERMINAL=\"console serial\"\n\
         GRUB_SERIAL_COMMAND=\"serial --unit=0 --speed=115200 --word=8 --parity=no --stop=1\"\n\
         GRUB_TIMEOUT_STYLE=menu\n\
         GRUB_TIMEOUT=1\n\
         GRUB_RECORDFAIL_TIMEOUT=1\n\
         GRUB_DISABLE_OS_PROBER=true\n"
    )
}

/// Install the bootloader into the image being built from a root tarball.
///
/// `image` is the image file, `layout` its partitions, `root_dev` the loop device the
/// root filesystem is mounted from, at `root` (opened as `rd`). Needs the root mounted
/// read-write; runs its own chroot session.
pub fn install(
    image: &Path,
    layout: &Layout,
    root_dev: &Path,
    root: &Path,
    rd: &RootDir,
    mounts: &mut MountStack,
    timings: &mut Timings,
) -> Result<()> {
    crate::build::boundary(timings, "bootloader")?;
    let esp = layout.esp().context("the disk has no EFI System Partition")?;
    let bios = layout.bios_boot().context("the disk has no BIOS boot partition")?;
    let root_part = layout.root().context("the disk has no root partition")?;

    // What the image must provide, checked before anything is changed.
    let shim = read_first(rd, &SHIM_CANDIDATES, "shim-signed")?;
    let grub_efi = read_first(rd, &[SIGNED_GRUB], "grub-efi-amd64-signed")?;
    let mm = if rd.exists(MOKMANAGER)? {
        Some(rd.read(MOKMANAGER)?)
    } else {
        None
    };
    let boot_img = read_first(rd, &[BOOT_IMG], "grub-pc-bin")?;
    let diskboot_img = read_first(rd, &[DISKBOOT_IMG], "grub-pc-bin")?;
    for (tool, pkg) in [
        ("/usr/sbin/grub-install", "grub2-common"),
        ("/usr/sbin/update-grub", "grub2-common"),
        ("/usr/sbin/grub-probe", "grub-common"),
    ] {
        if !rd.exists(tool)? {
            crate::user_bail!(
                "the root tarball has no {tool} (package {pkg}); kiln installs the bootloader with the image's own GRUB tools"
            );
        }
    }
    let kernels = crate::image::kernels::bootable_kernels(rd)?;
    let newest = kernels
        .first()
        .context("the image has no kernel (no /boot/vmlinuz-* with a /lib/modules directory) to boot")?
        .clone();

    let uuid = crate::disk::probe::ext_uuid(image, root_part.offset_bytes())?;
    tracing::info!("root filesystem UUID {uuid}; kernel {newest}");

    rd.create_dir_all("/etc/default/grub.d", 0o755)?;
    rd.write_file(CONSOLE_DROPIN, dropin().as_bytes(), 0o644)?;

    let mbr_before = read_at(image, 0, 512)?;
    let layout_before = format!("{:?}", crate::disk::gpt::read_layout(image)?);

    let session = Session::enter(root, rd, mounts)?;
    let res = (|| -> Result<()> {
        bios_install(&session, image)?;
        private_dev(root, rd, mounts, root_dev, &uuid)?;
        session
            .cmd("update-grub")
            .run()
            .context("generating /boot/grub/grub.cfg with the image's update-grub")?;
        Ok(())
    })();
    let closed = session.close(rd, mounts);
    res?;
    closed?;

    // The BIOS boot code: in the MBR's first 440 bytes only, pointing at partition 14.
    let mbr = read_at(image, 0, 512)?;
    if mbr[440..] != mbr_before[440..] {
        bail!(
            "grub-install changed the disk signature or the protective MBR's partition table of {}",
            image.display()
        );
    }
    if format!("{:?}", crate::disk::gpt::read_layout(image)?) != layout_before {
        bail!("grub-install changed the GPT of {}", image.display());
    }
    check_bios_boot(
        &mbr,
        &boot_img,
        &read_at(image, bios.offset_bytes(), 512)?,
        &diskboot_img,
        bios.offset_bytes() / 512,
    )?;

    let cfg = rd.read_to_string("/boot/grub/grub.cfg")?;
    check_grub_cfg(&cfg, &uuid, &newest)?;

    // UEFI: shim, signed GRUB and the stub config on the ESP.
    let stub = esp_grub_cfg(&uuid);
    let mut files: Vec<(&str, &[u8])> = vec![
        ("EFI/BOOT/BOOTX64.EFI", &shim),
        ("EFI/BOOT/grubx64.efi", &grub_efi),
        ("EFI/ubuntu/shimx64.efi", &shim),
        ("EFI/ubuntu/grubx64.efi", &grub_efi),
        ("EFI/ubuntu/grub.cfg", stub.as_bytes()),
    ];
    if let Some(mm) = &mm {
        files.push(("EFI/BOOT/mmx64.efi", mm));
        files.push(("EFI/ubuntu/mmx64.efi", mm));
    }
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(image)
        .with_context(|| format!("opening {}", image.display()))?;
    crate::disk::fat::write_files(&f, esp.offset_bytes(), esp.size_bytes(), &files)
        .context("writing shim and GRUB to the ESP")?;
    let back = crate::disk::fat::read_file(&f, esp.offset_bytes(), esp.size_bytes(), "EFI/ubuntu/grub.cfg")?;
    if back != stub.as_bytes() {
        bail!("EFI/ubuntu/grub.cfg on the ESP reads back different from what was written");
    }
    tracing::info!(
        "bootloader: BIOS core image in partition {}, shim + signed GRUB on the ESP (partition {}), grub.cfg for {newest}",
        bios.number,
        esp.number
    );
    Ok(())
}

/// GRUB's config on the ESP: the signed GRUB looks for it under its prefix /EFI/ubuntu.
pub fn esp_grub_cfg(uuid: &str) -> String {
    format!("search.fs_uuid {uuid} root\nset prefix=($root)'/boot/grub'\nconfigfile $prefix/grub.cfg\n")
}

fn read_first(rd: &RootDir, paths: &[&str], package: &str) -> Result<Vec<u8>> {
    for p in paths {
        if rd.exists(p)? {
            return rd.read(p);
        }
    }
    crate::user_bail!(
        "the root tarball has no {} (package {package}); an image from a root tarball needs it to boot",
        paths[0]
    )
}

fn read_at(path: &Path, offset: u64, len: usize) -> Result<Vec<u8>> {
    let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, offset)
        .with_context(|| format!("reading {} at {offset}", path.display()))?;
    Ok(buf)
}

/// grub-install against a loop device over the whole image file.
fn bios_install(session: &Session, image: &Path) -> Result<()> {
    let len = std::fs::metadata(image)?.len();
    let disk = Loop::attach(image, 0, len, false)?;
    let out = session
        .cmd("grub-install")
        .args(["--target=i386-pc", "--boot-directory=/boot", "--modules=part_gpt"])
        .arg(disk.path())
        .run()
        .with_context(|| {
            format!(
                "installing GRUB for BIOS boot on {} (whole image {})",
                disk.path().display(),
                image.display()
            )
        });
    // Closing the last user of the loop device writes its cached blocks to the file.
    let closed = disk.close();
    out?;
    closed
}

/// Mount a tmpfs over the session's /dev with just what update-grub needs, so that the
/// root's device is not a /dev/loopN and has a /dev/disk/by-uuid link (see the module
/// documentation). Released with the session.
fn private_dev(root: &Path, rd: &RootDir, mounts: &mut MountStack, root_dev: &Path, uuid: &str) -> Result<()> {
    let rdev = std::fs::metadata(root_dev)
        .with_context(|| format!("reading {}", root_dev.display()))?
        .rdev();
    let dev_of_root = std::fs::metadata(root)
        .with_context(|| format!("reading {}", root.display()))?
        .dev();
    if rdev != dev_of_root {
        bail!(
            "{} is not the device {} is mounted from",
            root_dev.display(),
            root.display()
        );
    }
    let loop_name = root_dev
        .file_name()
        .and_then(|n| n.to_str())
        .filter(|n| n.starts_with("loop"))
        .with_context(|| format!("{} is not a /dev/loopN device", root_dev.display()))?
        .to_string();
    mounts.mount(
        "tmpfs",
        &root.join("dev"),
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("mode=755"),
    )?;
    let mk = |name: &str, major: u64, minor: u64| {
        rd.mknod(
            format!("/dev/{name}"),
            NodeKind::Char,
            0o666,
            nix::sys::stat::makedev(major, minor),
        )
    };
    mk("null", 1, 3)?;
    mk("zero", 1, 5)?;
    mk("full", 1, 7)?;
    mk("random", 1, 8)?;
    mk("urandom", 1, 9)?;
    rd.mknod(format!("/dev/{ROOT_NODE}"), NodeKind::Block, 0o600, rdev)?;
    rd.symlink(ROOT_NODE, format!("/dev/{loop_name}"))?;
    rd.create_dir_all("/dev/disk/by-uuid", 0o755)?;
    rd.symlink(format!("../../{ROOT_NODE}"), format!("/dev/disk/by-uuid/{uuid}"))?;
    for (name, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        rd.symlink(target, format!("/dev/{name}"))?;
    }
    Ok(())
}

/// The MBR holds boot.img's code aimed at the first sector of partition 14, which holds
/// diskboot.img (the start of core.img).
fn check_bios_boot(mbr: &[u8], boot_img: &[u8], p14: &[u8], diskboot_img: &[u8], p14_lba: u64) -> Result<()> {
    // boot.img: BPB 0x03..0x5a (copied from the disk), kernel sector at 0x5c, boot drive
    // at 0x64, the drive check at 0x66 (patched for hard disks); code from 0x68 on.
    if boot_img.len() != 512 || mbr[0x68..440] != boot_img[0x68..440] || mbr[..2] != boot_img[..2] {
        bail!("the MBR does not hold GRUB's boot code after grub-install");
    }
    let sector = u64::from_le_bytes(mbr[0x5c..0x64].try_into().unwrap());
    if sector != p14_lba {
        bail!("GRUB's boot code in the MBR loads sector {sector}, not the BIOS boot partition at {p14_lba}");
    }
    if diskboot_img.len() < 256 || p14[..256] != diskboot_img[..256] {
        bail!("the BIOS boot partition does not start with GRUB's core image");
    }
    Ok(())
}

/// The generated grub.cfg boots the newest kernel with the root found by UUID or label,
/// on the serial console.
pub fn check_grub_cfg(cfg: &str, uuid: &str, newest: &str) -> Result<()> {
    let linux: Vec<&str> = cfg
        .lines()
        .map(str::trim_start)
        .filter(|l| l.starts_with("linux\t") || l.starts_with("linux "))
        .collect();
    if linux.is_empty() {
        bail!("update-grub wrote a /boot/grub/grub.cfg without any kernel entry");
    }
    if !linux.iter().any(|l| l.contains(&format!("/boot/vmlinuz-{newest} "))) {
        bail!("/boot/grub/grub.cfg has no entry for the image's newest kernel {newest}");
    }
    for l in &linux {
        let root = l.split_whitespace().find_map(|w| w.strip_prefix("root=")).unwrap_or("");
        let ok = root == format!("UUID={uuid}") || root.starts_with("LABEL=");
        if !ok {
            bail!(
                "/boot/grub/grub.cfg boots with root={root} instead of root=UUID={uuid}: the image would not find its root filesystem on another machine ({})",
                l.trim()
            );
        }
    }
    if !linux.iter().any(|l| l.contains("console=ttyS0")) {
        bail!("/boot/grub/grub.cfg has no serial console (console=ttyS0) on the kernel command line");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const UUID: &str = "35b69dff-f68b-46ee-8819-5fb8112f6bd5";

    #[test]
    fn grub_cfg_root_by_uuid() {
        let good = format!(
            "menuentry 'Ubuntu' {{\n\tsearch --no-floppy --fs-uuid --set=root {UUID}\n\tlinux\t/boot/vmlinuz-5.15.0-204-generic root=UUID={UUID} ro  {CMDLINE}\n\tinitrd\t/boot/initrd.img-5.15.0-204-generic\n}}\n"
        );
        check_grub_cfg(&good, UUID, "5.15.0-204-generic").unwrap();
        let loopdev = good.replace(&format!("root=UUID={UUID}"), "root=/dev/loop3");
        let e = check_grub_cfg(&loopdev, UUID, "5.15.0-204-generic")
            .unwrap_err()
            .to_string();
        assert!(e.contains("root=/dev/loop3"), "{e}");
        assert!(
            check_grub_cfg(&good, UUID, "5.15.0-999-generic").is_err(),
            "newest kernel missing"
        );
        assert!(check_grub_cfg("### END /etc/grub.d/10_linux ###\n", UUID, "5.15.0-204-generic").is_err());
        let label = good.replace(&format!("root=UUID={UUID}"), "root=LABEL=cloudimg-rootfs");
        check_grub_cfg(&label, UUID, "5.15.0-204-generic").unwrap();
        let other = good.replace(
            &format!("root=UUID={UUID}"),
            "root=UUID=00000000-0000-0000-0000-000000000000",
        );
        assert!(check_grub_cfg(&other, UUID, "5.15.0-204-generic").is_err());
    }

    #[test]
    fn esp_stub() {
        assert_eq!(
            esp_grub_cfg(UUID),
            format!("search.fs_uuid {UUID} root\nset prefix=($root)'/boot/grub'\nconfigfile $prefix/grub.cfg\n")
        );
    }
}
