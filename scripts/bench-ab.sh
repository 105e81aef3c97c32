#!/bin/bash
# A/B of one server setting: `kiln bench exec|cas` against a fresh
# `kiln serve` of each mode in turn, alternating within one run so both
# see the same machine state. Odd rounds run A first, even rounds B
# first: on this machine the second server of a pair measures about 2 %
# slower whichever it is, so a fixed order reads as a cost of the mode.
# The summary at the end gives, for each operation and figure, the median
# of B/A over the rounds of each order and their geometric mean: B against
# A with the order's effect taken out (use an even ROUNDS).
#
# Usage: KILN=target/release/kiln ROUNDS=3 scripts/bench-ab.sh MODE_A MODE_B BENCH [ARGS...]
#   MODE: plain    the defaults (monitoring on a free loopback port, no keys)
#         nometrics --monitoring-listen off (no RPC layer, no observer)
#         keys     an API key made first (so every call is checked), sent
#                  by the bench with --api-key-file
#         PATH     another kiln binary (an absolute path), with the defaults:
#                  A/B of two builds, e.g. before and after a change
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
    order=("$A" "$B")
    [ $((round % 2)) -eq 0 ] && order=("$B" "$A")
    for mode in "${order[@]}"; do
        dir="$WORK/$round-$mode"
        mkdir -p "$dir"
        chmod 755 "$dir"
        serve=(--listen 127.0.0.1:0 --data-dir "$dir" --monitoring-listen 127.0.0.1:0)
        bench=()
        kiln=$KILN
        case $mode in
            plain) ;;
            nometrics) serve=(--listen 127.0.0.1:0 --data-dir "$dir" --monitoring-listen off) ;;
            keys)
                "$KILN" keys create --data-dir "$dir" --org bench \
                    --capability cache-read,cas-write,execute | tail -n 1 > "$dir/key"
                bench=(--api-key-file "$dir/key")
                ;;
            /*) [ -x "$mode" ] || { echo "no kiln binary at $mode" >&2; exit 2; }
                kiln=$mode ;;
            *) echo "unknown mode $mode" >&2; exit 2 ;;
        esac
        "$kiln" serve "${serve[@]}" > "$dir/out" 2> "$dir/log" &
        PID=$!
        for _ in $(seq 300); do
            grep -q "^listening grpc" "$dir/out" 2>/dev/null && break
            sleep 0.1
        done
        addr=$(sed -n 's/^listening \(grpc:.*\)/\1/p' "$dir/out")
        echo "=== round $round, $mode ($addr)" | tee -a "$WORK/all"
        "$kiln" bench "$BENCH" --server "$addr" --server-pid "$PID" "${bench[@]}" "$@" \
            | grep -v '^$' | tee -a "$WORK/all"
        kill "$PID"
        wait "$PID" 2>/dev/null || true
        PID=
        rm -rf "$dir"
    done
done

# The summary: report lines are columns two or more spaces apart
# (operation, count, bytes, seconds, items/s, MB/s, srv cpu s, note).
echo "=== summary: $B against $A, median of B/A per order and their geometric mean"
awk -v A="$A" -v B="$B" '
function median(list,    n, v, i, j, t) {
    n = split(list, v, " ")
    for (i = 2; i <= n; i++) { t = v[i] + 0; for (j = i - 1; j >= 1 && v[j] + 0 > t; j--) v[j + 1] = v[j]; v[j + 1] = t }
    return n == 0 ? 0 : (n % 2 ? v[(n + 1) / 2] : (v[n / 2] + v[n / 2 + 1]) / 2)
}
/^=== round/ { round = $3 + 0; mode = $4; next }
/^operation|^server|^seed|^action|^\(MB|^ / { next }
{
    n = split($0, f, /  +/)
    if (n < 7) next
    op = f[1]; if (!(op in seen)) { seen[op] = 1; ops[++nops] = op }
    key = round SUBSEP mode SUBSEP op
    value[key, "items/s"] = f[5]; value[key, "MB/s"] = f[6]; value[key, "srv cpu s"] = f[7]
    if (match($0, /p50 [0-9.]+ ms/)) value[key, "p50 ms"] = substr($0, RSTART + 4, RLENGTH - 7)
    if (round > rounds) rounds = round
}
END {
    figures[1] = "items/s"; figures[2] = "MB/s"; figures[3] = "srv cpu s"; figures[4] = "p50 ms"
    for (o = 1; o <= nops; o++) for (g = 1; g <= 4; g++) {
        fig = figures[g]; first = ""; second = ""
        for (r = 1; r <= rounds; r++) {
            a = value[r SUBSEP A SUBSEP ops[o], fig] + 0; b = value[r SUBSEP B SUBSEP ops[o], fig] + 0
            if (a <= 0 || b <= 0) continue
            if (r % 2) first = first " " b / a; else second = second " " b / a
        }
        if (first == "" || second == "") continue
        m1 = median(first); m2 = median(second)
        printf "%-36s %-10s %s first %.3f, %s first %.3f, both %.3f\n", ops[o], fig, A, m1, B, m2, sqrt(m1 * m2)
    }
}' "$WORK/all"
