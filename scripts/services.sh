#!/usr/bin/env bash
# Starts, stops or reports the local services Kiln's container-isolation
# tests drive (Debian 12, run as root; scripts/install-deps.sh installs the
# packages). scripts/test.sh runs `services.sh start` before `cargo test`.
#
# Usage: services.sh start|stop|status
#
#   start   Idempotent, and fast when everything already runs. Brings up:
#           - dockerd in the background (--iptables=false, default bridge
#             docker0, default data-root /var/lib/docker), logging to
#             /var/log/kiln-test/dockerd.log; waits until `docker version`
#             answers. A dockerd that already answers is reused as is.
#           - podman's system configuration, so that plain `podman run` as
#             root works with no extra environment variables:
#             /etc/containers/containers.conf.d/50-kiln-test.conf (runtime
#             runc, cgroupfs, explicit nofile/nproc ulimits no higher than
#             this shell's hard limits, file event log, netavark,
#             catatonit for --init) and
#             /etc/containers/registries.conf.d/50-kiln-test.conf (the two
#             registries below are plain-HTTP "insecure" registries).
#           - two registries (Debian's docker-registry, distribution 2.8),
#             each with its config and storage under /var/lib/kiln-test:
#               127.0.0.1:5000  open (no auth)
#               127.0.0.1:5001  htpasswd auth: user `kiln`,
#                               password `Kiln-Test-Secret-7f3a9c`
#             logging to /var/log/kiln-test/registry-<port>.log, pid files in
#             /run/kiln-test; waits until each answers GET /v2/.
#           Every wait is bounded; on timeout it prints the log's last lines
#           and exits non-zero.
#   stop    Stops what `start` started (by the pid files it wrote); leaves
#           the podman configuration and the registries' storage in place.
#   status  Prints what runs; exits 0 only if every service answers.
#
# Test images: tests/images/build.sh builds and pushes them (it expects
# `start` to have run).
#
# Notes for callers:
# - podman: a `--ulimit` on the command line replaces the configured
#   default_ulimits list as a whole, and podman then asks for 1048576 for
#   the type left out, which fails here; pass both nofile and nproc (at
#   most the values in 50-kiln-test.conf) or neither. The process calling
#   podman needs hard limits at least as high as those values.
# - Bridge networking works in both: docker's default bridge (docker0,
#   172.17.0.0/16) and podman's netavark "podman" network (10.88.0.0/16);
#   `--network none` and `--network host` work too. Without iptables
#   rules from dockerd (--iptables=false) containers reach no outside
#   network, which the tests do not need (loopback-only host).
# - Never start a second dockerd with --bridge=none on this host: dockerd
#   deletes an existing docker0 when its bridge is disabled, breaking the
#   running dockerd's default network.
set -euo pipefail

LOG_DIR=/var/log/kiln-test
RUN_DIR=/run/kiln-test
STATE_DIR=/var/lib/kiln-test

REGISTRY_USER=kiln
REGISTRY_PASSWORD=Kiln-Test-Secret-7f3a9c
OPEN_PORT=5000
AUTH_PORT=5001

DOCKERD_PIDFILE="$RUN_DIR/dockerd.pid"
PODMAN_CONF=/etc/containers/containers.conf.d/50-kiln-test.conf
PODMAN_REGISTRIES=/etc/containers/registries.conf.d/50-kiln-test.conf

say() {
  echo "services: $*"
}

die() {
  echo "services: error: $*" >&2
  exit 1
}

# Prints the last lines of a log file to stderr, for failure reports.
show_log() {
  local log="$1"
  if [[ -f "$log" ]]; then
    echo "---- last lines of $log ----" >&2
    tail -n 30 "$log" >&2
    echo "----" >&2
  fi
}

