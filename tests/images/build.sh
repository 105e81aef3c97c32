#!/usr/bin/env bash
# Builds and pushes the container images Kiln's container-isolation tests
# run, from local files only (no image is pulled from the internet):
# busybox-static's /bin/busybox with its applet symlinks (/bin/sh,
# /usr/bin/env, ...) plus the host's /bin/bash and the libraries `ldd`
# lists for it (Bazel runs genrules and test wrappers through /bin/bash,
# which busybox lacks).
#
# Usage: bash tests/images/build.sh    (as root, after
#        `scripts/services.sh start`)
#
# Images (the registries are the source of truth):
#   127.0.0.1:5000/kiln-test/base:latest
#       busybox + bash, runs as root, no ENTRYPOINT, and a CMD that fails
#       loudly (prints "image CMD ran" to stderr, exits 99) so tests can
#       prove the CMD is ignored. Has /tmp (1777), /etc/passwd and
#       /etc/group with root and builder (uid/gid 1000, home
#       /home/builder), /usr/bin/env, PATH set.
#   127.0.0.1:5000/kiln-test/nonroot:latest
#       base plus USER 1000:1000.
#   127.0.0.1:5000/kiln-test/entrypoint:latest
#       base plus ENTRYPOINT ["/entrypoint.sh"], which prints
#       "entrypoint wrapper saw: <args>" to stderr, then exec "$@"
#       (same failing CMD as base).
#   127.0.0.1:5001/kiln-test/private:latest
#       base, only in the registry with auth (user kiln, password
#       Kiln-Test-Secret-7f3a9c). Copied there registry-to-registry with
#       skopeo, so no local image store holds it and no credentials are
#       stored on disk; copies some earlier run left under 127.0.0.1:5001
#       in the docker or podman store are removed.
#
# Every image carries the label org.kiln.test.inputs: a SHA-256 over this
# script and the host files copied in. When the registries already hold
# images with the current hash the script only makes sure the local docker
# and podman stores hold the current base/nonroot/entrypoint (pulling them
# if missing or stale) and exits, well under a second. Concurrent runs
# serialize on a flock(1) lock (/var/lib/kiln-test/images.lock).
#
# At the end it prints each image reference with its manifest digest
# (stdout; progress goes to stderr).
#
# A test that pulls the private image must remove its local copy again
# (docker rmi / podman rmi), and log out if it logged in: with a local
# copy, `docker run` and `podman run` (pull policy "missing") would not ask
# the registry, and credential checks would pass vacuously.
set -euo pipefail

OPEN=127.0.0.1:5000
AUTH=127.0.0.1:5001
CREDS=kiln:Kiln-Test-Secret-7f3a9c
BASE="$OPEN/kiln-test/base:latest"
NONROOT="$OPEN/kiln-test/nonroot:latest"
ENTRYPOINT="$OPEN/kiln-test/entrypoint:latest"
PRIVATE="$AUTH/kiln-test/private:latest"
PUBLIC_IMAGES=("$BASE" "$NONROOT" "$ENTRYPOINT")
LABEL=org.kiln.test.inputs

STATE_DIR=/var/lib/kiln-test
LOCK="$STATE_DIR/images.lock"

# Docker's legacy builder: the Debian client has no buildx, and FROM a
# freshly built local image needs no registry round trip.
export DOCKER_BUILDKIT=0

say() {
  echo "images: $*" >&2
}

die() {
  echo "images: error: $*" >&2
  exit 1
}

script="$(readlink -f "${BASH_SOURCE[0]}")"

mkdir -p "$STATE_DIR"
exec 9>"$LOCK"
# Bounded: a build takes seconds; a holder stuck for minutes is a bug.
flock -w 300 9 || die "could not lock $LOCK within 300s"

# ---- inputs ----------------------------------------------------------------

