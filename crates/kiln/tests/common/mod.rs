//! Shared by the tests that drive a real Bazel against a real `kiln serve`:
//! the server child process, a Bazel client on a private copy of
//! `tests/bazel/workspace`, and the parser of Bazel's process summary.
// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

pub mod remote;
pub mod vm;

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// How long the server may take to print its listening line.
const SERVER_START_TIMEOUT: Duration = Duration::from_secs(60);

/// Whether Bazel can run here. Without it the test is skipped loudly, or
/// fails under CI, where it must be installed.
pub fn bazel_available() -> bool {
    if bazel_on_path() {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!(
            "bazel is not on PATH but CI is set: CI must run scripts/install-deps.sh \
             (Debian package bazel-bootstrap)"
        );
    }
    say_skipped("bazel not installed (run scripts/install-deps.sh)");
    false
}

const DEFAULT_BAZEL2: &str = "/usr/local/lib/kiln-test/bazel-2.1.0";

/// The upstream Bazel 2.1.0 binary (`scripts/install-deps.sh` puts it in
/// /usr/local/lib/kiln-test, or `KILN_BAZEL2`), or `None` (skipped loudly; a failure under CI,
/// where install-deps.sh must have installed it).
pub fn bazel2() -> Option<PathBuf> {
    let path =
        PathBuf::from(std::env::var_os("KILN_BAZEL2").unwrap_or_else(|| DEFAULT_BAZEL2.into()));
    if path.is_file() {
        return Some(path);
    }
    let reason = format!(
        "Bazel 2.1.0 not found at {} (run scripts/install-deps.sh)",
        path.display()
    );
    if std::env::var_os("CI").is_some() {
        panic!("{reason}, but CI is set");
    }
    say_skipped(&reason);
    None
}

fn bazel_on_path() -> bool {
    Command::new("bazel")
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

pub fn assert_test_passed(output: &str) {
    let passed = output
        .lines()
        .any(|line| line.starts_with("//hello:hello_test") && line.contains("PASSED"));
    assert!(passed, "//hello:hello_test did not pass:\n{output}");
}

/// Whether `uid`, as `id -u` prints it, is one of the uids a root
/// executor's actions run as by default (one per runner).
pub fn is_default_action_user(uid: &str) -> bool {
    let (first, last) = kiln::isolation::DEFAULT_ACTION_UIDS;
    uid.trim()
        .parse::<u32>()
        .is_ok_and(|uid| (first..=last).contains(&uid))
}

/// A shell command that prints `action-user` when it runs as one of a root
/// executor's default action users, with the group of the same number,
/// and otherwise its `uid:gid`.
pub fn who_runs_this() -> String {
    let (first, last) = kiln::isolation::DEFAULT_ACTION_UIDS;
    format!(
        "u=$(id -u); g=$(id -g); if [ $u -ge {first} ] && [ $u -le {last} ] && [ $g = $u ]; \
         then echo action-user; else echo $u:$g; fi"
    )
}

/// Lets a root server's actions reach their workspaces under `dir`: they
/// run as action users (uids of no user), who must traverse every directory down to the data or
/// work directory, and temporary directories are private (0700). Adds
/// search (not read) permission for others to `dir` and its ancestors
/// inside the temporary directory, creating `dir`.
pub fn open_to_actions(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    fs::create_dir_all(dir).expect("create the directory");
    let temp = std::env::temp_dir().canonicalize().unwrap();
    let dir = dir.canonicalize().unwrap();
    for ancestor in dir
        .ancestors()
        .take_while(|a| a.starts_with(&temp) && *a != temp)
    {
        let mode = fs::metadata(ancestor).unwrap().permissions().mode();
        fs::set_permissions(ancestor, fs::Permissions::from_mode(mode | 0o011)).unwrap();
    }
}

/// A `kiln` child process whose stderr lines arrive on a channel; killed
/// when dropped.
pub struct Process {
    pub child: Child,
    pub stderr: mpsc::Receiver<String>,
    stdout: Option<mpsc::Receiver<String>>,
}

impl Process {
    pub fn spawn(args: &[&str]) -> Process {
        let mut command = Command::new(env!("CARGO_BIN_EXE_kiln"));
        command.args(args);
        Process::spawn_command(command)
    }

    /// `command` (which runs kiln, perhaps through a wrapper such as `ip
    /// netns exec`), its stdout piped and its stderr on the channel.
    pub fn spawn_command(mut command: Command) -> Process {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|error| panic!("starting {:?}: {error}", command.get_program()));
        let stderr = lines_of(child.stderr.take().unwrap());
        Process {
            child,
            stderr,
            stdout: None,
        }
    }

    /// The next stdout line that starts with `prefix` (bounded wait).
    pub fn stdout_line_with(&mut self, prefix: &str) -> String {
        if self.stdout.is_none() {
            let pipe = self.child.stdout.take().expect("stdout is piped");
            self.stdout = Some(lines_of(pipe));
        }
        let lines = self.stdout.as_ref().unwrap();
        loop {
            let line = lines
                .recv_timeout(Duration::from_secs(120))
                .unwrap_or_else(|_| panic!("no stdout line starting with {prefix:?}"));
            if line.starts_with(prefix) {
                return line;
            }
        }
    }

    /// Waits for a stderr line containing `text` (the event, bounded).
    pub fn wait_for_log(&self, text: &str) {
        self.log_until_all(&[text]);
    }

    /// The stderr lines up to the one by which each of `texts` was seen
    /// (bounded wait).
    pub fn log_until_all(&self, texts: &[&str]) -> Vec<String> {
        let mut seen: Vec<String> = Vec::new();
        while !texts
            .iter()
            .all(|text| seen.iter().any(|line| line.contains(text)))
        {
            let line = self
                .stderr
                .recv_timeout(Duration::from_secs(120))
                .unwrap_or_else(|_| {
                    panic!(
                        "no log lines containing {texts:?}; saw:\n{}",
                        seen.join("\n")
                    )
                });
            seen.push(line);
        }
        seen
    }
}

