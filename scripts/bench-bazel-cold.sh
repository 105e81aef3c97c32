#!/usr/bin/env bash
# Bazel cold-build comparison (issue #3): wall time of a build of a generated
# tree of tiny cc_library targets, local (Bazel's own sandboxed spawns) against
# remote (every spawn executed by `kiln serve` on 127.0.0.1, empty cache), on
# the same machine. Prints both times and the ratio; figures go to a study in
# benchmarks/ and the headline table of BENCHMARKS.md. A measurement, not a
# test: nothing here passes or fails on time.
#
# Usage: scripts/bench-bazel-cold.sh [TARGETS]   (default 300)
# Env:   KILN (default target/release/kiln, or $CARGO_TARGET_DIR/release/kiln;
#        several paths, space-separated, build remotely once with each),
#        PORT (default 19870), REMOTE_JOBS (default 4),
#        REMOTE_FLAGS (extra Bazel flags for the remote build, e.g.
#        --remote_download_minimal), SETTLE (seconds to wait before each
#        timed build, default 61; see settle()), ROUNDS (default 2: local
#        then each remote, that many times), BAZEL_HEAP (the Bazel
#        server's -Xmx; default: Bazel's own), WARMUP (default 1: one
#        untimed build in each mode first; 0 times the first builds too).
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
targets="${1:-300}"
port="${PORT:-19870}"
remote_jobs="${REMOTE_JOBS:-4}"
rounds="${ROUNDS:-2}"
# Bazel's server heap: its own default (a quarter of the memory) unless
# BAZEL_HEAP is set, e.g. BAZEL_HEAP=1g.
jvm_flags=()
[[ -n "${BAZEL_HEAP:-}" ]] && jvm_flags=(--host_jvm_args="-Xmx$BAZEL_HEAP")
read -r -a remote_flags <<<"${REMOTE_FLAGS:-}"
read -r -a kilns <<<"${KILN:-${CARGO_TARGET_DIR:-$repo_root/target}/release/kiln}"
for binary in "${kilns[@]}"; do
  [[ -x "$binary" ]] || { echo "no kiln binary at $binary (cargo build --release -p kiln)" >&2; exit 1; }
done

scratch="$(mktemp -d /tmp/kiln-bazel-cold-XXXXXX)"
# A root server's actions run as action users (uids of no user), who must be able
# to traverse the path to the server's work directory.
chmod 0711 "$scratch"
server_pid=""
cleanup() {
  if [[ -n "$server_pid" ]]; then kill "$server_pid" 2>/dev/null || true; fi
  (cd "$scratch/ws" 2>/dev/null && bazel --output_user_root="$scratch/root" shutdown) >/dev/null 2>&1 || true
  chmod -R u+w "$scratch" 2>/dev/null || true
  rm -rf "$scratch"
}
trap cleanup EXIT

# The offline workspace skeleton of the Bazel tests, plus a generated package:
# lib_I depends on lib_((I-1)/2), a binary tree of depth log2(TARGETS), so
# there is parallel work at every level.
workspace="$scratch/ws"
mkdir -p "$workspace/gen"
cp -r "$repo_root/tests/bazel/workspace/WORKSPACE" "$repo_root/tests/bazel/workspace/.bazelrc" \
  "$repo_root/tests/bazel/workspace/third_party" "$workspace/"
{
  echo 'load("@rules_cc//cc:defs.bzl", "cc_library")'
  for ((i = 0; i < targets; i++)); do
    if ((i == 0)); then deps=""; else deps="deps = [\":lib_$(((i - 1) / 2))\"],"; fi
    printf 'cc_library(name = "lib_%d", srcs = ["lib_%d.cc"], hdrs = ["lib_%d.h"], %s)\n' \
      "$i" "$i" "$i" "$deps"
  done
} >"$workspace/gen/BUILD"
for ((i = 0; i < targets; i++)); do
  printf 'int f_%d();\n' "$i" >"$workspace/gen/lib_$i.h"
  if ((i == 0)); then
    printf '#include "gen/lib_0.h"\nint f_0() { return 0; }\n' >"$workspace/gen/lib_0.cc"
  else
    parent=$(((i - 1) / 2))
    printf '#include "gen/lib_%d.h"\n#include "gen/lib_%d.h"\nint f_%d() { return f_%d() + %d; }\n' \
      "$i" "$parent" "$i" "$parent" "$i" >"$workspace/gen/lib_$i.cc"
  fi
done

bazel_cmd() {
  (cd "$workspace" && bazel --output_user_root="$scratch/root" --nohome_rc \
    "${jvm_flags[@]}" "$@")
}

# Lets the file system forget recent deletions before a timed build, so
# every build starts alike. On ext4 without a journal (this machine kind's
# disk) each inode allocation skips, one lookup each, every inode deleted
# in the last 60 s (360 s while its inode table block is dirty); right
# after `bazel clean` deleted the previous build's tree, every file the
# next build creates pays for that scan, which a build on a fresh tree
# does not. SETTLE=0 skips the wait.
settle() {
  sync
  sleep "${SETTLE:-61}"
}

# CPU seconds (user + system) a process has used so far; 0 if it is gone.
process_cpu() {
  local ticks
  ticks=$(awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0)
  echo "scale=2; $ticks / $(getconf CLK_TCK)" | bc
}

# CPU seconds (user + system, every core) the whole machine has used so far.
machine_cpu() {
  awk -v hz="$(getconf CLK_TCK)" '/^cpu /{printf "%.2f", ($2 + $3 + $4 + $7 + $8) / hz}' /proc/stat
}

