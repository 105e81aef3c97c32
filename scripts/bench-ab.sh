#!/bin/bash
# A/B of one server setting: `kiln bench exec|cas` against a fresh
# `kiln serve` of each mode in turn, alternating within one run so both
# see the same machine state.
#
# Usage: KILN=target/release/kiln ROUNDS=3 scripts/bench-ab.sh MODE_A MODE_B BENCH [ARGS...]
#   MODE: plain    the defaults (monitoring on a free loopback port, no keys)
#         nometrics --monitoring-listen off (no RPC layer, no observer)
#         keys     an API key made first (so every call is checked), sent
#                  by the bench with --api-key-file
#   BENCH: exec or cas; ARGS go to `kiln bench BENCH`.
# Example: scripts/bench-ab.sh plain keys exec --latency-count 300 --throughput-count 1500
set -eu
KILN=${KILN:-target/release/kiln}
ROUNDS=${ROUNDS:-3}
A=$1 B=$2 BENCH=$3
shift 3
WORK=$(mktemp -d /var/tmp/kiln-bench-ab.XXXXXX)
chmod 755 "$WORK"
PID=
trap '[ -n "$PID" ] && kill $PID 2>/dev/null; rm -rf "$WORK"' EXIT

for round in $(seq "$ROUNDS"); do
    for mode in "$A" "$B"; do
        dir="$WORK/$round-$mode"
        mkdir -p "$dir"
        chmod 755 "$dir"
        serve=(--listen 127.0.0.1:0 --data-dir "$dir" --monitoring-listen 127.0.0.1:0)
        bench=()
        case $mode in
            plain) ;;
            nometrics) serve=(--listen 127.0.0.1:0 --data-dir "$dir" --monitoring-listen off) ;;
            keys)
                "$KILN" keys create --data-dir "$dir" --org bench \
                    --capability cache-read,cas-write,execute | tail -n 1 > "$dir/key"
                bench=(--api-key-file "$dir/key")
                ;;
            *) echo "unknown mode $mode" >&2; exit 2 ;;
        esac
        "$KILN" serve "${serve[@]}" > "$dir/out" 2> "$dir/log" &
        PID=$!
        for _ in $(seq 300); do
            grep -q "^listening grpc" "$dir/out" 2>/dev/null && break
            sleep 0.1
        done
        addr=$(sed -n 's/^listening \(grpc:.*\)/\1/p' "$dir/out")
        echo "=== round $round, $mode ($addr)"
        "$KILN" bench "$BENCH" --server "$addr" --server-pid "$PID" "${bench[@]}" "$@" | grep -v '^$'
        kill "$PID"
        wait "$PID" 2>/dev/null || true
        PID=
        rm -rf "$dir"
    done
done
