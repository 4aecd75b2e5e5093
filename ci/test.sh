#!/usr/bin/env bash
# The test command (README): formatting and lints, the product binary's check, the unit
# tests, then the root integration tests that build real images. Fixtures are cached
# under $KILN_TEST_CACHE (default /var/cache/kiln-tests). Privileged tests fail (never
# skip) without root, so this script refuses to start as another user.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then
  echo "ci/test.sh: the integration tests need root (loop devices, mounts, chroot); run: sudo ci/test.sh" >&2
  exit 2
fi
export KILN_TEST_CACHE=${KILN_TEST_CACHE:-/var/cache/kiln-tests}
cargo fmt --check
cargo clippy --release --all-targets --features fault-injection -- -D warnings
cargo clippy --release --all-targets -- -D warnings

# The product binary has no test-only code: fault injection is a cargo feature.
cargo build --release --bins
if grep -q -a KILN_FAULT target/release/kiln; then
  echo "ci/test.sh: target/release/kiln (built without features) contains fault-injection code" >&2
  exit 1
fi
echo "ci/test.sh: the release binary has no fault-injection code"

# The CI workflow and the Kubernetes Job against their schemas, offline (the venv is
# .ci/run's; tests/container.rs checks the same and more).
venv=$KILN_TEST_CACHE/venv
if [ -x "$venv/bin/check-jsonschema" ]; then
  unshare -n "$venv/bin/check-jsonschema" --builtin-schema vendor.github-workflows ci/github/build-images.yml
  unshare -n "$venv/bin/kubernetes-validate" --quiet --strict -k 1.30.0 ci/k8s/build-images.yaml
fi

# The tests run with it (tests/safety.rs injects faults at every stage boundary).
cargo test --release --features fault-injection -- --test-threads=2
