#!/usr/bin/env bash
# Installs the Debian packages Kiln needs to build, or to run its tests
# (Debian 12, run as root).
#
# Idempotent and fast when nothing is missing: packages already installed
# (per dpkg) are skipped, and `apt-get update` runs only when something must
# be installed and apt has no package lists yet.
set -euo pipefail

# Usage: install-deps.sh [build|test]   (default: test)
#   build: what building and running `kiln` needs;
#   test:  that, plus what the test suite drives.
#
# - g++, gcc, libc6-dev, binutils: the C/C++ toolchain for -sys build
#   scripts (zstd), and the one Bazel's cc rules autodetect; libc6-dev's
#   static libc.a also links Kiln's agent (crates/kiln-container/build.rs).
# - ca-certificates: cargo fetching crates over HTTPS.
# - nftables: `nft`, which installs the filtering and NAT rules of the
#   sandbox's bridged networks (dockerNetwork=bridge under `sandbox`).
# - bazel-bootstrap: Debian's Bazel 4.2.3, the real client driven by
#   crates/kiln/tests/bazel_remote_cache.rs (pulls in a JDK).
# Container isolation tests (scripts/services.sh starts the services,
# tests/images/build.sh builds the images; root only, so none of podman's
# rootless helpers — uidmap, slirp4netns, fuse-overlayfs — are needed):
# - docker.io: dockerd 20.10 and its client; pulls in containerd, runc,
#   tini (docker-init, for `docker run --init`) and iptables.
# - podman: podman 4.3 (pulls in conmon and containers-common).
# - runc: the OCI runtime both use; listed so podman's `crun | runc`
#   dependency is met by runc (crun rejects hybrid cgroup v1/v2 hosts).
# - netavark: podman's bridge network backend (a Recommends of
#   containers-common, so not installed by default; services.sh selects it).
# - iptables: the NAT/forwarding rules netavark sets up for bridge networks.
# - catatonit: the init process behind `podman run --init` (a Recommends).
# - docker-registry: Debian's distribution 2.8 registry; two local
#   instances (open, and with htpasswd auth) serve the test images.
# - skopeo: copies images between registries and reads their digests.
# - busybox-static: /bin/busybox and its applets, the test images' userland.
# - apache2-utils: htpasswd, for the bcrypt password file of the auth
#   registry.
# - iproute2: `ip`, with which the sandbox's network tests build a network
#   namespace standing for a machine outside the host.
# - procps: `kill`, which tests use to signal servers and actions
#   (missing from a minimal Debian, e.g. a debootstrap --variant=minbase).
# - chromium: the real browser the web UI's tests drive headless.
# MicroVM isolation (`firecracker`, crates/kiln-vm):
# - qemu-system-x86: the VMM (QEMU 7.2; TCG where KVM cannot run guests).
# - qemu-utils: `qemu-img`, the copy-on-write overlay over each VM's disk.
# - e2fsprogs: `mke2fs -d` builds ext4 disks from images and workspaces;
#   `debugfs` reads a guest's workspace disk without mounting it.
# - kmod: `depmod`, which indexes the guest kernel's modules (below).
# - npm: fetches Bazel 2.1.0 (below) by package name. Skipped when an
#   `npm` command is already there (e.g. a Node.js distribution's own
#   package, which conflicts with Debian's `npm`).
#
# Not a Debian package: Bazel 2.1.0, the older client that sends platform
# properties on the Command only (crates/kiln/tests/bazel_2_1.rs). The npm
# registry's @bazel/bazel-linux_x64 package ships its release binary; it is
# fetched with `npm pack` by name, checked against the SHA-512 below and
# unpacked to /usr/local/lib/kiln-test/bazel-2.1.0.
#
# Not installed as a package: the guest kernel of microVMs. Debian's
# linux-image-cloud-amd64 names the current cloud kernel package; it is
# downloaded (`apt-get download`, so apt checks it against the signed
# package lists), unpacked with `dpkg-deb -x` (nothing is installed on the
# host), its modules indexed with `depmod`, and copied to
# /usr/local/lib/kiln-vm: `vmlinuz`, `modules/` and `kernel.sha256` (Kiln
# pins the kernel by that digest in each VM's metadata and snapshot key).
#
# Last, `verify_tools` checks that every tool the tests look for is where
# they look, and fails naming each one that is not: a package that
# installed but left a tool elsewhere fails here, not deep in a test.
BUILD_PACKAGES=(
  g++
  gcc
  libc6-dev
  binutils
  ca-certificates
  nftables
)
TEST_PACKAGES=(
  bazel-bootstrap
  docker.io
  podman
  runc
  netavark
  iptables
  catatonit
  docker-registry
  skopeo
  busybox-static
  apache2-utils
  iproute2
  procps
  chromium
  qemu-system-x86
  qemu-utils
  e2fsprogs
  kmod
)