# Seconds (every core) the machine has spent idle, waiting for I/O, and
# stolen by the hypervisor so far: where a build's wall time went when its
# CPU time does not explain it.
machine_waits() {
  awk -v hz="$(getconf CLK_TCK)" '/^cpu /{printf "%.2f %.2f %.2f", $5 / hz, $6 / hz, $9 / hz}' /proc/stat
}

# Times `bazel build FLAGS //gen:all` after loading and analysis are warm
# (a `--nobuild` run with the same flags), so both sides time the execution
# phase plus Bazel's own bookkeeping. Also reports, on stderr, where the CPU
# went during the build: the Bazel server, Kiln (when running) and the rest
# of the machine (compilers, and whatever else shares it).
timed_build() {
  bazel_cmd build --nobuild "$@" //gen:all >/dev/null 2>&1
  settle
  local bazel_pid started ended machine0 machine1 bazel0 bazel1 kiln0=0 kiln1=0 waits0 waits1
  bazel_pid=$(bazel_cmd info server_pid 2>/dev/null)
  machine0=$(machine_cpu)
  read -r -a waits0 <<<"$(machine_waits)"
  bazel0=$(process_cpu "$bazel_pid")
  [[ -n "$server_pid" ]] && kiln0=$(process_cpu "$server_pid")
  started=$(date +%s.%N)
  bazel_cmd build "$@" //gen:all >"$scratch/last.log" 2>&1 || { cat "$scratch/last.log" >&2; exit 1; }
  ended=$(date +%s.%N)
  machine1=$(machine_cpu)
  read -r -a waits1 <<<"$(machine_waits)"
  bazel1=$(process_cpu "$bazel_pid")
  [[ -n "$server_pid" ]] && kiln1=$(process_cpu "$server_pid")
  grep -E '^INFO: [0-9]+ processes' "$scratch/last.log" >&2 || true
  echo "  cpu seconds: machine $(echo "$machine1 - $machine0" | bc), bazel server $(echo "$bazel1 - $bazel0" | bc), kiln $(echo "$kiln1 - $kiln0" | bc); idle $(echo "${waits1[0]} - ${waits0[0]}" | bc), iowait $(echo "${waits1[1]} - ${waits0[1]}" | bc), steal $(echo "${waits1[2]} - ${waits0[2]}" | bc)" >&2
  echo "$ended - $started" | bc
}

# Runs `bazel build` against a fresh `kiln serve` (binary $1, empty data dir),
# timed (timed_build; the seconds go to remote_seconds) unless $2 is
# "untimed". Runs in this shell, so cleanup() sees the server's pid.
remote_build() {
  local binary="$1" mode="${2:-timed}"
  local flags=(--remote_executor="grpc://127.0.0.1:$port" --spawn_strategy=remote
    --jobs="$remote_jobs" --remote_timeout=60 "${remote_flags[@]}")
  rm -rf "$scratch/kiln-data"
  "$binary" serve --data-dir "$scratch/kiln-data" --listen "127.0.0.1:$port" >"$scratch/kiln.out" 2>"$scratch/kiln.log" &
  server_pid=$!
  for _ in $(seq 100); do grep -q listening "$scratch/kiln.out" 2>/dev/null && break; sleep 0.1; done
  if [[ "$mode" == untimed ]]; then
    bazel_cmd build "${flags[@]}" //gen:all >"$scratch/last.log" 2>&1 || { cat "$scratch/last.log" >&2; exit 1; }
  else
    remote_seconds=$(timed_build "${flags[@]}")
  fi
  kill "$server_pid"
  wait "$server_pid" 2>/dev/null || true
  server_pid=""
}

median() {
  sort -n | awk '{v[NR] = $1} END {if (NR % 2) print v[(NR + 1) / 2]; else printf "%.2f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2}'
}

echo "targets: $targets cc_library; machine: $(nproc) CPUs, $(uname -r)"
# A Bazel server's first build in a mode pays for the JVM compiling that
# mode's code (for remote execution: gRPC, protobuf, Merkle trees), several
# seconds of CPU on two cores. A developer's Bazel server is long-lived, so
# by default one untimed build in each mode comes first and the rounds time
# the steady state; WARMUP=0 times the server's first builds as well.
if [[ "${WARMUP:-1}" != 0 ]]; then
  bazel_cmd clean >/dev/null 2>&1
  bazel_cmd build //gen:all >"$scratch/last.log" 2>&1 || { cat "$scratch/last.log" >&2; exit 1; }
  bazel_cmd clean >/dev/null 2>&1
  remote_build "${kilns[0]}" untimed
  echo "warm-up: one untimed local and one untimed remote build done"
fi
# Rounds alternate local and remote builds on one Bazel server, so neither
# side alone gets a quiet spell of the machine.
declare -A ratios=()
for round in $(seq "$rounds"); do
  bazel_cmd clean >/dev/null 2>&1
  local_seconds=$(timed_build)
  echo "round $round: local  (--jobs=2, processwrapper-sandbox): ${local_seconds} s"

  # One remote build per Kiln binary (KILN may list several, space-separated,
  # for an A/B in one session), each against a fresh server and data dir.
  for i in "${!kilns[@]}"; do
    bazel_cmd clean >/dev/null 2>&1
    remote_build "${kilns[$i]}"
    ratio=$(printf '%.2f' "$(echo "scale=4; $remote_seconds / $local_seconds" | bc)")
    ratios[$i]+="$ratio "
    echo "round $round: remote (--remote_executor, cold, --jobs=$remote_jobs ${remote_flags[*]}; ${kilns[$i]}): ${remote_seconds} s"
    echo "ratio remote/local: $ratio"
  done
done
for i in "${!kilns[@]}"; do
  echo "${kilns[$i]}: ratios ${ratios[$i]}; median $(tr ' ' '\n' <<<"${ratios[$i]}" | grep . | median)"
done