/// The lines read from `pipe`, on a thread, as they come.
fn lines_of(pipe: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (sender, lines) = mpsc::channel();
    std::thread::spawn(move || {
        // Line by line as bytes: one that is not UTF-8 must not end the
        // reading.
        for line in BufReader::new(pipe).split(b'\n').map_while(Result::ok) {
            let _ = sender.send(String::from_utf8_lossy(&line).into_owned());
        }
    });
    lines
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `kiln serve` child process; killed when dropped.
pub struct KilnServer {
    child: Child,
    pub port: u16,
    /// Whether it listens with TLS (`listening grpcs://`).
    pub tls: bool,
    /// The monitoring endpoint's port (metrics, health, web UI).
    pub monitoring_port: u16,
    log_path: PathBuf,
}

impl KilnServer {
    pub fn start(data_dir: &Path, log_path: &Path, extra_args: &[&str]) -> Self {
        open_to_actions(data_dir);
        let log = fs::File::create(log_path).expect("create server log");
        let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .arg("serve")
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--monitoring-listen")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(data_dir)
            .args(extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("spawn kiln serve");

        // Read the listening line on a thread so a server that hangs before
        // printing it fails the test instead of hanging it.
        let stdout = child.stdout.take().expect("server stdout is piped");
        let (line_sender, line_receiver) = mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            // The gRPC address, then the monitoring endpoint's.
            for _ in 0..2 {
                let mut line = String::new();
                let result = reader.read_line(&mut line).map(|_| line);
                let _ = line_sender.send(result);
            }
            // Keep draining so a chatty server never blocks on a full pipe.
            let _ = std::io::copy(&mut reader, &mut std::io::sink());
        });

        let mut server = KilnServer {
            child,
            port: 0,
            tls: false,
            monitoring_port: 0,
            log_path: log_path.to_path_buf(),
        };
        let line = match line_receiver.recv_timeout(SERVER_START_TIMEOUT) {
            Ok(Ok(line)) => line,
            Ok(Err(error)) => panic!("reading kiln's stdout: {error}"),
            Err(_) => {
                panic!("kiln did not print its listening line within {SERVER_START_TIMEOUT:?}")
            }
        };
        server.tls = line_is_tls(&line);
        if line.is_empty() {
            let status = server.child.wait().expect("wait for kiln");
            panic!("kiln exited ({status}) before printing its listening line");
        }
        server.port = parse_listening_line(&line).unwrap_or_else(|| {
            panic!("kiln's first stdout line is not `listening grpc://127.0.0.1:PORT`: {line:?}")
        });
        let line = match line_receiver.recv_timeout(SERVER_START_TIMEOUT) {
            Ok(Ok(line)) => line,
            other => panic!("kiln did not print its monitoring line: {other:?}"),
        };
        server.monitoring_port = parse_monitoring_line(&line);
        server
    }
}

