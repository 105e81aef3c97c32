#!/usr/bin/env bash
# Builds and pushes the image Kiln's `init-dockerd` tests boot microVMs
# from, out of the host's Debian packages (no image is pulled from the
# internet): the base test image (tests/images/build.sh) plus docker.io's
# dockerd, docker, docker-proxy and docker-init, containerd with its runc
# shim, runc, iptables (legacy xtables, with its extension plugins) and
# every shared library `ldd` lists for them.
#
# Usage: bash tests/images/build-dockerd.sh    (as root, after
#        `scripts/services.sh start`; it runs build.sh first)
#
# Image:
#   127.0.0.1:5000/kiln-test/dockerd:latest
#       base (root, PATH set, failing CMD) plus the files above, and
#       /var/lib/docker, /var/log and /etc/docker ready. iptables is the
#       legacy (xtables) flavour: the agent loads ip_tables and its
#       friends, and legacy needs no nf_tables rule translation.
#   127.0.0.1:5000/kiln-test/dockerd-broken:latest
#       base plus a /usr/local/bin/dockerd that logs
#       "kiln-test broken dockerd: no daemon here" to stderr and exits 3,
#       for the failure path.
#
# A separate script from build.sh so that its inputs (about 200 MB of
# binaries) never rebuild the small images, and build.sh stays what the
# other tests hash. Same scheme: the label org.kiln.test.inputs is a
# SHA-256 over this script, the base image's own label and the files
# copied in; when the registry holds images with it, nothing is built
# (two seconds: hashing the binaries). The image is not pulled into the local stores:
# only VMs use it, and they read the registry. Serialised on
# /var/lib/kiln-test/images-dockerd.lock. Prints the references with their
# manifest digests on stdout.
set -euo pipefail

OPEN=127.0.0.1:5000
BASE="$OPEN/kiln-test/base:latest"
DOCKERD="$OPEN/kiln-test/dockerd:latest"
BROKEN="$OPEN/kiln-test/dockerd-broken:latest"
LABEL=org.kiln.test.inputs
STATE_DIR=/var/lib/kiln-test
LOCK="$STATE_DIR/images-dockerd.lock"
export DOCKER_BUILDKIT=0

say() { echo "images: $*" >&2; }
die() {
  echo "images: error: $*" >&2
  exit 1
}

here="$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")"
script="$here/build-dockerd.sh"
bash "$here/build.sh" >/dev/null

mkdir -p "$STATE_DIR"
exec 9>"$LOCK"
flock -w 600 9 || die "could not lock $LOCK within 600s"

PROGRAMS=(
  /usr/sbin/dockerd /usr/bin/docker /usr/sbin/docker-proxy
  /usr/bin/containerd /usr/bin/containerd-shim-runc-v2 /usr/sbin/runc
  /usr/bin/tini-static /usr/sbin/xtables-legacy-multi
)
for program in "${PROGRAMS[@]}"; do
  [[ -x "$program" ]] || die "$program missing (apt-get install docker.io iptables tini)"
done
XTABLES_PLUGINS=/usr/lib/x86_64-linux-gnu/xtables
[[ -d "$XTABLES_PLUGINS" ]] || die "$XTABLES_PLUGINS missing (apt-get install iptables)"

# The programs and every library they load, as absolute paths.
dockerd_files() {
  printf '%s\n' "${PROGRAMS[@]}"
  find "$XTABLES_PLUGINS" -name '*.so'
  # ldd fails for the static programs (tini-static): its listing of the
  # others is still whole.
  { ldd "${PROGRAMS[@]}" "$XTABLES_PLUGINS"/*.so 2>/dev/null || true; } | awk '
    $2 == "=>" && $3 ~ /^\// { print $3 }
    $1 ~ /^\// && $1 !~ /:$/ { print $1 }
  '
}
mapfile -t FILES < <(dockerd_files | sort -u)

base_label="$(skopeo inspect --tls-verify=false --format "{{index .Labels \"$LABEL\"}}" \
  "docker://$BASE" 2>/dev/null)" || die "no $BASE in the registry"
HASH="$({
  sha256sum "$script"
  echo "base $base_label"
  for f in "${FILES[@]}"; do
    printf '%s ' "$f"
    sha256sum <"$(readlink -f "$f")"
  done
} | sha256sum | cut -c1-64)"

current() {
  local ref info out=()
  for ref in "$DOCKERD" "$BROKEN"; do
    info="$(skopeo inspect --tls-verify=false --format "{{.Digest}} {{index .Labels \"$LABEL\"}}" \
      "docker://$ref" 2>/dev/null || true)"
    [[ "${info#* }" == "$HASH" ]] || return 1
    out+=("$ref@${info%% *}")
  done
  printf '%s\n' "${out[@]}"
}
if current; then
  exit 0
fi

say "building $DOCKERD and $BROKEN (inputs $HASH)"
work="$(mktemp -d "$STATE_DIR/images-dockerd.XXXXXX")"
trap 'rm -rf "$work"' EXIT
root="$work/rootfs"
mkdir -p "$root"/{var/lib/docker,var/log,etc/docker,run}
for f in "${FILES[@]}"; do
  mkdir -p "$root$(dirname "$f")"
  cp -L "$f" "$root$f"
done
ln -s tini-static "$root/usr/bin/docker-init"
for name in iptables iptables-save iptables-restore ip6tables ip6tables-save ip6tables-restore; do
  ln -s xtables-legacy-multi "$root/usr/sbin/$name"
done
tar --sort=name --mtime=@0 --numeric-owner -C "$root" -cf "$work/dockerd.tar" .
cat >"$work/Dockerfile" <<EOF
FROM $BASE
ADD dockerd.tar /
LABEL $LABEL=$HASH
EOF
cat >"$work/broken-dockerd" <<'EOF'
#!/bin/sh
echo "kiln-test broken dockerd: no daemon here" >&2
exit 3
EOF
chmod 755 "$work/broken-dockerd"
cat >"$work/Dockerfile.broken" <<EOF
FROM $BASE
COPY broken-dockerd /usr/local/bin/dockerd
LABEL $LABEL=$HASH
EOF
for pair in "$DOCKERD:Dockerfile" "$BROKEN:Dockerfile.broken"; do
  ref="${pair%:*}" dockerfile="${pair##*:}"
  out="$(docker build -q --network none -f "$work/$dockerfile" -t "$ref" "$work" 2>&1)" || {
    echo "$out" >&2
    die "docker build of $ref failed"
  }
  say "docker push $ref"
  docker push -q "$ref" >/dev/null || die "docker push of $ref failed"
  # Only the registry's copy is used; the local one would only take room.
  docker rmi "$ref" >/dev/null 2>&1 || true
done
current || die "the registry does not hold the images just pushed"
