#!/usr/bin/env bash
# Locked, offline rebuilds (issue 11), one command:
#   sudo bench/locked.sh --base ROOT.tar [IMAGE...]
#
# For each image (default: both seed images), in a scratch copy of the project (a lock
# made against the tests' stand-in repositories must never land in images/):
#  1. `kiln lock` (the Kubernetes and NVIDIA container-toolkit repositories are the tests'
#     signed stand-ins, via --repo-override, as this machine cannot reach the real ones);
#  2. `kiln fetch --archive` into an empty directory: size and time;
#  3. a normal build and two `kiln build --locked --offline --archive` builds, each in a
#     network namespace with no network, side by side in this one invocation;
#  4. `kiln diff --json` of the two locked builds: the paths that still differ.
# Prints a table and writes it, with each diff, to BENCH_OUT (default target/bench/locked).
# Uses KILN_CACHE_DIR (default /var/cache/kiln) and KILN_TEST_CACHE (the stand-ins).
set -euo pipefail
export LC_ALL=C
die() { echo "bench/locked: error: $*" >&2; exit 1; }
say() { printf '\n==> [%s] %s\n' "$(date +%T)" "$*" >&2; }

base=
images=()
while (($#)); do
  case $1 in
    --base) base=${2:-}; shift 2 ;;
    -h | --help) sed -n '2,15p' "$0"; exit 0 ;;
    *) images+=("$1"); shift ;;
  esac
done
[[ -n $base && -f $base ]] || die "--base ROOT.tar: a root tarball (kiln bootstrap --suite jammy)"
[[ $EUID -eq 0 ]] || die "run as root (loop devices, mounts, chroot)"
((${#images[@]})) || images=(ubuntu-2204-gpu-ready-nodriver ubuntu-2204-nvidia-565-firmware1)

project=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=${BENCH_OUT:-$project/target/bench/locked}
tcache=${KILN_TEST_CACHE:-/var/cache/kiln-tests}
export KILN_CACHE_DIR=${KILN_CACHE_DIR:-/var/cache/kiln}
kiln=$project/target/release/kiln
base=$(realpath "$base")
standin=$(ls -d "$tcache"/standin-* 2>/dev/null | head -1)
[[ -f $standin/kubernetes/InRelease ]] || die "no stand-in repositories in $tcache (run the tests once)"
ov=()
for id in kubernetes nvidia-container-toolkit; do
  ov+=(--repo-override "$id=file://$standin/$id,key=$standin/$id/standin.asc")
done

(cd "$project" && cargo build --release -q)
rm -rf "$out" && mkdir -p "$out"
scratch=$out/project
mkdir -p "$scratch"
cp -a "$project"/{images,package-lists,overlays,hooks,keys} "$scratch/"

# seconds LOGFILE CMD...: run, log, print the wall time.
seconds() {
  local log=$1 t0 t1
  shift
  t0=$(date +%s.%N)
  "$@" >"$log" 2>&1 || { tail -30 "$log" >&2; die "failed: $* (log: $log)"; }
  t1=$(date +%s.%N)
  echo "$t1 - $t0" | bc
}

table=$out/results.md
{
  echo "| image | lock | fetch | archive | normal build | locked offline 1 | locked offline 2 | paths differing |"
  echo "|---|---:|---:|---:|---:|---:|---:|---:|"
} >"$table"
for name in "${images[@]}"; do
  def=$scratch/images/$name.toml
  [[ -f $def ]] || die "no definition $def"
  say "$name: lock"
  t_lock=$(seconds "$out/$name.lock.log" "$kiln" lock "$def" --base "$base" "${ov[@]}")
  say "$name: fetch"
  t_fetch=$(seconds "$out/$name.fetch.log" "$kiln" fetch "$def" --base "$base" --archive "$out/$name-archive")
  size=$(du -sb "$out/$name-archive" | cut -f1)
  say "$name: normal build"
  t_normal=$(seconds "$out/$name.normal.log" "$kiln" build "$def" --base "$base" "${ov[@]}" --out "$out/normal")
  locked=()
  for i in 1 2; do
    say "$name: locked offline build $i"
    locked+=("$(seconds "$out/$name.locked$i.log" unshare --net "$kiln" build "$def" --locked --offline \
      --archive "$out/$name-archive" "${ov[@]}" --out "$out/locked$i")")
  done
  say "$name: diff"
  "$kiln" diff --json "$out/locked1/$name.raw" "$out/locked2/$name.raw" >"$out/$name.diff.json" || true
  "$kiln" diff "$out/locked1/$name.raw" "$out/locked2/$name.raw" >"$out/$name.diff.txt" 2>&1 || true
  ndiff=$(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); f=d.get("files",{}); print(sum(len(f.get(k,[])) for k in ("added","removed","changed")))' "$out/$name.diff.json")
  printf '| %s | %.0f s | %.0f s | %s MiB | %.0f s | %.0f s | %.0f s | %s |\n' "$name" "$t_lock" "$t_fetch" \
    "$((size >> 20))" "$t_normal" "${locked[0]}" "${locked[1]}" "$ndiff" >>"$table"
  rm -f "$out"/{normal,locked1,locked2}/"$name".raw
done
echo "load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)" >>"$table"
cat "$table"