impl KilnServer {
    /// `kill -9`: the server gets no chance to sync or clean up.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits (bounded) for the server to exit; its status.
    pub fn terminate(mut self, within: Duration) -> std::process::ExitStatus {
        let pid = rustix::process::Pid::from_raw(self.child.id() as i32).expect("a child pid");
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).expect("SIGTERM kiln");
        let deadline = std::time::Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for kiln") {
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "kiln did not exit within {within:?} of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The containers of `runtime` that the `kiln serve` with `data_dir`
/// started (its owner label) and that still exist.
pub fn containers_of_server(runtime: &str, data_dir: &Path) -> Vec<String> {
    let filter = format!("label=kiln.owner=kiln-serve:{}", data_dir.display());
    let output = Command::new(runtime)
        .args(["ps", "-a", "--format", "{{.Names}}", "--filter", &filter])
        .output()
        .unwrap_or_else(|e| panic!("{runtime} ps: {e}"));
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

impl Drop for KilnServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let mut log = String::new();
            let _ = fs::File::open(&self.log_path).and_then(|mut f| f.read_to_string(&mut log));
            eprintln!(
                "---- kiln server log ({}) ----\n{log}",
                self.log_path.display()
            );
        }
    }
}

/// `kiln serve` without an embedded executor on `listen`, with its data
/// in `data_dir` (in memory unless `extra` picks a `--storage-backend`),
/// plus `extra`; it and the URL its listening line gives
/// (`grpc://ADDR`, or `grpcs://ADDR` with TLS).
pub fn serve_without_executor(listen: &str, data_dir: &Path, extra: &[&str]) -> (Process, String) {
    let mut args = vec![
        "serve",
        "--monitoring-listen",
        "127.0.0.1:0",
        "--listen",
        listen,
        "--data-dir",
        data_dir.to_str().unwrap(),
        "--embedded-executor",
        "false",
    ];
    if !extra.contains(&"--storage-backend") {
        args.extend(["--storage-backend", "memory"]);
    }
    args.extend_from_slice(extra);
    let mut server = Process::spawn(&args);
    let line = server.stdout_line_with("listening ");
    let url = line["listening ".len()..].trim().to_string();
    (server, url)
}

/// The port of kiln's `listening http://127.0.0.1:PORT (…)` line.
pub fn parse_monitoring_line(line: &str) -> u16 {
    line.strip_prefix("listening http://127.0.0.1:")
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|port| port.parse().ok())
        .unwrap_or_else(|| panic!("not kiln's `listening http://127.0.0.1:PORT …` line: {line:?}"))
}

/// The port of `listening grpc://127.0.0.1:PORT` (or `grpcs://`, with TLS).
pub fn parse_listening_line(line: &str) -> Option<u16> {
    let line = line.trim_end();
    line.strip_prefix("listening grpc://127.0.0.1:")
        .or_else(|| line.strip_prefix("listening grpcs://127.0.0.1:"))?
        .parse()
        .ok()
}

