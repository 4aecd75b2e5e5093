#!/usr/bin/env bash
# Benchmark `kiln checksum` against coreutils `sha256sum` on a large sparse image.
#
# Usage: bench/checksum.sh [SIZE_GB=25]
#
# Builds kiln in release mode, creates a SIZE_GB GiB sparse file holding ~12% non-zero
# data (12 random chunks spread evenly over it: 3 GiB for 25 GiB) in a temporary
# directory under $BENCH_TMPDIR (default /var/tmp, which must support sparse files),
# then times both programs in one hyperfine run (--warmup 1 --runs 3). Both commands'
# digests are compared afterwards. Results go to $BENCH_OUT (default target/bench):
# checksum.md and checksum.json. The temporary file is always deleted.
set -euo pipefail

size_gb=${1:-25}
if ! [[ $size_gb =~ ^[1-9][0-9]*$ ]]; then
    echo "usage: $0 [SIZE_GB=25]" >&2
    exit 2
fi

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=${BENCH_OUT:-$root/target/bench}

for tool in hyperfine sha256sum jq dd truncate; do
    command -v "$tool" >/dev/null || { echo "error: $tool not found" >&2; exit 1; }
done

echo "==> building kiln (release)"
mkdir -p "$out"
if ! (cd "$root" && cargo build --release --bin kiln) >"$out/build.log" 2>&1; then
    cat "$out/build.log" >&2
    exit 1
fi
kiln=${CARGO_TARGET_DIR:-$root/target}/release/kiln
[[ -x $kiln ]] || { echo "error: $kiln not built" >&2; exit 1; }

tmp=$(mktemp -d "${BENCH_TMPDIR:-/var/tmp}/kiln-bench.XXXXXX")
trap 'rm -rf "$tmp"' EXIT INT TERM
img=$tmp/disk.raw

chunks=12
size_mib=$((size_gb * 1024))
chunk_mib=$((size_mib * 12 / 100 / chunks))
((chunk_mib > 0)) || chunk_mib=1
echo "==> creating $img: ${size_gb} GiB sparse, $chunks random chunks of ${chunk_mib} MiB"
truncate -s "${size_gb}G" "$img"
for ((i = 0; i < chunks; i++)); do
    # Chunk i starts a little after the i-th twelfth, so holes precede and follow data.
    seek=$((i * size_mib / chunks + size_mib / chunks / 4))
    dd if=/dev/urandom of="$img" bs=1M count="$chunk_mib" seek="$seek" conv=notrunc status=none
done
sync "$img"
echo "    apparent size $(du -h --apparent-size "$img" | cut -f1), allocated $(du -h "$img" | cut -f1)"

echo "==> hyperfine (sha256sum on a large file takes minutes per run)"
# Both programs are single-threaded CPU-bound hashers: other load skews the result.
load_before=$(cut -d' ' -f1-3 /proc/loadavg)
hyperfine --warmup 1 --runs 3 \
    --export-markdown "$out/checksum.md" --export-json "$out/checksum.json" \
    -n "kiln checksum" "'$kiln' checksum '$img' > '$tmp/kiln.out'" \
    -n "sha256sum" "sha256sum '$img' > '$tmp/sha256sum.out'"

if ! cmp -s "$tmp/kiln.out" "$tmp/sha256sum.out"; then
    echo "error: outputs differ:" >&2
    cat "$tmp/kiln.out" "$tmp/sha256sum.out" >&2
    exit 1
fi
echo "==> outputs identical: $(cut -c1-64 "$tmp/kiln.out")"

field() { jq ".results[] | select(.command == \"$1\") | .$2" "$out/checksum.json"; }
awk -v k="$(field "kiln checksum" median)" -v s="$(field sha256sum median)" \
    -v ku="$(field "kiln checksum" user)" -v su="$(field sha256sum user)" -v g="$size_gb" 'BEGIN {
    printf "==> %s GiB sparse image, median wall time of 3 runs (mean user CPU)\n", g
    printf "    kiln checksum: %8.2f s  (user %.2f s)\n", k, ku
    printf "    sha256sum:     %8.2f s  (user %.2f s)\n", s, su
    printf "    kiln/sha256sum ratio: %.3f (%.1fx faster)\n", k / s, s / k
}'
echo "    load average before: $load_before, after: $(cut -d' ' -f1-3 /proc/loadavg) ($(nproc) CPUs)"
echo "    results: $out/checksum.md, $out/checksum.json"
