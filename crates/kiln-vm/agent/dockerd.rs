//! `init-dockerd`: the agent's `dockerd TCP WAIT_MS PATH` request. It loads
//! the kernel modules a Docker daemon needs (`/modules/dockerd-order` of
//! the initramfs, reached through a descriptor kept from before the switch
//! to the root disk), starts the image's `dockerd` (found on PATH, the
//! image's) in a session of its own with its log in [`LOG`], and waits
//! until it answers `GET /_ping` on [`SOCKET`], at most WAIT_MS. The answer
//! is `dockerd-ready MILLIS MODULES_MILLIS` (the whole start, and the
//! part spent loading modules), or `dockerd-failed MESSAGE` naming the
//! problem with the log's last lines.
//!
//! The daemon runs with its defaults (overlay2 storage under
//! /var/lib/docker on the root disk's overlay, the docker0 bridge, its
//! iptables rules), plus `tcp://0.0.0.0:2375` (without TLS) when TCP is
//! `1`. It outlives
//! the action; the agent reaps it like any orphan.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::{errno, syscall, EEXIST, SYS_FINIT_MODULE};

/// dockerd's API socket, where the action's `docker` looks by default.
pub const SOCKET: &str = "/var/run/docker.sock";
/// dockerd's stdout and stderr, kept in the guest.
pub const LOG: &str = "/var/log/kiln-dockerd.log";
/// How many of the log's last lines a failure quotes, and at most how
/// many bytes.
const TAIL_LINES: usize = 25;
const TAIL_BYTES: usize = 6000;

/// The initramfs's /modules, opened before the agent left it.
static MODULES_DIR: OnceLock<File> = OnceLock::new();
/// Whether the modules were loaded (once per VM).
static LOADED: OnceLock<()> = OnceLock::new();

/// Keeps a descriptor of the initramfs's `/modules`: after the switch to
/// the root disk, only `/proc/self/fd/N` reaches it.
pub fn keep_modules_dir() {
    if let Ok(dir) = File::open("/modules") {
        let _ = MODULES_DIR.set(dir);
    }
}

/// Handles `dockerd TCP WAIT_MS PATH`: the frame to answer with.
pub fn handle(fields: &[Vec<u8>]) -> Vec<Vec<u8>> {
    let text = |i: usize| fields.get(i).and_then(|f| std::str::from_utf8(f).ok());
    let request = match (
        text(0),
        text(1).and_then(|w| w.parse::<u64>().ok()),
        text(2),
    ) {
        (Some(tcp), Some(wait_ms), Some(path)) => Ok((tcp == "1", wait_ms, path)),
        _ => Err("malformed dockerd request".to_string()),
    };
    let started = Instant::now();
    let mut modules_took = Duration::ZERO;
    match request.and_then(|(tcp, wait_ms, path)| {
        load_modules()?;
        modules_took = started.elapsed();
        start(tcp, Duration::from_millis(wait_ms), path)
    }) {
        Ok(()) => vec![
            b"dockerd-ready".to_vec(),
            started.elapsed().as_millis().to_string().into_bytes(),
            modules_took.as_millis().to_string().into_bytes(),
        ],
        Err(why) => vec![b"dockerd-failed".to_vec(), why.into_bytes()],
    }
}

fn start(tcp: bool, wait: Duration, path: &str) -> Result<(), String> {
    // A warm VM's daemon, started for an earlier action, is kept.
    if ping() {
        return Ok(());
    }
    let program = find_on_path("dockerd", path).ok_or_else(|| {
        format!("the image has no dockerd on its PATH ({path}): init-dockerd needs an image with Docker installed")
    })?;
    let _ = std::fs::create_dir_all("/var/log");
    let log = File::create(LOG).map_err(|e| format!("creating {LOG}: {e}"))?;
    let log_too = log.try_clone().map_err(|e| format!("{LOG}: {e}"))?;
    let mut command = Command::new(&program);
    command.arg(format!("--host=unix://{SOCKET}"));
    if tcp {
        // Without TLS, on purpose (the port is reachable only inside the
        // VM: nothing forwards to it), and said explicitly, which spares
        // the 15 s dockerd 20.10 otherwise sleeps to warn about it.
        command.args(["--host=tcp://0.0.0.0:2375", "--tls=false"]);
    }
    let mut daemon = command
        .env_clear()
        .env("PATH", path)
        .env("HOME", "/root")
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_too)
        .process_group(0)
        .spawn()
        .map_err(|e| format!("starting {}: {e}", program.display()))?;
    let deadline = Instant::now() + wait;
    loop {
        if let Ok(Some(status)) = daemon.try_wait() {
            return Err(format!(
                "dockerd ({}) ended ({status}) before it answered on {SOCKET}; the last lines of \
                 its log ({LOG}):\n{}",
                program.display(),
                log_tail()
            ));
        }
        if ping() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "dockerd ({}) did not answer GET /_ping on {SOCKET} within {wait:?}; the last \
                 lines of its log ({LOG}):\n{}",
                program.display(),
                log_tail()
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Loads `/modules/dockerd-order` (file names, dependencies first), once.
fn load_modules() -> Result<(), String> {
    if LOADED.get().is_some() {
        return Ok(());
    }
    let dir = MODULES_DIR
        .get()
        .ok_or("the initramfs's /modules was not kept, so no kernel module can be loaded")?;
    let base = format!("/proc/self/fd/{}", dir.as_raw_fd());
    let order = std::fs::read_to_string(format!("{base}/dockerd-order"))
        .map_err(|e| format!("reading the initramfs's /modules/dockerd-order: {e}"))?;
    for name in order.lines().filter(|l| !l.is_empty()) {
        let file = File::open(format!("{base}/{name}"))
            .map_err(|e| format!("opening module {name}: {e}"))?;
        let no_options = c"";
        // SAFETY: an open descriptor and a NUL-terminated option string that outlive the call.
        let result = unsafe { syscall(SYS_FINIT_MODULE, file.as_raw_fd(), no_options.as_ptr(), 0) };
        if result != 0 && errno() != EEXIST {
            return Err(format!(
                "loading module {name}: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    let _ = LOADED.set(());
    Ok(())
}

fn find_on_path(name: &str, path: &str) -> Option<PathBuf> {
    path.split(':')
        .filter(|dir| !dir.is_empty())
        .map(|dir| Path::new(dir).join(name))
        .find(|candidate| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::metadata(candidate)
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// Whether the daemon answers `GET /_ping` with `200 OK`.
fn ping() -> bool {
    let Ok(mut stream) = UnixStream::connect(SOCKET) else {
        return false;
    };
    let bounded = Some(Duration::from_secs(2));
    if stream.set_read_timeout(bounded).is_err() || stream.set_write_timeout(bounded).is_err() {
        return false;
    }
    if stream
        .write_all(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut answer = Vec::new();
    let _ = stream.take(64 * 1024).read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    let status_ok = answer
        .lines()
        .next()
        .is_some_and(|line| line.starts_with("HTTP/1.") && line.contains(" 200"));
    status_ok && answer.ends_with("OK")
}

/// The last [`TAIL_LINES`] lines of [`LOG`], at most [`TAIL_BYTES`].
fn log_tail() -> String {
    let log = std::fs::read(LOG).unwrap_or_default();
    let text = String::from_utf8_lossy(&log);
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(TAIL_LINES)..].join("\n");
    if tail.is_empty() {
        return "(empty)".into();
    }
    let cut = tail.len().saturating_sub(TAIL_BYTES);
    let cut = (cut..=tail.len())
        .find(|&i| tail.is_char_boundary(i))
        .unwrap_or(0);
    tail[cut..].to_string()
}
