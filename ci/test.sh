#!/usr/bin/env bash
# The test command (README): formatting and lints, the unit tests, then the root
# integration tests that build real images. Fixtures are cached under $KILN_TEST_CACHE
# (default /var/cache/kiln-tests). Privileged tests fail (never skip) without root, so
# this script refuses to start as another user.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then
  echo "ci/test.sh: the integration tests need root (loop devices, mounts, chroot); run: sudo ci/test.sh" >&2
  exit 2
fi
export KILN_TEST_CACHE=${KILN_TEST_CACHE:-/var/cache/kiln-tests}
cargo fmt --check
cargo clippy --release --all-targets -- -D warnings
cargo build --release --bins
cargo test --release -- --test-threads=2