fn line_is_tls(line: &str) -> bool {
    line.starts_with("listening grpcs://")
}

/// A Bazel client with its own output root, working on a private copy of the
/// test workspace; its server is shut down and its files made deletable when
/// dropped.
pub struct Bazel {
    pub workspace: PathBuf,
    /// The client binary: Debian's `bazel` on PATH, or another release.
    binary: PathBuf,
    output_user_root: PathBuf,
    /// Flags added to every `build` and `test`: how Bazel reaches Kiln.
    remote_flags: Vec<String>,
}

impl Bazel {
    /// Debian's Bazel 4.2.3 on a copy of `tests/bazel/workspace`.
    pub fn new(scratch: &Path, remote_flags: Vec<String>) -> Self {
        Bazel::with_binary(Path::new("bazel"), "workspace", scratch, remote_flags)
    }

    /// `binary` on a copy of `tests/bazel/<workspace>`.
    pub fn with_binary(
        binary: &Path,
        workspace: &str,
        scratch: &Path,
        remote_flags: Vec<String>,
    ) -> Self {
        // Read at run time: a test binary reused from a shared target dir
        // may have been compiled in another clone.
        let manifest_dir =
            std::env::var("CARGO_MANIFEST_DIR").expect("cargo test sets CARGO_MANIFEST_DIR");
        let source = Path::new(&manifest_dir)
            .join("../../tests/bazel")
            .join(workspace);
        let copy = scratch.join("workspace");
        copy_tree(&source, &copy);
        Bazel {
            workspace: copy,
            binary: binary.to_path_buf(),
            output_user_root: scratch.join("bazel-root"),
            remote_flags,
        }
    }

