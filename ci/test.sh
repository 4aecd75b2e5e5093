#!/usr/bin/env bash
# The test command (README): unit tests, then the root integration tests that build
# real images. Fixtures are cached under $KILN_TEST_CACHE (default /var/cache/kiln-tests).
set -euo pipefail
cd "$(dirname "$0")/.."
export KILN_TEST_CACHE=${KILN_TEST_CACHE:-/var/cache/kiln-tests}
cargo build --release --bins
cargo test --release -- --test-threads=2
