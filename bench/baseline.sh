#!/usr/bin/env bash
# The benchmark's baseline (issue 6): the image build "by hand", without Packer and
# without kiln. It does the steps kiln does for a root-tarball base, with losetup,
# mount, chroot and apt-get, reading the same data files (images/NAME.toml with its
# `extends`, package-lists/, overlays/, hooks/, keys/):
#
#   sparse raw of disk_size → GPT cloud layout (sgdisk) → one loop device per partition
#   → mkfs (FAT32 ESP, ext4 root) → untar the base → fstab → chroot mounts → for each
#   stage: repositories, apt-get update, full-upgrade, install (pins, pool pins), kernel
#   headers, holds, overlays, hooks, module check → update-initramfs → bootloader (BIOS
#   GRUB, grub.cfg, shim + signed GRUB on the ESP) → scrub → fstrim → unmount → e2fsck
#   → sha256sum into SHA256SUMS.
#
# Usage: bench/baseline.sh IMAGE_NAME BASE_TARBALL OUTDIR
#   IMAGE_NAME    a definition in images/ (ubuntu-2204-gpu-ready-nodriver, ...)
#   BASE_TARBALL  Ubuntu's root tarball (.tar, .tar.xz, .tar.gz)
#   OUTDIR        gets NAME.raw (sparse) and SHA256SUMS
# Environment:
#   KILN_CACHE_DIR  the package cache shared with kiln (default /var/cache/kiln): its
#                   apt-archives/ is bind-mounted on the image's /var/cache/apt/archives
#   REPO_OVERRIDES  whitespace-separated ID=URI[,key=PATH], kiln's --repo-override
#                   syntax: a file:// URI is bind-mounted into the chroot for the build;
#                   the image keeps the definition's repository.
#
# What it deliberately does NOT do, unlike kiln (the differences the benchmark
# measures): dpkg keeps its default safe I/O (an fsync per unpacked file; kiln uses
# force-unsafe-io and syncs the image once at the end); initramfs-tools and man-db
# triggers run whenever dpkg fires them (kiln defers update-initramfs to one run at
# the end and switches man-db's auto-update off during the build); MAKEFLAGS is not set
# (DKMS uses its own default parallelism); no API payload JSON is written. Like any
# hand-written script, it trusts the base: host-side writes into the image root follow
# the image's symlinks (kiln resolves every path inside the root with openat2).
set -euo pipefail
export LC_ALL=C
# dotglob: directory listings include dot files, as kiln's do.
shopt -s nullglob dotglob