    /// Runs one Bazel command, returns its stdout and stderr combined, and
    /// panics with that output if it failed.
    pub fn run_ok(&self, args: &[&str]) -> String {
        let output = self.run(args);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        // Captured by the test harness; shown when the test fails.
        eprintln!("---- bazel {} ----\n{text}", args.join(" "));
        assert!(
            output.status.success(),
            "`bazel {}` failed with {}:\n{text}",
            args.join(" "),
            output.status
        );
        text
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args)
            .output()
            .unwrap_or_else(|error| panic!("running bazel {}: {error}", args.join(" ")))
    }

    /// Starts one Bazel command in the background, its output discarded.
    pub fn spawn(&self, args: &[&str]) -> Child {
        self.command(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|error| panic!("starting bazel {}: {error}", args.join(" ")))
    }

    fn command(&self, args: &[&str]) -> Command {
        let (command, rest) = args.split_first().expect("a bazel command");
        let mut invocation = Command::new(&self.binary);
        invocation
            .current_dir(&self.workspace)
            .arg(format!(
                "--output_user_root={}",
                self.output_user_root.display()
            ))
            // Not the user's ~/.bazelrc. The system rc stays: Debian's
            // points Bazel at its install base.
            .arg("--nohome_rc")
            .arg("--host_jvm_args=-Xmx1g")
            // If the test dies without `bazel shutdown`, the server still goes.
            .arg("--max_idle_secs=300")
            .arg(command);
        if matches!(*command, "build" | "test") {
            invocation.args(&self.remote_flags).args([
                "--color=no",
                "--curses=no",
                "--jobs=2",
                "--remote_timeout=60",
            ]);
        }
        invocation
            .args(rest)
            .stdin(Stdio::null())
            // Bazel must talk to 127.0.0.1 directly.
            .env_remove("http_proxy")
            .env_remove("https_proxy")
            .env_remove("HTTP_PROXY")
            .env_remove("HTTPS_PROXY")
            .env_remove("grpc_proxy")
            .env_remove("GRPC_PROXY_EXP");
        invocation
    }

    /// The bytes of `paths` (relative to the workspace).
    pub fn read_outputs(&self, paths: &[&'static str]) -> BTreeMap<&'static str, Vec<u8>> {
        paths
            .iter()
            .map(|relative| {
                let path = self.workspace.join(relative);
                let bytes = fs::read(&path)
                    .unwrap_or_else(|error| panic!("reading {}: {error}", path.display()));
                (*relative, bytes)
            })
            .collect()
    }
}

impl Drop for Bazel {
    fn drop(&mut self) {
        if self.output_user_root.exists() {
            let _ = self.run(&["shutdown"]);
            // Bazel leaves read-only files and directories behind, which
            // would keep the scratch directory from being removed.
            make_writable(&self.output_user_root);
        }
    }
}

/// Spawn counts from Bazel's closing line, e.g.
/// `INFO: 7 processes: 4 remote cache hit, 3 internal.`
#[derive(Debug)]
pub struct ProcessSummary {
    pub total: u64,
    pub by_kind: BTreeMap<String, u64>,
}

impl ProcessSummary {
    pub fn parse(output: &str) -> Self {
        output
            .lines()
            .rev()
            .find_map(Self::parse_line)
            .unwrap_or_else(|| {
                panic!("no `INFO: N processes: ...` line in Bazel output:\n{output}")
            })
    }

    pub fn parse_line(line: &str) -> Option<Self> {
        let rest = line.trim().strip_prefix("INFO: ")?;
        let (total, rest) = rest.split_once(' ')?;
        let total = total.parse().ok()?;
        let rest = rest
            .strip_prefix("processes")
            .or_else(|| rest.strip_prefix("process"))?;
        let rest = rest.strip_suffix('.').unwrap_or(rest);
        let mut by_kind = BTreeMap::new();
        if let Some(kinds) = rest.strip_prefix(": ") {
            for part in kinds.split(", ") {
                let (count, kind) = part.split_once(' ')?;
                *by_kind.entry(kind.to_string()).or_default() += count.parse::<u64>().ok()?;
            }
        } else if !rest.is_empty() {
            return None;
        }
        Some(ProcessSummary { total, by_kind })
    }

    pub fn count(&self, kind: &str) -> u64 {
        self.by_kind.get(kind).copied().unwrap_or(0)
    }

    pub fn assert_all_remote_cache_hits(&self, what: &str) {
        let unexpected: Vec<_> = self
            .by_kind
            .iter()
            .filter(|(kind, _)| !matches!(kind.as_str(), "remote cache hit" | "internal"))
            .collect();
        assert!(
            unexpected.is_empty(),
            "{what}: every action should be a remote cache hit, but Bazel ran {unexpected:?} \
             ({self:?})"
        );
        assert!(
            self.count("remote cache hit") > 0,
            "{what}: no remote cache hits ({self:?})"
        );
        assert_eq!(
            self.total,
            self.by_kind.values().sum::<u64>(),
            "{what}: process counts do not add up ({self:?})"
        );
    }
}

pub fn copy_tree(source: &Path, destination: &Path) {
    fs::create_dir_all(destination)
        .unwrap_or_else(|error| panic!("creating {}: {error}", destination.display()));
    for entry in
        fs::read_dir(source).unwrap_or_else(|error| panic!("listing {}: {error}", source.display()))
    {
        let entry = entry.expect("directory entry");
        let name = entry.file_name();
        // Convenience symlinks from someone's local Bazel run in the source.
        if name.to_string_lossy().starts_with("bazel-") {
            continue;
        }
        let from = entry.path();
        let to = destination.join(&name);
        let file_type = entry.file_type().expect("file type");
        if file_type.is_dir() {
            copy_tree(&from, &to);
        } else if file_type.is_file() {
            // fs::copy keeps the permission bits, so scripts stay executable.
            fs::copy(&from, &to).unwrap_or_else(|error| {
                panic!("copying {} to {}: {error}", from.display(), to.display())
            });
        }
    }
}

pub fn make_writable(root: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let Ok(metadata) = fs::symlink_metadata(root) else {
        return;
    };
    if metadata.file_type().is_symlink() {
        return;
    }
    let mut permissions = metadata.permissions();
    permissions.set_mode(permissions.mode() | 0o700);
    let _ = fs::set_permissions(root, permissions);
    if metadata.is_dir() {
        if let Ok(entries) = fs::read_dir(root) {
            for entry in entries.flatten() {
                make_writable(&entry.path());
            }
        }
    }
}

/// A plain HTTP/1.1 GET of `path` on 127.0.0.1:`port`: the status code and
/// the body. Enough for the monitoring endpoint, with no client library.
pub fn http_get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    http_get_with(port, path, &[])
}

