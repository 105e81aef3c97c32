#!/usr/bin/env bash
# Builds Kiln and runs `kiln serve` on its embedded defaults (gRPC on
# 127.0.0.1:1985). Extra arguments go to `kiln serve`, e.g.
#   scripts/serve.sh --data-dir /srv/kiln --max-size 100GiB
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"
if ! command -v cargo >/dev/null && [[ -f "$HOME/.cargo/env" ]]; then
  # shellcheck source=/dev/null
  source "$HOME/.cargo/env"
fi
scripts/install-deps.sh build
exec cargo run --release --locked -p kiln -- serve "$@"