die() {
  echo "baseline: error: $*" >&2
  exit 1
}
if [[ $# -ne 3 ]]; then
  echo "usage: $0 IMAGE_NAME BASE_TARBALL OUTDIR" >&2
  exit 2
fi
[[ $EUID -eq 0 ]] || die "must run as root (loop devices, mounts, chroot)"

# Run in a private mount namespace: a bind of the host's (shared) /dev would otherwise
# carry the chroot's devpts mount over to the host's /dev/pts, and every mount made here
# disappears with the namespace even if this script is killed.
if [[ ${BASELINE_PRIVATE_NS:-} != 1 ]]; then
  exec unshare --mount --propagation private env BASELINE_PRIVATE_NS=1 bash "${BASH_SOURCE[0]}" "$@"
fi

image=$1
base=$(realpath -e "$2") || die "base $2 not found"
mkdir -p "$3"
outdir=$(realpath -e "$3")
project=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
def=$project/images/$image.toml
[[ -f $def ]] || die "no image definition $def"
cache=${KILN_CACHE_DIR:-/var/cache/kiln}
archives=$cache/apt-archives

for tool in python3 losetup sgdisk mkfs.ext4 mkfs.vfat mke2fs e2fsck tune2fs fstrim tar chroot unshare sha256sum mmd mcopy; do
  command -v "$tool" >/dev/null || die "$tool not found (mmd/mcopy: apt-get install mtools)"
done

# --- Stage timings (printed at the end, to compare with kiln's --timings table) -------
declare -a t_names=() t_secs=()
t_cur="" t_start=0 t0=$EPOCHREALTIME
begin() {
  end_stage
  t_cur=$1 t_start=$EPOCHREALTIME
  printf '==> [%s] %s\n' "$(date +%T)" "$1"
}
end_stage() {
  [[ -n $t_cur ]] || return 0
  t_names+=("$t_cur")
  t_secs+=("$(awk -v a="$t_start" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }')")
  t_cur=""
}

# --- The image definition: TOML with `extends` and `before`, as kiln reads it ---------
def_name="" disk_size=0 bootloader=1
declare -A repo_uri=() repo_suite=() repo_components=() repo_key=()
declare -a subst_from=() subst_to=() stages=() st_full_upgrade=() st_kernel_headers=() st_repos=() st_lists=() \
  st_hold=() st_overlays=() st_hooks=() st_modules=()
read -r -d '' resolve_def <<'PY' || true
import os, re, shlex, sys, tomllib

path = os.path.realpath(sys.argv[1])
chain, p = [], path
while True:
    with open(p, "rb") as f:
        chain.append((p, tomllib.load(f)))
    parent = chain[-1][1].get("extends")
    if not parent:
        break
    p = os.path.join(os.path.dirname(p), parent)
    if len(chain) > 8 or any(q == p for q, _ in chain):
        sys.exit(f"{path}: `extends` forms a cycle at {parent}")

# Parameters (their defaults: the baseline builds the default variant): `${NAME}` is the
# value, `${NAME.FIELD}` a field of its table, in every string and package list.
params = {}
for _, d in reversed(chain):
    for pname, pt in d.get("parameters", {}).items():
        cur = params.setdefault(pname, {"default": None, "values": {}})
        cur["default"] = pt.get("default", cur["default"])
        for v, fields in pt.get("values", {}).items():
            cur["values"].setdefault(v, {}).update(fields)
subst = {}
for pname, pt in params.items():
    v = str(pt["default"])
    subst["${" + pname + "}"] = v
    for k, fv in pt["values"].get(v, {}).items():
        subst["${" + pname + "." + k + "}"] = str(fv)

def apply(x):
    if isinstance(x, str):
        for k, v in subst.items():
            x = x.replace(k, v)
        return x
    if isinstance(x, list):
        return [apply(y) for y in x]
    if isinstance(x, dict):
        return {k: apply(y) for k, y in x.items()}
    return x

chain = [(f, apply({k: v for k, v in d.items() if k != "parameters"})) for f, d in chain]
name = disk_size = bootloader = None
repos, stages = [], []
for file, d in reversed(chain):  # from the root ancestor down
    name = d.get("name", name)
    disk_size = d.get("disk_size", disk_size)
    bootloader = d.get("bootloader", bootloader)
    for r in d.get("repository", []):
        repos = [x for x in repos if x["id"] != r["id"]] + [r]
    for s in d.get("stage", []):
        names = [x["name"] for x in stages]
        if s["name"] in names:
            stages[names.index(s["name"])] = s
        elif "before" in s:
            if s["before"] not in names:
                sys.exit(f"{file}: stage {s['name']} has before = {s['before']!r}, no such stage")
            stages.insert(names.index(s["before"]), s)
        else:
            stages.append(s)

m = re.fullmatch(r"(\d+)\s*([A-Za-z]*)", str(disk_size or "").strip())
units = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "KIB": 1 << 10, "M": 1 << 20, "MB": 1 << 20,
         "MIB": 1 << 20, "G": 1 << 30, "GB": 1 << 30, "GIB": 1 << 30, "T": 1 << 40, "TB": 1 << 40, "TIB": 1 << 40}
if not m or m.group(2).upper() not in units:
    sys.exit(f"{path}: bad or missing disk_size {disk_size!r}")
size = int(m.group(1)) * units[m.group(2).upper()]
if size < 1 << 30 or size % (1 << 20):
    sys.exit(f"{path}: disk_size {disk_size!r} is not at least 1G in whole MiB")

q = shlex.quote
words = lambda xs: q(" ".join(xs))
print("subst_from=(" + " ".join(q(k) for k in subst) + ")")
print("subst_to=(" + " ".join(q(v) for v in subst.values()) + ")")
print(f"def_name={q(name)}")
print(f"disk_size={size}")
print(f"bootloader={0 if bootloader is False else 1}")
for r in repos:
    i = q(r["id"])
    print(f"repo_uri[{i}]={q(r['uri'])}; repo_suite[{i}]={q(r['suite'])}; "
          f"repo_components[{i}]={words(r.get('components', []))}; repo_key[{i}]={q(r['key'])}")
print("stages=(" + " ".join(q(s["name"]) for s in stages) + ")")
for n, s in enumerate(stages):
    print(f"st_full_upgrade[{n}]={int(bool(s.get('full_upgrade')))}; "
          f"st_kernel_headers[{n}]={int(bool(s.get('kernel_headers')))}; "
          f"st_repos[{n}]={words(s.get('repositories', []))}; st_lists[{n}]={words(s.get('packages', []))}; "
          f"st_hold[{n}]={words(s.get('hold', []))}; st_overlays[{n}]={words(s.get('overlays', []))}; "
          f"st_hooks[{n}]={words(s.get('hooks', []))}; st_modules[{n}]={words(s.get('require_modules', []))}")
PY
plan=$(python3 -c "$resolve_def" "$def") || die "cannot read $def"
eval "$plan"
for n in "${!stages[@]}"; do
  for o in ${st_overlays[n]}; do [[ -d $project/overlays/$o ]] || die "overlay $o not found"; done
  for h in ${st_hooks[n]}; do [[ -d $project/hooks/$h ]] || die "hooks $h not found"; done
done

# --- Repository overrides (kiln's --repo-override ID=URI[,key=PATH]) ------------------
declare -A ov_uri=() ov_key=()
read -r -a ov_items <<<"${REPO_OVERRIDES:-}"
for item in "${ov_items[@]}"; do
  id=${item%%=*} rest=${item#*=}
  [[ $item == *=* && -n $id && -n ${rest%%,*} ]] || die "REPO_OVERRIDES: $item: expected ID=URI[,key=PATH]"
  [[ -n ${repo_uri[$id]+x} ]] || die "REPO_OVERRIDES: $def has no repository $id (it has: ${!repo_uri[*]})"
  ov_uri[$id]=${rest%%,*}
  if [[ $rest == *,* ]]; then
    opt=${rest#*,}
    [[ $opt == key=* ]] || die "REPO_OVERRIDES: $item: unknown option $opt (expected key=PATH)"
    ov_key[$id]=${opt#key=}
    [[ -f ${ov_key[$id]} ]] || die "REPO_OVERRIDES: key ${ov_key[$id]} not found"
  fi
  if [[ ${ov_uri[$id]} == file://* && ! -d ${ov_uri[$id]#file://} ]]; then
    die "REPO_OVERRIDES: ${ov_uri[$id]#file://} is not a directory"
  fi
done

# --- Loop devices and mounts, released in reverse order on any exit -------------------
declare -a loops=() mounted=()
raw=$outdir/$def_name.raw
work=$outdir/.baseline-work-$def_name
root=$work/root

cleanup() {
  local rc=$? i stage=${t_cur:-start}
  set +e
  end_stage
  for ((i = ${#mounted[@]} - 1; i >= 0; i--)); do
    umount "${mounted[i]}" 2>/dev/null || umount -l "${mounted[i]}"
  done
  for ((i = ${#loops[@]} - 1; i >= 0; i--)); do
    losetup -d "${loops[i]}"
  done
  ((rc == 0)) || echo "baseline: FAILED (exit $rc) in stage $stage" >&2
  # Never delete through a mount that is still there (the chroot's /dev is the host's).
  if ! grep -qF " $work/" /proc/self/mounts; then rm -rf --one-file-system "$work"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

mnt() { # mount ARGS... TARGET: mount and remember TARGET
  mount "$@"
  mounted+=("${@: -1}")
}
unmount_to() { # unmount everything mounted after the first $1 mounts
  while ((${#mounted[@]} > $1)); do
    umount "${mounted[-1]}"
    unset 'mounted[-1]'
  done
}
attach() { # attach OFFSET SIZE: a loop device over that byte range of the raw → $REPLY
  REPLY=$(losetup --find --show --offset "$1" --sizelimit "$2" "$raw")
  loops+=("$REPLY")
}
detach() {
  local i
  losetup -d "$1"
  for i in "${!loops[@]}"; do [[ ${loops[i]} == "$1" ]] && unset 'loops[i]'; done
  loops=("${loops[@]}")
}
part_range() { # sgdisk's view of partition N → part_off, part_size (bytes)
  local info first last
  info=$(sgdisk -i "$1" "$raw")
  first=$(awk '/^First sector:/ { print $3 }' <<<"$info")
  last=$(awk '/^Last sector:/ { print $3 }' <<<"$info")
  part_off=$((first * 512)) part_size=$(((last - first + 1) * 512))
}
in_chroot() {
  env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
    LC_ALL=C.UTF-8 LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive DEBCONF_NONINTERACTIVE_SEEN=true \
    TERM=dumb chroot "$root" "$@"
}

# --- Disk: sparse raw, the cloud image's GPT layout, filesystems -----------------------
begin disk
rm -rf --one-file-system "$work"
mkdir -p "$root"
rm -f "$raw" "$outdir/SHA256SUMS"
truncate -s "$disk_size" "$raw"
# Ubuntu's cloud layout: 14 BIOS boot (1 MiB, 4 MiB), 15 ESP (106 MiB), 1 root (the rest).
sgdisk -n 14:2048:+4M -t 14:EF02 -n 15:0:+106M -t 15:EF00 -n 1:0:0 -t 1:8300 "$raw" >/dev/null
# This kernel has no GPT partition support (no loopNpM): one loop device per partition.
# --sizelimit matters: without it mkfs.ext4 would run to the end of the file and
# overwrite the backup GPT.
part_range 15
attach "$part_off" "$part_size"
esp_dev=$REPLY
part_range 1
attach "$part_off" "$part_size"
root_dev=$REPLY
mkfs.vfat -F 32 -n UEFI "$esp_dev" >/dev/null
# Jammy's e2fsck and GRUB 2.06 can't read orphan_file or metadata_csum_seed, which newer
# e2fsprogs turn on; no lazy inode-table init (it would otherwise run on first boot).
features=^metadata_csum_seed
e2fsprogs=$(mke2fs -V 2>&1 | awk 'NR == 1 { print $2 }')
if [[ $(printf '%s\n' 1.47 "$e2fsprogs" | sort -V | head -n 1) == 1.47 ]]; then
  features+=,^orphan_file # known from e2fsprogs 1.47 on
fi
mkfs.ext4 -q -F -L cloudimg-rootfs -O "$features" -E lazy_itable_init=0,lazy_journal_init=0,discard "$root_dev"
mnt -t ext4 "$root_dev" "$root"

begin unpack
tar --numeric-owner --xattrs --xattrs-include='*' -xpf "$base" -C "$root"
mkdir -p "$root/boot/efi"
printf 'LABEL=cloudimg-rootfs\t/\text4\tdiscard,errors=remount-ro\t0 1\nLABEL=UEFI\t/boot/efi\tvfat\tumask=0077\t0 1\n' >"$root/etc/fstab"

# --- The chroot: proc, sys, dev, dev/pts, a fresh /run with the host's resolver --------
begin chroot-setup
root_depth=${#mounted[@]} # just the root filesystem
mkdir -p "$root"/{proc,sys,dev,run,tmp}
mnt -t proc -o nosuid,nodev,noexec proc "$root/proc"
mnt -t sysfs -o ro,nosuid,nodev,noexec sysfs "$root/sys"
mnt --bind /dev "$root/dev"
mnt -t devpts -o newinstance,ptmxmode=0666,mode=620,gid=5,nosuid,noexec devpts "$root/dev/pts"
mnt -t tmpfs -o mode=755,nosuid,nodev tmpfs "$root/run"
# Ubuntu's /etc/resolv.conf is a symlink to ../run/systemd/resolve/stub-resolv.conf.
mkdir -p "$root/run/systemd/resolve"
cp /etc/resolv.conf "$root/run/systemd/resolve/stub-resolv.conf"
cp /etc/resolv.conf "$root/run/systemd/resolve/resolv.conf"
# No service may start during the build.
policy=$root/usr/sbin/policy-rc.d
saved_policy=""
if [[ -e $policy ]]; then
  saved_policy=$work/policy-rc.d.orig
  cp -a "$policy" "$saved_policy"
fi
printf '#!/bin/sh\nexit 101\n' >"$policy"
chmod 755 "$policy"

# --- apt: the warm cache kiln uses, local repositories, plain settings -----------------
stage_uses_apt() {
  local n=$1
  ((st_full_upgrade[n] || st_kernel_headers[n])) || [[ -n ${st_lists[n]}${st_repos[n]}${st_hold[n]} ]]
}
uses_apt=0
for n in "${!stages[@]}"; do
  if stage_uses_apt "$n"; then uses_apt=1; fi
done
apt_conf=$root/etc/apt/apt.conf.d/99baseline-build
if ((uses_apt)); then
  mkdir -p "$archives/partial" "$root/var/cache/apt/archives"
  mnt --bind "$archives" "$root/var/cache/apt/archives"
  for id in "${!ov_uri[@]}"; do
    if [[ ${ov_uri[$id]} == file://* ]]; then
      mkdir -p "$root/run/kiln/repos/$id"
      mnt --bind "${ov_uri[$id]#file://}" "$root/run/kiln/repos/$id"
    fi
  done
  # The same package selection as kiln (no recommends, keep config files, keep the
  # downloaded .debs in the shared cache); none of kiln's speed settings.
  cat >"$apt_conf" <<'EOF'
Acquire::Retries "3";
APT::Install-Recommends "false";
APT::Install-Suggests "false";
Dpkg::Use-Pty "0";
Dpkg::Options { "--force-confdef"; "--force-confold"; };
APT::Keep-Downloaded-Packages "true";
EOF
fi

declare -a configured=()
write_repo() { # ID URI KEYFILE
  local id=$1 uri=$2 key=$3 ext=gpg
  if [[ $(head -c 10 "$key") == -----BEGIN ]]; then ext=asc; fi
  mkdir -p "$root/etc/apt/keyrings"
  rm -f "$root/etc/apt/keyrings/$id.asc" "$root/etc/apt/keyrings/$id.gpg"
  install -m 644 "$key" "$root/etc/apt/keyrings/$id.$ext"
  echo "deb [signed-by=/etc/apt/keyrings/$id.$ext] $uri ${repo_suite[$id]} ${repo_components[$id]}" |
    sed 's/ *$//' >"$root/etc/apt/sources.list.d/$id.list"
}
add_repository() {
  local id=$1 uri key c
  for c in "${configured[@]}"; do [[ $c == "$id" ]] && return 0; done
  uri=${repo_uri[$id]} key=$project/${repo_key[$id]}
  if [[ -n ${ov_uri[$id]+x} ]]; then
    uri=${ov_uri[$id]}
    [[ $uri == file://* ]] && uri=file:///run/kiln/repos/$id
    key=${ov_key[$id]:-$key}
    echo "repository $id: using ${ov_uri[$id]} for this build (image keeps ${repo_uri[$id]})"
  fi
  write_repo "$id" "$uri" "$key"
  configured+=("$id")
}
apt_update() {
  local log=$work/apt-update.log
  in_chroot apt-get -q update 2>&1 | tee "$log"
  # apt only warns about an index it could not fetch; fail instead.
  if grep -Eq '^(Err:|W: Failed to fetch|E: )' "$log"; then
    die "apt-get update could not fetch every index"
  fi
}
archive_mirror() { # the image's own archive mirror (first deb line for its codename)
  local codename
  codename=$(sed -n 's/^VERSION_CODENAME=//p' "$root/etc/os-release" | tr -d '"')
  mirror=""
  if [[ -f $root/etc/apt/sources.list ]]; then
    mirror=$(awk -v c="$codename" '$1 == "deb" {
        i = 2
        if ($2 ~ /^\[/) { while (i <= NF && $i !~ /\]$/) i++; i++ }
        if ($(i + 1) == c) { print $i; exit }
      }' "$root/etc/apt/sources.list")
  fi
  if [[ -z $mirror ]]; then
    local f
    for f in "$root"/etc/apt/sources.list.d/*.sources; do
      mirror=$(awk -v c="$codename" 'BEGIN { RS = "" } {
          u = ""; s = ""; n = split($0, L, "\n")
          for (j = 1; j <= n; j++) {
            if (L[j] ~ /^URIs:/) { u = L[j]; sub(/^URIs:[ \t]*/, "", u); split(u, U, /[ \t]+/); u = U[1] }
            if (L[j] ~ /^Suites:/) s = " " L[j] " "
          }
          if (u != "" && index(s, " " c " ")) { print u; exit }
        }' "$f")
      [[ -n $mirror ]] && break
    done
  fi
  [[ -n $mirror ]] || die "the image's apt sources have no deb line for $codename (needed for pool pins)"
}
fetch_pool() { # NAME VERSION POOLPATH SHA256 → $REPLY, the .deb's path inside the image
  local file=${3##*/} got=""
  if [[ -f $archives/$file ]]; then got=$(sha256sum <"$archives/$file" | cut -d' ' -f1); fi
  if [[ $got != "$4" ]]; then
    [[ -n ${mirror:-} ]] || archive_mirror
    echo "fetching pinned $1=$2 from ${mirror%/}/$3"
    in_chroot /usr/lib/apt/apt-helper download-file "${mirror%/}/$3" "/var/cache/apt/archives/$file" "SHA256:$4" ||
      { rm -f "$archives/$file"; die "$1=$2: could not fetch ${mirror%/}/$3 with sha256 $4"; }
  fi
  REPLY=/var/cache/apt/archives/$file
}

declare -a pk_name=() pk_ver=() pk_pool=() pk_sha=()
read_lists() { # LIST... → pk_* arrays (package-lists/NAME.list: name, name=version, pool pins)
  local l file line first w pool sha i
  local -a words
  pk_name=() pk_ver=() pk_pool=() pk_sha=()
  for l in "$@"; do
    file=$project/package-lists/$l.list
    [[ -f $file ]] || die "package list $file not found"
    while IFS= read -r line || [[ -n $line ]]; do
      line=${line%%#*}
      for i in "${!subst_from[@]}"; do line=${line//"${subst_from[i]}"/"${subst_to[i]}"}; done
      read -r -a words <<<"$line"
      ((${#words[@]})) || continue
      first=${words[0]} pool="" sha=""
      for w in "${words[@]:1}"; do
        case $w in
          pool=*) pool=${w#pool=} pool=${pool#/} ;;
          sha256=*) sha=${w#sha256=} sha=${sha,,} ;;
          *) die "$file: unknown field $w" ;;
        esac
      done
      [[ -z $pool || ($first == *=* && ${#sha} -eq 64) ]] || die "$file: $first: a pool pin needs name=version and sha256"
      pk_name+=("${first%%=*}")
      if [[ $first == *=* ]]; then pk_ver+=("${first#*=}"); else pk_ver+=(""); fi
      pk_pool+=("$pool")
      pk_sha+=("$sha")
    done <"$file"
  done
}

image_kernels() { # → kernels: /boot/vmlinuz-K with /lib/modules/K, newest first
  local f k
  kernels=()
  for f in "$root"/boot/vmlinuz-*; do
    k=${f##*/vmlinuz-}
    if in_chroot test -d "/lib/modules/$k"; then kernels+=("$k"); fi
  done
  if ((${#kernels[@]})); then mapfile -t kernels < <(printf '%s\n' "${kernels[@]}" | sort -rV); fi
}

pins_file=$root/etc/apt/preferences.d/kiln-pins
run_stage() {
  local n=$1 id i k o h f m attempt vm repos_changed=0 needs_apt=0
  local -a args=() hold=() pins=() modules=() missing=() entries=()
  if stage_uses_apt "$n"; then
    for id in ${st_repos[n]}; do
      add_repository "$id"
      repos_changed=1
    done
    if ((st_full_upgrade[n] || st_kernel_headers[n])) || [[ -n ${st_lists[n]} ]]; then needs_apt=1; fi
    if ((needs_apt && (!updated || repos_changed))); then
      apt_update
      updated=1
    fi
    if ((st_full_upgrade[n])); then in_chroot apt-get -y -q full-upgrade; fi
    # shellcheck disable=SC2086 # list names are words
    read_lists ${st_lists[n]}
    for i in "${!pk_name[@]}"; do
      if [[ -n ${pk_pool[i]} ]]; then
        fetch_pool "${pk_name[i]}" "${pk_ver[i]}" "${pk_pool[i]}" "${pk_sha[i]}"
        args+=("$REPLY")
      fi
    done
    for i in "${!pk_name[@]}"; do
      if [[ -z ${pk_pool[i]} ]]; then args+=("${pk_name[i]}${pk_ver[i]:+=${pk_ver[i]}}"); fi
      if [[ -n ${pk_ver[i]} ]]; then pins+=("$i"); fi
    done
    if ((${#args[@]})); then in_chroot apt-get -y -q install "${args[@]}"; fi
    if ((st_kernel_headers[n])); then
      image_kernels
      ((${#kernels[@]})) || die "the image has no kernel (/boot/vmlinuz-* with /lib/modules)"
      echo "kernel headers for ${kernels[*]}"
      in_chroot apt-get -y -q install "${kernels[@]/#/linux-headers-}"
    fi
    # Holds: the stage's, plus every package pinned to a version (preferred over newer).
    read -r -a hold <<<"${st_hold[n]}"
    if ((${#pins[@]})); then
      [[ -s $pins_file ]] || echo "# Pinned versions of the image definition (written by bench/baseline.sh)." >"$pins_file"
      for i in "${pins[@]}"; do
        printf '\nPackage: %s\nPin: version %s\nPin-Priority: 1001\n' "${pk_name[i]}" "${pk_ver[i]}" >>"$pins_file"
        [[ " ${hold[*]} " == *" ${pk_name[i]} "* ]] || hold+=("${pk_name[i]}")
      done
    fi
    if ((${#hold[@]})); then in_chroot apt-mark hold "${hold[@]}"; fi
  fi
  # Overlays (files owned by root, modes kept), then hooks in name order.
  for o in ${st_overlays[n]}; do
    echo "overlay $o"
    entries=("$project/overlays/$o"/*)
    if ((${#entries[@]})); then cp -a --no-preserve=ownership "${entries[@]}" "$root/"; fi
  done
  for h in ${st_hooks[n]}; do
    for f in "$project/hooks/$h"/*; do
      case $f in
        *.chroot)
          echo "hook $h/${f##*/}"
          install -d -m 700 "$root/run/kiln/hooks"
          install -m 755 "$f" "$root/run/kiln/hooks/${f##*/}"
          in_chroot "/run/kiln/hooks/${f##*/}"
          rm -f "$root/run/kiln/hooks/${f##*/}"
          ;;
        *.host)
          echo "hook $h/${f##*/} (host)"
          (cd "$project/hooks/$h" && KILN_ROOT=$root "$f")
          ;;
      esac
    done
  done
  # Required kernel modules, built by DKMS for every image kernel.
  read -r -a modules <<<"${st_modules[n]}"
  if ((${#modules[@]})); then
    image_kernels
    for k in "${kernels[@]}"; do
      for attempt in 1 2; do
        missing=()
        for m in "${modules[@]}"; do
          vm=$(in_chroot modinfo -k "$k" -F vermagic "$m" 2>/dev/null | awk '{ print $1; exit }') || vm=""
          [[ $vm == "$k" ]] || missing+=("$m")
        done
        ((${#missing[@]})) || break
        ((attempt == 1)) || die "kernel $k has no usable ${missing[*]} after DKMS"
        echo "kernel $k lacks ${missing[*]}: dkms autoinstall"
        in_chroot dkms autoinstall -k "$k"
      done
      echo "kernel $k: ${modules[*]} present"
    done
  fi
}

# --- The stages, in the definition's order ---------------------------------------------
updated=0
for n in "${!stages[@]}"; do
  begin "${stages[n]}"
  run_stage "$n"
done

# Back to the definition's repositories and keys; apt's build settings go; the
# initramfs is regenerated for every kernel (the overlays changed modprobe.d).
begin initramfs
for id in "${configured[@]}"; do
  write_repo "$id" "${repo_uri[$id]}" "$project/${repo_key[$id]}"
done
rm -f "$apt_conf"
if [[ -x $root/usr/sbin/update-initramfs ]]; then in_chroot update-initramfs -u -k all; fi

# --- Bootloader: BIOS GRUB in partition 14, grub.cfg, shim + signed GRUB on the ESP ----
if ((bootloader)); then
  begin bootloader
  uuid=$(tune2fs -l "$root_dev" | sed -n 's/^Filesystem UUID:[[:space:]]*//p')
  image_kernels
  ((${#kernels[@]})) || die "the image has no kernel to boot"
  mkdir -p "$root/etc/default/grub.d"
  cat >"$root/etc/default/grub.d/50-kiln-console.cfg" <<'EOF'
# kiln: GRUB and the kernel on the serial console as well as the screen, a short menu.
GRUB_CMDLINE_LINUX_DEFAULT="console=tty1 console=ttyS0,115200n8"
GRUB_TERMINAL="console serial"
GRUB_SERIAL_COMMAND="serial --unit=0 --speed=115200 --word=8 --parity=no --stop=1"
GRUB_TIMEOUT_STYLE=menu
GRUB_TIMEOUT=1
GRUB_RECORDFAIL_TIMEOUT=1
GRUB_DISABLE_OS_PROBER=true
EOF
  # BIOS: grub-install against a loop device over the whole image (GRUB reads the GPT
  # itself); part_gpt must be in core.img since the root's own device has no table.
  attach 0 "$(stat -c %s "$raw")"
  disk_dev=$REPLY
  in_chroot grub-install --target=i386-pc --boot-directory=/boot --modules=part_gpt "$disk_dev"
  detach "$disk_dev"
  # grub.cfg: 10_linux writes no entry at all for a root on /dev/loopN and root=UUID=
  # only when /dev/disk/by-uuid/UUID exists (no udev here), so update-grub gets a small
  # private /dev where the root's device has another name and a by-uuid link.
  dev_depth=${#mounted[@]}
  mnt -t tmpfs -o mode=755,nosuid,noexec tmpfs "$root/dev"
  mknod -m 666 "$root/dev/null" c 1 3
  mknod -m 666 "$root/dev/zero" c 1 5
  mknod -m 666 "$root/dev/full" c 1 7
  mknod -m 666 "$root/dev/random" c 1 8
  mknod -m 666 "$root/dev/urandom" c 1 9
  read -r maj min < <(stat -c '%t %T' "$root_dev")
  mknod -m 600 "$root/dev/root-disk" b "$((16#$maj))" "$((16#$min))"
  ln -s root-disk "$root/dev/${root_dev#/dev/}"
  mkdir -p "$root/dev/disk/by-uuid"
  ln -s ../../root-disk "$root/dev/disk/by-uuid/$uuid"
  ln -s /proc/self/fd "$root/dev/fd"
  ln -s /proc/self/fd/0 "$root/dev/stdin"
  ln -s /proc/self/fd/1 "$root/dev/stdout"
  ln -s /proc/self/fd/2 "$root/dev/stderr"
  in_chroot update-grub
  unmount_to "$dev_depth"
  grep -Eq "^[[:space:]]*linux[[:space:]].*/boot/vmlinuz-${kernels[0]} .*root=UUID=$uuid" "$root/boot/grub/grub.cfg" ||
    die "/boot/grub/grub.cfg has no entry for ${kernels[0]} with root=UUID=$uuid"
  # UEFI: shim, the signed GRUB and MokManager on the ESP (removable-media path and
  # EFI/ubuntu), with a stub grub.cfg that loads /boot/grub/grub.cfg by UUID. Written with
  # mtools: this host kernel has no vfat driver.
  esp=$work/esp
  mkdir -p "$esp"
  for f in /usr/lib/shim/shimx64.efi.signed /usr/lib/shim/shimx64.efi.signed.latest ""; do
    [[ -n $f ]] || die "the image has no shim (shim-signed)"
    if in_chroot test -e "$f"; then in_chroot cat "$f" >"$esp/shimx64.efi" && break; fi
  done
  in_chroot cat /usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed >"$esp/grubx64.efi"
  printf "search.fs_uuid %s root\nset prefix=(\$root)'/boot/grub'\nconfigfile \$prefix/grub.cfg\n" "$uuid" >"$esp/grub.cfg"
  export MTOOLS_SKIP_CHECK=1
  mmd -i "$esp_dev" ::/EFI ::/EFI/BOOT ::/EFI/ubuntu
  mcopy -i "$esp_dev" "$esp/shimx64.efi" ::/EFI/BOOT/BOOTX64.EFI
  mcopy -i "$esp_dev" "$esp/grubx64.efi" ::/EFI/BOOT/grubx64.efi
  mcopy -i "$esp_dev" "$esp/shimx64.efi" ::/EFI/ubuntu/shimx64.efi
  mcopy -i "$esp_dev" "$esp/grubx64.efi" ::/EFI/ubuntu/grubx64.efi
  mcopy -i "$esp_dev" "$esp/grub.cfg" ::/EFI/ubuntu/grub.cfg
  if in_chroot test -e /usr/lib/shim/mmx64.efi; then
    in_chroot cat /usr/lib/shim/mmx64.efi >"$esp/mmx64.efi"
    mcopy -i "$esp_dev" "$esp/mmx64.efi" ::/EFI/BOOT/mmx64.efi
    mcopy -i "$esp_dev" "$esp/mmx64.efi" ::/EFI/ubuntu/mmx64.efi
  fi
fi

# --- Leave the chroot: policy-rc.d goes, every mount but the root is released ---------
begin chroot-teardown
if [[ -n $saved_policy ]]; then cp -a "$saved_policy" "$policy"; else rm -f "$policy"; fi
unmount_to "$root_depth"

# --- Scrub: no identity, secret, history, log or cache in the image ---------------------
begin scrub
: >"$root/etc/machine-id"
chmod 444 "$root/etc/machine-id"
rm -f "$root/var/lib/dbus/machine-id" "$root/var/lib/systemd/random-seed" "$root/var/lib/systemd/credential.secret"
rm -f "$root"/etc/ssh/ssh_host_*
for home in "$root/root" "$root"/home/*; do
  [[ -d $home ]] || continue
  rm -f "$home"/{.bash_history,.python_history,.lesshst,.viminfo,.wget-hsts,.sudo_as_admin_successful}
done
if [[ -d $root/var/log ]]; then
  # Rotated logs and cloud-init's go, live logs are truncated, the journal is emptied.
  find "$root/var/log" -regextype posix-extended -path "$root/var/log/journal" -prune -o -type f \
    \( -name '*.gz' -o -name '*.xz' -o -name '*.old' -o -name 'cloud-init*' -o -regex '.*\.[0-9]+' \) \
    -print0 | xargs -0 -r rm -f
  find "$root/var/log" -path "$root/var/log/journal" -prune -o -type f -size +0 -print0 | xargs -0 -r truncate -s 0
  if [[ -d $root/var/log/journal ]]; then find "$root/var/log/journal" -mindepth 1 -maxdepth 1 -exec rm -rf {} +; fi
fi
for d in tmp var/tmp var/lib/apt/lists var/cache/apt/archives; do
  if [[ -d $root/$d ]]; then
    find "$root/$d" -mindepth 1 -maxdepth 1 ! -name partial ! -name lock -exec rm -rf {} +
  fi
done
rm -f "$root"/var/cache/apt/*.bin
if [[ -d $root/var/lib/apt/lists ]]; then install -d -m 700 "$root/var/lib/apt/lists/partial"; fi
if [[ -d $root/var/lib/cloud ]]; then find "$root/var/lib/cloud" -mindepth 1 -maxdepth 1 -exec rm -rf {} +; fi
# No account keeps a usable password.
if [[ -f $root/etc/shadow ]]; then
  awk -F: -v OFS=: 'NF >= 2 && $2 !~ /^[!*]/ { $2 = "*" } { print }' "$root/etc/shadow" >"$work/shadow"
  cat "$work/shadow" >"$root/etc/shadow"
fi

# --- Trim, unmount, check, detach, checksum ---------------------------------------------
begin trim
fstrim "$root"
unmount_to 0
e2fsck -f -n "$root_dev"
detach "$root_dev"
detach "$esp_dev"
sync "$raw"

begin checksum
(cd "$outdir" && sha256sum "$def_name.raw" >SHA256SUMS)
end_stage

echo "built $raw ($(du -h "$raw" | cut -f1) allocated of $(du -h --apparent-size "$raw" | cut -f1))"
cat "$outdir/SHA256SUMS"
printf '%-24s %9s\n' stage wall
for i in "${!t_names[@]}"; do printf '%-24s %8ss\n' "${t_names[i]}" "${t_secs[i]}"; done
printf '%-24s %8ss\n' total "$(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }')"
