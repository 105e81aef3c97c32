#!/usr/bin/env bash
# Kiln's full test run: what CI runs (via .ci/run) and what developers run
# before sending a change. Installs the Debian packages the tests need,
# starts the services the container tests drive (dockerd, two local image
# registries, podman's configuration), then runs every test in the
# workspace, including the real-Bazel end-to-end test.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"

section() {
  printf '\n==== %s ====\n' "$*"
}

# rustup installs cargo under ~/.cargo/bin, which a non-login shell may lack.
if ! command -v cargo >/dev/null && [[ -f "$HOME/.cargo/env" ]]; then
  # shellcheck source=/dev/null
  source "$HOME/.cargo/env"
fi

section "Installing test dependencies (scripts/install-deps.sh)"
"$repo_root/scripts/install-deps.sh"

section "Starting test services (scripts/services.sh start)"
"$repo_root/scripts/services.sh" start

# A target dir outside the clone survives fresh clones (CI clones anew each
# run), so only changed crates are rebuilt.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/kiln-target}"
mkdir -p "$CARGO_TARGET_DIR"

# This script installs and starts every component the tests drive, so a
# test that finds one missing must fail, not skip: the tests treat CI=true
# that way. (A bare `cargo test` may still skip, saying why.)
export CI="${CI:-true}"

# Two cores: two rustc jobs, and keep test binaries from fighting Bazel.
export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-2}"
# Every CI run builds a fresh clone at a new path, so incremental caches
# are never reused, only piled up in the shared target dir (19 GB seen).
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

section "Toolchain"
cargo --version
rustc --version
if command -v bazel >/dev/null; then
  echo "bazel: $(command -v bazel) ($(dpkg-query -W -f='${Version}' bazel-bootstrap 2>/dev/null || echo unknown))"
else
  echo "bazel: not found"
fi
echo "CARGO_TARGET_DIR=$CARGO_TARGET_DIR"

section "Formatting (cargo fmt --check)"
cargo fmt --all -- --check

section "Building tests (cargo test --workspace --no-run)"
cargo test --workspace --no-run </dev/null

section "Running tests (cargo test --workspace)"
cargo test --workspace </dev/null

section "All tests passed"