pid_alive() {
  local pidfile="$1" pid
  [[ -f "$pidfile" ]] || return 1
  pid="$(cat "$pidfile" 2>/dev/null || true)"
  [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null
}

# ---- dockerd ---------------------------------------------------------------

docker_answers() {
  timeout 5 docker version --format '{{.Server.Version}}' >/dev/null 2>&1
}

start_dockerd() {
  local log="$LOG_DIR/dockerd.log"
  if docker_answers; then
    say "dockerd: already answering"
    return
  fi
  if pid_alive "$DOCKERD_PIDFILE"; then
    say "dockerd: started earlier (pid $(cat "$DOCKERD_PIDFILE")), not answering yet"
  else
    say "dockerd: starting (log: $log)"
    # setsid: the daemon must not die with the calling session or receive
    # the terminal's signals. dockerd starts its own containerd.
    setsid dockerd --iptables=false >>"$log" 2>&1 </dev/null &
    echo $! >"$DOCKERD_PIDFILE"
  fi
  local i
  for ((i = 0; i < 120; i++)); do
    if docker_answers; then
      say "dockerd: answering (after ~$((i / 2))s)"
      return
    fi
    if ! pid_alive "$DOCKERD_PIDFILE"; then
      show_log "$log"
      die "dockerd exited during startup"
    fi
    sleep 0.5
  done
  show_log "$log"
  die "dockerd did not answer \`docker version\` within 60s"
}

stop_dockerd() {
  if ! pid_alive "$DOCKERD_PIDFILE"; then
    rm -f "$DOCKERD_PIDFILE"
    if docker_answers; then
      say "dockerd: running but not started by services.sh; left alone"
    else
      say "dockerd: not running"
    fi
    return
  fi
  local pid i
  pid="$(cat "$DOCKERD_PIDFILE")"
  say "dockerd: stopping pid $pid"
  kill -TERM "$pid"
  # dockerd stops its containers (10 s grace each) and its containerd.
  for ((i = 0; i < 60; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.5
  done
  if kill -0 "$pid" 2>/dev/null; then
    show_log "$LOG_DIR/dockerd.log"
    die "dockerd (pid $pid) did not exit within 30s"
  fi
  rm -f "$DOCKERD_PIDFILE"
}

# ---- podman configuration --------------------------------------------------

# Writes $2 to $1 only if the content differs (keeps `start` cheap and the
# file's mtime stable).
write_if_changed() {
  local path="$1" content="$2"
  if [[ -f "$path" ]] && [[ "$(cat "$path")" == "$content" ]]; then
    return 1
  fi
  mkdir -p "$(dirname "$path")"
  printf '%s\n' "$content" >"$path.tmp.$$"
  mv -f "$path.tmp.$$" "$path"
}

# The smallest of the given numbers ("unlimited" counts as infinite).
min_of() {
  local best="" v
  for v in "$@"; do
    [[ "$v" == unlimited ]] && continue
    if [[ -z "$best" ]] || ((v < best)); then best="$v"; fi
  done
  echo "${best:-unlimited}"
}

configure_podman() {
  # Rootful podman 4.3 asks runc for nofile and nproc of 1048576 unless
  # containers.conf says otherwise, and root here lacks CAP_SYS_RESOURCE,
  # so runc's setrlimit fails ("error setting rlimit type 7/6: operation
  # not permitted"). Ask for no more than podman itself has: the caller's
  # hard limits, and for nproc at most 32768 (podman 4.3 runs conmon/runc
  # with nproc capped at 32768 here, measured) and pid_max.
  local nofile nproc
  nofile="$(min_of "$(ulimit -Hn)" "$(cat /proc/sys/fs/nr_open)" 1048576)"
  nproc="$(min_of "$(ulimit -Hu)" "$(cat /proc/sys/kernel/pid_max)" 32768)"
  local conf
  conf="# Written by Kiln's scripts/services.sh for the container tests.
[containers]
# Root without CAP_SYS_RESOURCE cannot raise limits past its hard limits.
# A --ulimit on the command line replaces this whole list: pass both.
default_ulimits = [
  \"nofile=$nofile:$nofile\",
  \"nproc=$nproc:$nproc\",
]
# --init runs catatonit (Debian's path; it also ships podman's default
# /usr/libexec/podman/catatonit symlink).
init_path = \"/usr/bin/catatonit\"

[engine]
# crun rejects the hybrid cgroup v1/v2 layout; runc copes.
runtime = \"runc\"
# No systemd: podman manages cgroups itself and logs events to a file.
cgroup_manager = \"cgroupfs\"
events_logger = \"file\"

[network]
network_backend = \"netavark\""
  if write_if_changed "$PODMAN_CONF" "$conf"; then
    say "podman: wrote $PODMAN_CONF"
  fi

  local registries
  registries="# Written by Kiln's scripts/services.sh: the test registries speak HTTP.
[[registry]]
location = \"127.0.0.1:$OPEN_PORT\"
insecure = true

[[registry]]
location = \"127.0.0.1:$AUTH_PORT\"
insecure = true"
  if write_if_changed "$PODMAN_REGISTRIES" "$registries"; then
    say "podman: wrote $PODMAN_REGISTRIES"
  fi
}

# ---- registries ------------------------------------------------------------

# The HTTP status of GET /v2/ on 127.0.0.1:$1 (empty if nothing answers).
# Plain bash (/dev/tcp), so no curl is needed.
v2_status() {
  local port="$1"
  # shellcheck disable=SC2016 # expanded by the inner bash
  timeout 3 bash -c '
    exec 3<>"/dev/tcp/127.0.0.1/$1" || exit 1
    printf "GET /v2/ HTTP/1.0\r\nHost: 127.0.0.1:%s\r\n\r\n" "$1" >&3
    IFS=" " read -r _ status _ <&3 && echo "$status"
  ' _ "$port" 2>/dev/null || true
}

# The status /v2/ must answer with: 200 open, 401 with auth.
expected_status() {
  if [[ "$1" == "$AUTH_PORT" ]]; then echo 401; else echo 200; fi
}

write_registry_config() {
  local port="$1" dir="$STATE_DIR/registry-$1"
  mkdir -p "$dir/storage"
  local auth=""
  if [[ "$port" == "$AUTH_PORT" ]]; then
    local htpasswd="$dir/htpasswd"
    # bcrypt is the only hash distribution accepts; regenerate only if the
    # stored one does not match (htpasswd -v checks it).
    if ! htpasswd -vb "$htpasswd" "$REGISTRY_USER" "$REGISTRY_PASSWORD" >/dev/null 2>&1; then
      htpasswd -Bbn "$REGISTRY_USER" "$REGISTRY_PASSWORD" >"$htpasswd.tmp"
      mv -f "$htpasswd.tmp" "$htpasswd"
    fi
    auth="auth:
  htpasswd:
    realm: kiln-test
    path: $htpasswd
"
  fi
  write_if_changed "$dir/config.yml" "# Written by Kiln's scripts/services.sh.
version: 0.1
log:
  level: info
  fields:
    service: kiln-test-registry-$port
storage:
  filesystem:
    rootdirectory: $dir/storage
  delete:
    enabled: true
  cache:
    blobdescriptor: inmemory
http:
  addr: 127.0.0.1:$port
  headers:
    X-Content-Type-Options: [nosniff]
${auth}" || true
}

start_registry() {
  local port="$1"
  local pidfile="$RUN_DIR/registry-$port.pid"
  local log="$LOG_DIR/registry-$port.log"
  local want status
  want="$(expected_status "$port")"
  status="$(v2_status "$port")"
  if [[ -n "$status" ]] && pid_alive "$pidfile"; then
    [[ "$status" == "$want" ]] ||
      die "registry on 127.0.0.1:$port answers /v2/ with $status, expected $want"
    say "registry 127.0.0.1:$port: already answering"
    return
  fi
  if [[ -n "$status" ]]; then
    die "127.0.0.1:$port is taken by a process services.sh did not start" \
      "(/v2/ answered '$status'); e.g. Debian's own docker-registry service"
  fi
  write_registry_config "$port"
  if ! pid_alive "$pidfile"; then
    say "registry 127.0.0.1:$port: starting (log: $log)"
    setsid docker-registry serve "$STATE_DIR/registry-$port/config.yml" \
      >>"$log" 2>&1 </dev/null &
    echo $! >"$pidfile"
  fi
  local i
  for ((i = 0; i < 100; i++)); do
    status="$(v2_status "$port")"
    if [[ "$status" == "$want" ]]; then
      say "registry 127.0.0.1:$port: answering"
      return
    fi
    if ! pid_alive "$pidfile"; then
      show_log "$log"
      die "registry 127.0.0.1:$port exited during startup"
    fi
    sleep 0.1
  done
  show_log "$log"
  die "registry 127.0.0.1:$port did not answer /v2/ with $want within 10s" \
    "(last: '${status}')"
}

stop_registry() {
  local port="$1" pidfile="$RUN_DIR/registry-$1.pid" pid i
  if ! pid_alive "$pidfile"; then
    rm -f "$pidfile"
    say "registry 127.0.0.1:$port: not running"
    return
  fi
  pid="$(cat "$pidfile")"
  say "registry 127.0.0.1:$port: stopping pid $pid"
  kill -TERM "$pid"
  for ((i = 0; i < 50; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null; then
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$pidfile"
}

# ---- commands --------------------------------------------------------------

cmd_start() {
  mkdir -p "$LOG_DIR" "$RUN_DIR" "$STATE_DIR"
  configure_podman
  start_registry "$OPEN_PORT"
  start_registry "$AUTH_PORT"
  start_dockerd
}

cmd_stop() {
  stop_dockerd
  stop_registry "$OPEN_PORT"
  stop_registry "$AUTH_PORT"
}

cmd_status() {
  local ok=0 status
  if docker_answers; then
    say "dockerd: answering ($(docker version --format '{{.Server.Version}}'))"
  else
    say "dockerd: NOT answering"
    ok=1
  fi
  local port
  for port in "$OPEN_PORT" "$AUTH_PORT"; do
    status="$(v2_status "$port")"
    if [[ "$status" == "$(expected_status "$port")" ]]; then
      say "registry 127.0.0.1:$port: answering (/v2/ -> $status)"
    else
      say "registry 127.0.0.1:$port: NOT answering (/v2/ -> '${status}')"
      ok=1
    fi
  done
  if [[ -f "$PODMAN_CONF" && -f "$PODMAN_REGISTRIES" ]]; then
    say "podman: configured ($PODMAN_CONF, $PODMAN_REGISTRIES)"
  else
    say "podman: NOT configured"
    ok=1
  fi
  return "$ok"
}

if [[ $EUID -ne 0 ]]; then
  die "run as root (dockerd, /etc/containers, /var/lib/kiln-test)"
fi

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  *)
    echo "usage: $0 start|stop|status" >&2
    exit 2
    ;;
esac
