#!/bin/sh
# The cost of TLS on the gRPC port: `kiln bench cas` (1 GiB ByteStream
# write and read) against a plaintext and a TLS `kiln serve`, alternating
# in one run so both see the same machine state. Certificates are made
# here with openssl (ECDSA P-256, as rcgen makes in the tests).
#
# Each round prints one line per mode: wall seconds and server CPU seconds
# (`srv cpu s`) of the write and the read, and the 1-minute load average
# after it (other builds on the machine show there). The run ends with the
# medians of each column and TLS ÷ plaintext for each.
#
# Usage: KILN=target/release/kiln ROUNDS=3 scripts/bench-tls.sh [SIZE]
set -eu
KILN=${KILN:-target/release/kiln}
ROUNDS=${ROUNDS:-3}
SIZE=${1:-1GiB}
WORK=$(mktemp -d /var/tmp/kiln-bench-tls.XXXXXX)
trap 'kill $PLAIN_PID $TLS_PID 2>/dev/null || true; rm -rf "$WORK"' EXIT

cd "$WORK"
openssl ecparam -genkey -name prime256v1 -noout -out ca-key.pem
openssl req -x509 -new -key ca-key.pem -subj "/CN=kiln bench CA" -days 2 \
    -addext "basicConstraints=critical,CA:TRUE" -out ca.pem 2>/dev/null
openssl ecparam -genkey -name prime256v1 -noout -out server-key.pem
openssl req -new -key server-key.pem -subj "/CN=kiln bench" -out server.csr
printf 'subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' > ext
openssl x509 -req -in server.csr -CA ca.pem -CAkey ca-key.pem -CAcreateserial \
    -days 2 -extfile ext -out server.pem 2>/dev/null

# serve NAME FLAGS...: starts a server, sets ADDR to its listening address.
serve() {
    name=$1; shift
    "$KILN" serve --listen 127.0.0.1:0 --monitoring-listen off \
        --embedded-executor false --data-dir "$WORK/$name" "$@" \
        > "$WORK/$name.out" 2> "$WORK/$name.log" &
    pid=$!
    for _ in $(seq 100); do
        [ -s "$WORK/$name.out" ] && break
        sleep 0.1
    done
    ADDR=$(sed -n 's/^listening //p' "$WORK/$name.out")
}
serve plain; PLAIN_PID=$pid; PLAIN=$ADDR
serve tls --tls-cert server.pem --tls-key server-key.pem; TLS_PID=$pid; TLS=$ADDR
echo "plaintext $PLAIN (pid $PLAIN_PID), TLS $TLS (pid $TLS_PID)"

RESULTS="$WORK/results"
printf '%-5s %-5s %8s %8s %8s %8s %6s\n' round mode write_s write_cpu read_s read_cpu load1
for round in $(seq "$ROUNDS"); do
    for mode in plain tls; do
        if [ $mode = plain ]; then
            set -- --server "$PLAIN" --server-pid "$PLAIN_PID"
        else
            set -- --server "$TLS" --server-pid "$TLS_PID" --tls-ca ca.pem
        fi
        if ! report=$("$KILN" bench cas --large-size "$SIZE" --small-count 0 \
            --bytestream-count 0 "$@" 2> "$WORK/bench.err"); then
            cat "$WORK/bench.err" >&2
            exit 1
        fi
        # operation (3 words), count, bytes (2 words), seconds, items/s,
        # MB/s, srv cpu s.
        write=$(echo "$report" | awk '/^ByteStream Write \(large/ {print $8, $11}')
        read=$(echo "$report" | awk '/^ByteStream Read \(large/ {print $8, $11}')
        [ -n "$write" ] && [ -n "$read" ] || { echo "$report" >&2; cat "$WORK/bench.err" >&2; exit 1; }
        load=$(cut -d' ' -f1 /proc/loadavg)
        echo "$round $mode $write $read $load" >> "$RESULTS"
        printf '%-5s %-5s %8s %8s %8s %8s %6s\n' $round $mode $write $read $load
    done
done

# median MODE COLUMN: the median of one column over the rounds of one mode.
median() {
    awk -v mode="$1" -v col="$2" '$2 == mode {print $col}' "$RESULTS" | sort -g |
        awk '{v[NR] = $1} END {print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2}'
}
echo "medians over $ROUNDS rounds (TLS / plaintext):"
for column in 3:write_s 4:write_cpu 5:read_s 6:read_cpu; do
    plain=$(median plain "${column%%:*}")
    tls=$(median tls "${column%%:*}")
    printf '  %-9s plain %7s  TLS %7s  %s\n' "${column#*:}" "$plain" "$tls" \
        "$(awk -v a="$tls" -v b="$plain" 'BEGIN {if (b > 0) printf "%.2fx", a / b}')"
done
echo "  load1     plain $(median plain 7)  TLS $(median tls 7)"