[[ -x /bin/busybox ]] || die "/bin/busybox missing (install busybox-static)"
/bin/busybox --list-full >/dev/null 2>&1 ||
  die "/bin/busybox is not a full busybox (install busybox-static)"

# bash and every library it loads (including the dynamic loader), as the
# absolute paths ldd prints. Symlinks are resolved when copied.
bash_files() {
  echo /bin/bash
  ldd /bin/bash | awk '
    $2 == "=>" && $3 ~ /^\// { print $3 }
    $1 ~ /^\// { print $1 }
  '
}
mapfile -t BASH_FILES < <(bash_files | sort -u)

inputs_hash() {
  {
    sha256sum "$script" /bin/busybox
    local f
    for f in "${BASH_FILES[@]}"; do
      printf '%s ' "$f"
      sha256sum <"$(readlink -f "$f")"
    done
  } | sha256sum | cut -c1-64
}
HASH="$(inputs_hash)"

# ---- what is already there -------------------------------------------------

# Each image's manifest digest in its registry, filled by registries_current.
declare -A DIGEST

# True if every registry holds its image with the current inputs label;
# records the digests on the way (one skopeo call per image).
registries_current() {
  local ref info creds
  for ref in "${PUBLIC_IMAGES[@]}" "$PRIVATE"; do
    creds=()
    [[ "$ref" == "$AUTH"/* ]] && creds=(--creds "$CREDS")
    info="$(skopeo inspect --tls-verify=false "${creds[@]}" \
      --format "{{.Digest}} {{index .Labels \"$LABEL\"}}" \
      "docker://$ref" 2>/dev/null || true)"
    [[ "${info#* }" == "$HASH" ]] || return 1
    DIGEST[$ref]="${info%% *}"
  done
}

# Makes the local docker and podman stores hold the current public images
# (a stale local :latest would shadow the registry's), and no copy of the
# private image.
sync_local_stores() {
  local ref label
  for ref in "${PUBLIC_IMAGES[@]}"; do
    label="$(docker image inspect -f "{{index .Config.Labels \"$LABEL\"}}" "$ref" 2>/dev/null || true)"
    if [[ "$label" != "$HASH" ]]; then
      say "docker: pulling $ref"
      docker pull -q "$ref" >/dev/null
    fi
    label="$(podman image inspect --format "{{index .Labels \"$LABEL\"}}" "$ref" 2>/dev/null || true)"
    if [[ "$label" != "$HASH" ]]; then
      say "podman: pulling $ref"
      podman pull -q "$ref" >/dev/null
    fi
  done
  if docker image inspect "$PRIVATE" >/dev/null 2>&1; then
    say "docker: removing local copy of $PRIVATE"
    docker rmi "$PRIVATE" >/dev/null
  fi
  if podman image exists "$PRIVATE"; then
    say "podman: removing local copy of $PRIVATE"
    podman rmi "$PRIVATE" >/dev/null
  fi
}

print_digests() {
  local ref
  for ref in "${PUBLIC_IMAGES[@]}" "$PRIVATE"; do
    echo "$ref@${DIGEST[$ref]}"
  done
}

if registries_current; then
  sync_local_stores
  print_digests
  exit 0
fi

# ---- build -----------------------------------------------------------------

say "building (inputs $HASH)"
# The images these tags name now; removed at the end if nothing else uses
# them, so rebuilds do not pile up untagged images.
# Children first: a base with children cannot be removed.
old_images=()
for ref in "$ENTRYPOINT" "$NONROOT" "$BASE"; do
  old_images+=("docker:$(docker image inspect -f '{{.Id}}' "$ref" 2>/dev/null || true)")
  old_images+=("podman:$(podman image inspect --format '{{.Id}}' "$ref" 2>/dev/null || true)")
done
work="$(mktemp -d "$STATE_DIR/images-build.XXXXXX")"
trap 'rm -rf "$work"' EXIT
root="$work/rootfs"
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,etc,root,home/builder,proc,sys,dev,tmp}
chmod 1777 "$root/tmp"
chmod 700 "$root/root"
chown 1000:1000 "$root/home/builder"

cp /bin/busybox "$root/bin/busybox"
while read -r applet; do
  [[ -e "$root/$applet" || -L "$root/$applet" ]] && continue
  mkdir -p "$root/$(dirname "$applet")"
  ln -s /bin/busybox "$root/$applet"
done < <(/bin/busybox --list-full)

for f in "${BASH_FILES[@]}"; do
  mkdir -p "$root$(dirname "$f")"
  cp -L "$f" "$root$f"
done

cat >"$root/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/bin/bash
builder:x:1000:1000:builder:/home/builder:/bin/bash
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
EOF
cat >"$root/etc/group" <<'EOF'
root:x:0:
builder:x:1000:
nogroup:x:65534:
EOF
chmod 644 "$root/etc/passwd" "$root/etc/group"

# A tar keeps the owners (builder's home) and modes (/tmp) exactly; ADD
# unpacks it. Fixed order and times keep the layer reproducible.
tar --sort=name --mtime=@0 --numeric-owner -C "$root" -cf "$work/rootfs.tar" .

cat >"$work/entrypoint.sh" <<'EOF'
#!/bin/sh
echo "entrypoint wrapper saw: $*" >&2
exec "$@"
EOF
chmod 755 "$work/entrypoint.sh"

FAILING_CMD='["/bin/sh", "-c", "echo image CMD ran >&2; exit 99"]'

cat >"$work/Dockerfile.base" <<EOF
FROM scratch
ADD rootfs.tar /
ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
LABEL $LABEL=$HASH
CMD $FAILING_CMD
EOF
cat >"$work/Dockerfile.nonroot" <<EOF
FROM $BASE
USER 1000:1000
EOF
cat >"$work/Dockerfile.entrypoint" <<EOF
FROM $BASE
COPY entrypoint.sh /entrypoint.sh
ENTRYPOINT ["/entrypoint.sh"]
CMD $FAILING_CMD
EOF

build() {
  local ref="$1" dockerfile="$2"
  say "docker build $ref"
  local out
  if ! out="$(docker build -q --network none -f "$work/$dockerfile" -t "$ref" "$work" 2>&1)"; then
    echo "$out" >&2
    die "docker build of $ref failed"
  fi
}
build "$BASE" Dockerfile.base
build "$NONROOT" Dockerfile.nonroot
build "$ENTRYPOINT" Dockerfile.entrypoint

for ref in "${PUBLIC_IMAGES[@]}"; do
  say "docker push $ref"
  docker push -q "$ref" >/dev/null || die "docker push of $ref failed"
done

say "skopeo copy $BASE -> $PRIVATE"
skopeo copy -q --src-tls-verify=false --dest-tls-verify=false \
  --dest-creds "$CREDS" "docker://$BASE" "docker://$PRIVATE" >/dev/null ||
  die "skopeo copy to $PRIVATE failed"

# No credentials for the auth registry may stay on disk for later tests.
docker logout "$AUTH" >/dev/null 2>&1 || true
podman logout "$AUTH" >/dev/null 2>&1 || true

sync_local_stores
registries_current || die "registries do not hold the images just pushed"
# Docker's build cache can hand back the very image a tag named before;
# keep those.
current_images=" "
for ref in "${PUBLIC_IMAGES[@]}"; do
  current_images+="docker:$(docker image inspect -f '{{.Id}}' "$ref" 2>/dev/null || true) "
  current_images+="podman:$(podman image inspect --format '{{.Id}}' "$ref" 2>/dev/null || true) "
done
for old in "${old_images[@]}"; do
  tool="${old%%:*}" id="${old#*:}"
  [[ -n "$id" && "$current_images" != *" $old "* ]] || continue
  # Fails, harmlessly, while a tag or a container still uses the image.
  "$tool" rmi "$id" >/dev/null 2>&1 || true
done
print_digests