/// [`http_get`] with extra request headers (`Name: value` lines).
pub fn http_get_with(port: u16, path: &str, headers: &[&str]) -> std::io::Result<(u16, String)> {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(std::time::Duration::from_secs(30)))?;
    let extra: String = headers.iter().map(|h| format!("{h}\r\n")).collect();
    stream.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}Connection: close\r\n\r\n")
            .as_bytes(),
    )?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let text = String::from_utf8_lossy(&response).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {head:?}")))?;
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    Ok((status, body))
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if size == 0 || rest.len() < size {
            break;
        }
        out.push_str(&rest[..size]);
        body = rest[size..].trim_start_matches("\r\n");
    }
    out
}

/// Whether Debian's Chromium is installed. Under CI a missing browser is a
/// failure, not a skip.
pub fn chromium_available() -> bool {
    if Path::new("/usr/bin/chromium").exists() {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("/usr/bin/chromium is missing but CI is set: CI must run scripts/install-deps.sh (Debian package chromium)");
    }
    say_skipped("chromium not installed (run scripts/install-deps.sh)");
    false
}

/// Prints a skip notice straight to the process's stderr (the harness
/// captures `eprintln!`, and a skip must show in a passing run).
pub fn say_skipped(reason: &str) {
    let banner = "*".repeat(62);
    let _ = std::io::stderr()
        .write_all(format!("\n{banner}\nskipped: {reason}\n{banner}\n").as_bytes());
}

/// Whether this test runs as root, which `what` needs (mounting a file
/// system, say). If not, the test is skipped loudly, or fails under CI,
/// which runs as root.
pub fn root_available(what: &str) -> bool {
    if rustix::process::geteuid().is_root() {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("{what} needs root, and CI is set (CI runs the tests as root)");
    }
    say_skipped(&format!("{what} needs root"));
    false
}

/// The arguments of `kiln executor` `name` taking actions from
/// `scheduler` (a `grpc://` or `grpcs://` address) in pool `procs`, one at
/// a time, in `work_dir`.
pub fn executor_args(scheduler: &str, name: &str, work_dir: &Path) -> Vec<std::ffi::OsString> {
    let mut args: Vec<std::ffi::OsString> = [
        "executor",
        "--scheduler",
        scheduler,
        "--pool",
        "procs",
        "--name",
        name,
        "--capacity",
        "1",
        "--work-dir",
    ]
    .iter()
    .map(Into::into)
    .collect();
    args.push(work_dir.into());
    args
}

/// A tmpfs of a fixed size mounted on a fresh temporary directory: a small
/// disk a test can fill. Unmounted when dropped (also when the test fails;
/// lazily, should a process still hold a file in it).
pub struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (e.g. `24m`). Needs root.
    pub fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().expect("a mount point");
        let output = Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={size}"))
            .arg("kiln-test")
            .arg(dir.path())
            .output()
            .expect("run mount");
        assert!(
            output.status.success(),
            "mounting a tmpfs on {}: {}",
            dir.path().display(),
            String::from_utf8_lossy(&output.stderr)
        );
        Tmpfs { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("--lazy")
            .arg(self.dir.path())
            .status();
    }
}