BAZEL2=/usr/local/lib/kiln-test/bazel-2.1.0
BAZEL2_PACKAGE=@bazel/bazel-linux_x64@2.1.0
BAZEL2_SHA512=6a0e99c183096e57f562e3e135100cc8261fd7ae2663c8e1748c0f495148d423220519d20c90644a0eeb5487333e1fbc1a9ed30ea027a3d30c4e77d45f3c6880

VM_DIR=/usr/local/lib/kiln-vm
VM_KERNEL_PACKAGE=linux-image-cloud-amd64

install_vm_kernel() {
  if [[ -f "$VM_DIR/vmlinuz" && -f "$VM_DIR/modules/modules.dep" && -f "$VM_DIR/kernel.sha256" ]]; then
    echo "install-deps: guest kernel present at $VM_DIR ($(cat "$VM_DIR/kernel.version"))"
    return
  fi
  if ! compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null; then
    "${SUDO[@]}" apt-get update
  fi
  local package version tmp
  package="$(apt-cache depends "$VM_KERNEL_PACKAGE" | awk '/Depends: linux-image-/ { print $2; exit }')"
  if [[ -z "$package" ]]; then
    echo "install-deps: error: $VM_KERNEL_PACKAGE names no kernel package (apt-cache depends)" >&2
    exit 1
  fi
  version="${package#linux-image-}"
  echo "install-deps: fetching the guest kernel $package"
  tmp="$(mktemp -d)"
  # As root into a private directory apt's sandbox user cannot enter:
  # say so, rather than have apt warn about it.
  (cd "$tmp" && apt-get -o APT::Sandbox::User=root download "$package" >/dev/null)
  dpkg-deb -x "$tmp"/"$package"_*.deb "$tmp/root"
  depmod -b "$tmp/root" "$version"
  "${SUDO[@]}" mkdir -p "$VM_DIR"
  "${SUDO[@]}" rm -rf "$VM_DIR/modules"
  "${SUDO[@]}" cp -a "$tmp/root/lib/modules/$version" "$VM_DIR/modules"
  "${SUDO[@]}" install -m 0644 "$tmp/root/boot/vmlinuz-$version" "$VM_DIR/vmlinuz"
  echo "$version" | "${SUDO[@]}" tee "$VM_DIR/kernel.version" >/dev/null
  sha256sum "$VM_DIR/vmlinuz" | awk '{ print $1 }' | "${SUDO[@]}" tee "$VM_DIR/kernel.sha256" >/dev/null
  rm -rf "$tmp"
  echo "install-deps: installed the guest kernel $version at $VM_DIR"
}

install_bazel2() {
  if [[ -x "$BAZEL2" ]]; then
    echo "install-deps: Bazel 2.1.0 present at $BAZEL2"
    return
  fi
  echo "install-deps: fetching Bazel 2.1.0 (npm pack $BAZEL2_PACKAGE)"
  local tmp tarball
  tmp="$(mktemp -d)"
  # npm trusts its own CA list unless told otherwise; Debian's system
  # store also holds any CA the machine's administrator installed (a
  # TLS-inspecting proxy's, say).
  local cafile=()
  [[ -f /etc/ssl/certs/ca-certificates.crt ]] && cafile=(--cafile=/etc/ssl/certs/ca-certificates.crt)
  # npm's own output is kept and shown only when it fails (`set -e` would
  # otherwise end the script here without a word about why).
  local npm_log
  if ! npm_log="$(cd "$tmp" && npm pack --loglevel=error "${cafile[@]}" "$BAZEL2_PACKAGE" 2>&1)"; then
    echo "install-deps: error: npm pack $BAZEL2_PACKAGE failed (certificates: ${cafile[*]:-the ones npm ships}):" >&2
    echo "$npm_log" >&2
    exit 1
  fi
  tarball="$(compgen -G "$tmp/*.tgz" | head -n 1)"
  if [[ -z "$tarball" ]]; then
    echo "install-deps: error: npm pack $BAZEL2_PACKAGE wrote no tarball" >&2
    exit 1
  fi
  echo "$BAZEL2_SHA512  $tarball" | sha512sum -c --quiet -
  tar -xzf "$tarball" -C "$tmp" package/bazel-2.1.0-linux-x86_64
  "${SUDO[@]}" install -D -m 0755 "$tmp/package/bazel-2.1.0-linux-x86_64" "$BAZEL2"
  rm -rf "$tmp"
  echo "install-deps: installed Bazel 2.1.0 at $BAZEL2"
}

# Every tool the test suite or scripts/services.sh and tests/images/build.sh
# run, as "what|where": a command name looked up on PATH, an absolute path
# that must be executable, or `file:PATH`, a file that must be there.
TEST_TOOLS=(
  "Bazel 4.2.3 (bazel-bootstrap)|bazel"
  "Bazel 2.1.0 (npm $BAZEL2_PACKAGE)|$BAZEL2"
  "dockerd (docker.io)|dockerd"
  "docker CLI (docker.io)|docker"
  "docker-init (tini, for docker run --init)|docker-init"
  "podman|podman"
  "runc|runc"
  "netavark (podman's network backend)|/usr/lib/podman/netavark"
  "catatonit (podman run --init)|/usr/bin/catatonit"
  "iptables|iptables"
  "nft (nftables)|nft"
  "ip (iproute2)|ip"
  "docker-registry|docker-registry"
  "skopeo|skopeo"
  "busybox (busybox-static, the test images' userland)|/bin/busybox"
  "htpasswd (apache2-utils)|htpasswd"
  "unshare (util-linux)|unshare"
  "kill (procps)|kill"
  "chromium (the web UI's tests)|chromium"
  "qemu-system-x86_64 (qemu-system-x86)|qemu-system-x86_64"
  "qemu-img (qemu-utils)|qemu-img"
  "mke2fs (e2fsprogs)|mke2fs"
  "debugfs (e2fsprogs)|debugfs"
  "guest kernel (linux-image-cloud-amd64, unpacked)|file:$VM_DIR/vmlinuz"
  "guest kernel modules index (depmod)|file:$VM_DIR/modules/modules.dep"
)

# Fails naming every test tool that is not where the tests look for it.
verify_tools() {
  local entry what where absent=()
  for entry in "${TEST_TOOLS[@]}"; do
    what="${entry%%|*}"
    where="${entry#*|}"
    if [[ "$where" == file:* ]]; then
      [[ -f "${where#file:}" ]] || absent+=("$what: no file ${where#file:}")
    elif [[ "$where" == /* ]]; then
      [[ -x "$where" ]] || absent+=("$what: no executable $where")
    else
      command -v "$where" >/dev/null || absent+=("$what: \`$where\` not on PATH ($PATH)")
    fi
  done
  if [[ ${#absent[@]} -gt 0 ]]; then
    echo "install-deps: error: after installing, tools the tests need are missing:" >&2
    printf '  - %s\n' "${absent[@]}" >&2
    exit 1
  fi
  echo "install-deps: all ${#TEST_TOOLS[@]} test tools are in place"
}

mode="${1:-test}"
case "$mode" in
  build) PACKAGES=("${BUILD_PACKAGES[@]}") ;;
  test) PACKAGES=("${BUILD_PACKAGES[@]}" "${TEST_PACKAGES[@]}") ;;
  *)
    echo "usage: $0 [build|test]" >&2
    exit 2
    ;;
esac

missing=()
for package in "${PACKAGES[@]}"; do
  # dpkg -s exits 0 for packages that are merely known (e.g. removed but
  # not purged); require the "install ok installed" status.
  status="$(dpkg-query -W -f='${Status}' "$package" 2>/dev/null || true)"
  if [[ "$status" != "install ok installed" ]]; then
    missing+=("$package")
  fi
done
# Debian's npm only where no npm is there: a Node.js distribution's own
# nodejs package ships npm and conflicts with Debian's.
if [[ "$mode" == test ]] && [[ ! -x "$BAZEL2" ]] && ! command -v npm >/dev/null; then
  missing+=(npm)
fi

SUDO=()
if [[ $EUID -ne 0 ]]; then
  SUDO=(sudo)
fi

# The installed version of a package, or nothing.
installed_version() {
  if [[ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true)" == "install ok installed" ]]; then
    dpkg-query -W -f='${Version}' "$1"
  fi
}

# qemu-img must come from the same QEMU as qemu-system-x86: Debian's
# qemu-system packages break a qemu-utils of another version, so on a
# machine that has a newer one (from backports, say) apt would remove it
# to install qemu-system-x86 and leave no qemu-img at all. Names
# qemu-utils at qemu-system-x86's version (installed, or else the one apt
# would install) whenever the two differ.
pin_qemu_utils() {
  [[ "$mode" == test ]] || return 0
  local system utils
  system="$(installed_version qemu-system-x86)"
  if [[ -z "$system" ]]; then
    system="$(apt-cache policy qemu-system-x86 | awk '$1 == "Candidate:" { print $2 }')"
  fi
  utils="$(installed_version qemu-utils)"
  if [[ -z "$system" || "$system" == "(none)" || "$utils" == "$system" ]]; then
    return 0
  fi
  if [[ -n "$utils" ]]; then
    echo "install-deps: qemu-utils $utils is not qemu-system-x86's version; installing qemu-utils $system"
  fi
  local kept=()
  for package in "${missing[@]}"; do
    [[ "$package" == qemu-utils || "$package" == qemu-utils=* ]] || kept+=("$package")
  done
  missing=("${kept[@]}" "qemu-utils=$system")
}

# Named apt_install, not install: a shell function named `install` would
# shadow /usr/bin/install for the rest of the script (it once made
# install_bazel2 run apt-get again and copy nothing). Downgrades are
# allowed for what is named with a version (qemu-utils, above).
apt_install() {
  "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y --no-install-recommends --allow-downgrades "${missing[@]}"
}

# Fresh containers ship without package lists; a populated cache is reused.
ensure_package_lists() {
  if ! compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null; then
    "${SUDO[@]}" apt-get update
  fi
}

if [[ "$mode" == test && "$(installed_version qemu-utils)" != "$(installed_version qemu-system-x86)" ]]; then
  ensure_package_lists
  pin_qemu_utils
fi

if [[ ${#missing[@]} -eq 0 ]]; then
  echo "install-deps: all packages present: ${PACKAGES[*]}"
else
  echo "install-deps: installing: ${missing[*]}"
  ensure_package_lists

  # Stale lists point at package versions the mirror no longer has; refresh
  # once and retry instead of failing the run.
  if ! apt_install; then
    echo "install-deps: install failed; refreshing package lists and retrying"
    "${SUDO[@]}" apt-get update
    if [[ " ${missing[*]} " == *" qemu-utils="* ]]; then
      pin_qemu_utils
    fi
    apt_install
  fi
fi

if [[ "$mode" == test ]]; then
  install_bazel2
  install_vm_kernel
  verify_tools
fi