/// Whether the container runtime `name` (`docker` or `podman`) answers
/// here. Under CI, where `.ci/run` starts it, a missing runtime is a
/// failure, not a skip.
pub fn runtime_available(name: &str) -> bool {
    let probe = match name {
        "docker" => Command::new("docker").arg("version").output(),
        _ => Command::new(name).arg("info").output(),
    };
    let reason = match probe {
        Ok(output) if output.status.success() => return true,
        Ok(output) => String::from_utf8_lossy(&output.stderr).trim().to_string(),
        Err(error) => error.to_string(),
    };
    if std::env::var_os("CI").is_some() {
        panic!("{name} does not work but CI is set (scripts/services.sh start): {reason}");
    }
    say_skipped(&format!(
        "{name} is not available (run scripts/install-deps.sh and scripts/services.sh start): {reason}"
    ));
    false
}

/// Builds and pushes the test images (`tests/images/build.sh`, a no-op
/// when they are current) once per test process.
pub fn test_images() -> Result<(), String> {
    static BUILT: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let manifest_dir =
                std::env::var("CARGO_MANIFEST_DIR").expect("cargo test sets CARGO_MANIFEST_DIR");
            let script = Path::new(&manifest_dir).join("../../tests/images/build.sh");
            let output = Command::new("bash")
                .arg(&script)
                .stdin(Stdio::null())
                .output()
                .map_err(|e| format!("running {}: {e}", script.display()))?;
            if output.status.success() {
                Ok(())
            } else {
                Err(format!(
                    "{} failed: {}{}",
                    script.display(),
                    String::from_utf8_lossy(&output.stdout),
                    String::from_utf8_lossy(&output.stderr)
                ))
            }
        })
        .clone()
}

/// Files under `root` whose bytes contain `needle`.
pub fn files_containing(root: &Path, needle: &[u8]) -> Vec<PathBuf> {
    files_under(root)
        .into_iter()
        .filter(|path| {
            let bytes = fs::read(path).unwrap_or_default();
            bytes.windows(needle.len()).any(|window| window == needle)
        })
        .collect()
}

/// The regular files under `root` whose names start with `prefix`.
pub fn files_named_like(root: &Path, prefix: &str) -> Vec<PathBuf> {
    files_under(root)
        .into_iter()
        .filter(|path| {
            path.file_name()
                .is_some_and(|name| name.to_string_lossy().starts_with(prefix))
        })
        .collect()
}

/// Every regular file under `root`, at any depth.
fn files_under(root: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(directory) = pending.pop() {
        let Ok(entries) = fs::read_dir(&directory) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            if kind.is_dir() {
                pending.push(path);
            } else if kind.is_file() {
                found.push(path);
            }
        }
    }
    found
}

/// Asserts that `secret` appears in none of `files` and in no file under
/// any of `trees` (logs, data directories: every stored blob).
pub fn assert_nowhere(secret: &str, files: &[&Path], trees: &[&Path]) {
    let secret = secret.as_bytes();
    for file in files {
        let contents = fs::read(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        assert!(
            !contents
                .windows(secret.len())
                .any(|window| window == secret),
            "{} contains a secret",
            file.display()
        );
    }
    for tree in trees {
        let leaked = files_containing(tree, secret);
        assert!(leaked.is_empty(), "files hold a secret: {leaked:?}");
    }
}

/// Stdout and stderr of a finished command, as one text.
pub fn combined(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Bazel flags that send every spawn to the Kiln server on `port`:
/// nothing may run on the client machine.
pub fn remote_only_flags(port: u16) -> Vec<String> {
    vec![
        format!("--remote_executor=grpc://127.0.0.1:{port}"),
        "--spawn_strategy=remote".into(),
        "--genrule_strategy=remote".into(),
        "--strategy=TestRunner=remote".into(),
    ]
}

/// Sets `path`'s mode to 0755.
pub fn make_executable(path: &Path) {
    use std::os::unix::fs::PermissionsExt as _;
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).unwrap();
}
