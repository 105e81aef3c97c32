//! The `kiln` binary as an operator meets it: default config, the
//! listening line, JSON logs, clean shutdown on SIGTERM and SIGINT, and
//! clear errors for a bad config.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};

fn kiln() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
}

/// `kiln serve` on free loopback ports (gRPC and monitoring).
fn serve_on_free_ports() -> Command {
    let mut command = kiln();
    command.args([
        "serve",
        "--monitoring-listen",
        "127.0.0.1:0",
        "--listen",
        "127.0.0.1:0",
    ]);
    command
}

/// Starts `kiln serve` and returns it with the address it printed.
fn serve(data_dir: &std::path::Path, extra: &[&str]) -> (Child, String) {
    common::open_to_actions(data_dir);
    let mut child = serve_on_free_ports()
        .arg("--data-dir")
        .arg(data_dir)
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kiln starts");
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening grpc://")
        .unwrap_or_else(|| panic!("unexpected first stdout line {line:?}"))
        .to_string();
    (child, addr)
}

fn signal(child: &Child, name: &str) {
    let status = Command::new("kill")
        .args([&format!("-{name}"), &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

fn stderr_of(mut child: Child) -> (std::process::ExitStatus, String) {
    let status = child.wait().unwrap();
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    (status, stderr)
}

#[test]
fn print_default_is_a_complete_loadable_config() {
    let output = kiln().args(["config", "print-default"]).output().unwrap();
    assert!(output.status.success());
    let text = String::from_utf8(output.stdout).unwrap();
    assert!(text.contains("listen = \"127.0.0.1:1985\""), "{text}");
    assert!(
        text.contains("[storage]") && text.contains("max_size = \"10GiB\""),
        "{text}"
    );
    // It is the defaults, every setting of them, each under its
    // documentation (the same as the flag's help).
    let parsed: kiln::config::Config = toml::from_str(&text).unwrap();
    assert_eq!(parsed, kiln::config::Config::default());
    let lines: Vec<&str> = text.lines().collect();
    let mut settings = 0;
    for (i, line) in lines.iter().enumerate() {
        if line.contains(" = ") && !line.starts_with('#') {
            settings += 1;
            assert!(lines[i - 1].starts_with("# "), "{line} has no comment");
        }
    }
    assert!(settings > 80, "{settings} settings:\n{text}");
    for section in [
        "[executor]",
        "[execution.isolation.sandbox]",
        "[execution.inputs]",
    ] {
        assert!(text.contains(section), "{section} missing:\n{text}");
    }
    let help = kiln().args(["serve", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(
        help.contains("Blobs up to this size are cached in the memory tier")
            && text.contains("# Blobs up to this size are cached in the memory tier"),
        "{help}"
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kiln.toml");
    // The printed default, with a test port, is accepted as a config file.
    std::fs::write(&path, text.replace("127.0.0.1:1985", "127.0.0.1:0")).unwrap();
    let (child, addr) = serve(dir.path(), &["--config", path.to_str().unwrap()]);
    assert!(addr.starts_with("127.0.0.1:"));
    signal(&child, "TERM");
    assert!(stderr_of(child).0.success());
}

#[test]
fn sigterm_and_sigint_stop_the_server_cleanly() {
    for name in ["TERM", "INT"] {
        let dir = tempfile::tempdir().unwrap();
        let (child, _) = serve(dir.path(), &[]);
        signal(&child, name);
        let (status, stderr) = stderr_of(child);
        assert!(status.success(), "SIG{name}: {status:?}\n{stderr}");
        assert!(stderr.contains("stopped cleanly"), "{stderr}");
        // What the store needs to restart is on disk.
        assert!(dir.path().join("cas/checkpoint").exists());
    }
}

#[test]
fn json_logs_are_one_object_per_line() {
    let dir = tempfile::tempdir().unwrap();
    let (child, _) = serve(dir.path(), &["--log-format", "json"]);
    signal(&child, "TERM");
    let (status, stderr) = stderr_of(child);
    assert!(status.success());
    let lines: Vec<&str> = stderr.lines().collect();
    assert!(lines.len() >= 2, "{stderr}");
    for line in lines {
        assert!(
            line.starts_with('{') && line.ends_with('}') && line.contains("\"level\""),
            "not a JSON log line: {line}"
        );
    }
}

#[test]
fn bad_configs_fail_with_a_message_naming_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "[storage]\nmax_size = \"lots\"\n").unwrap();
    let output = serve_on_free_ports()
        .arg("--config")
        .arg(&path)
        .arg("--data-dir")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("max_size") && stderr.contains("lots"),
        "{stderr}"
    );

    std::fs::write(&path, "lisen = \"127.0.0.1:0\"\n").unwrap();
    let output = kiln()
        .args(["serve", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("lisen") && stderr.contains("bad.toml"),
        "{stderr}"
    );
}

#[test]
fn a_flag_wins_over_the_file_and_the_file_over_the_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kiln.toml");
    // The file's data_dir cannot be made; the flag's wins. Its log format
    // (no flag given) is used.
    std::fs::write(
        &path,
        "data_dir = \"/proc/kiln-nowhere\"\n[log]\nformat = \"json\"\n\
         [storage]\nsync_interval = \"250ms\"\n",
    )
    .unwrap();
    let (child, _) = serve(dir.path(), &["--config", path.to_str().unwrap()]);
    signal(&child, "TERM");
    let (status, stderr) = stderr_of(child);
    assert!(status.success(), "{stderr}");
    assert!(dir.path().join("cas/checkpoint").exists(), "{stderr}");
    for line in stderr.lines() {
        assert!(line.starts_with('{'), "not a JSON log line: {line}");
    }
}

#[test]
fn old_keys_and_flags_with_a_unit_suffix_still_work() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("old.toml");
    std::fs::write(
        &path,
        "shutdown_grace_ms = 5000\n[storage]\nsync_interval_ms = 500\n",
    )
    .unwrap();
    let (child, _) = serve(
        dir.path(),
        &[
            "--config",
            path.to_str().unwrap(),
            "--bytestream-idle-timeout-ms",
            "30000",
            "--unmatched-grace-ms=200",
        ],
    );
    signal(&child, "TERM");
    let (status, stderr) = stderr_of(child);
    assert!(status.success(), "{stderr}");
    assert!(
        stderr.contains("storage.sync_interval_ms is now storage.sync_interval"),
        "{stderr}"
    );
}

#[test]
fn a_bad_size_or_duration_is_refused_naming_the_setting() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    for (file, setting, hint) in [
        (
            "[storage]\nsync_interval = \"soon\"\n",
            "sync_interval",
            "soon",
        ),
        (
            "[execution]\nunmatched_grace = 200\n",
            "unmatched_grace",
            "\"200ms\"",
        ),
        (
            "[executor]\ncache_size = \"5 furlongs\"\n",
            "cache_size",
            "unknown unit",
        ),
    ] {
        std::fs::write(&path, file).unwrap();
        let output = serve_on_free_ports()
            .arg("--config")
            .arg(&path)
            .arg("--data-dir")
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(!output.status.success());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains(setting) && stderr.contains(hint) && stderr.contains("bad.toml"),
            "{stderr}"
        );
    }
    let output = serve_on_free_ports()
        .args(["--bytestream-idle-timeout", "10"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--bytestream-idle-timeout") && stderr.contains("needs a unit"),
        "{stderr}"
    );
}

#[test]
fn an_executor_takes_its_settings_from_the_config_file() {
    // The sandbox probe reaches its mount point only on a root executor.
    if !common::root_available("probing the sandbox") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // A sandbox root mount point that cannot be made (under a file).
    let blocker = dir.path().join("a-file");
    std::fs::write(&blocker, "").unwrap();
    let mount_point = blocker.join("sandbox-root");
    let path = dir.path().join("kiln.toml");
    std::fs::write(
        &path,
        format!(
            "[executor]\nscheduler = \"grpc://127.0.0.1:1\"\nwork_dir = {work:?}\n\
             monitoring_listen = \"127.0.0.1:0\"\n\
             [execution.isolation]\noffer = [\"sandbox\"]\n\
             [execution.isolation.sandbox]\nroot_mount_point = {mount:?}\n",
            work = dir.path().join("work").display().to_string(),
            mount = mount_point.display().to_string(),
        ),
    )
    .unwrap();
    // The sandbox probe uses the file's mount point: it fails, and with
    // nothing else offered the executor refuses to start, saying why.
    let output = kiln()
        .args(["executor", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("creating {}", mount_point.display()))
            && stderr.contains("none of the configured isolation types (sandbox)"),
        "{stderr}"
    );
    // A flag wins over the file: with `none` offered it starts, and its
    // monitoring endpoint (from the file) says so.
    let mut executor = common::Process::spawn(&[
        "executor",
        "--config",
        path.to_str().unwrap(),
        "--isolation",
        "none",
    ]);
    let line = executor.stdout_line_with("listening http://");
    assert!(line.contains("127.0.0.1:"), "{line}");
}

#[test]
fn an_executor_declaring_a_property_kiln_interprets_is_refused_at_once() {
    let output = kiln()
        .args([
            "executor",
            "--scheduler",
            "grpc://127.0.0.1:1",
            "--property",
            "OSFamily=darwin",
        ])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("declared property OSFamily") && stderr.contains("--os-family"),
        "{stderr}"
    );
}

#[test]
fn a_second_server_on_the_same_data_dir_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (first, _) = serve(dir.path(), &[]);
    let output = serve_on_free_ports()
        .arg("--data-dir")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("another kiln"), "{stderr}");
    signal(&first, "TERM");
    assert!(stderr_of(first).0.success());
}

/// Runs `kiln serve` on free ports with `data_dir` and `more` flags,
/// which must refuse to start: its stderr.
fn refused_start(
    data_dir: &std::path::Path,
    more: impl IntoIterator<Item = impl AsRef<std::ffi::OsStr>>,
) -> String {
    let mut child = serve_on_free_ports()
        .arg("--data-dir")
        .arg(data_dir)
        .args(more)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let reading = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    // Bounded: a server that started all the same would run on.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("it started all the same:\n{}", reading.join().unwrap());
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let stderr = reading.join().unwrap();
    assert!(!status.success(), "it started all the same:\n{stderr}");
    stderr
}

/// A root server keeps no capability to read or write past an owner and a
/// mode: a data directory or a key file of another user's is refused at
/// start, saying why and what to do, not deep in opening the store.
#[test]
fn a_root_server_refuses_a_data_dir_or_key_it_cannot_use() {
    if !common::root_available("a root server's capabilities") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let theirs = dir.path().join("theirs");
    std::fs::create_dir(&theirs).unwrap();
    std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
    let stderr = refused_start(&theirs.join("kiln"), [""; 0]);
    assert!(
        stderr.contains("--data-dir")
            && stderr.contains("uid 65534")
            && stderr.contains("chown root:"),
        "{stderr}"
    );
    assert!(!theirs.join("kiln").exists(), "it wrote there all the same");

    // A key file closed to root by its owner: refused the same way, and
    // never read.
    let key = theirs.join("key.pem");
    std::fs::write(&key, "not read").unwrap();
    std::os::unix::fs::chown(&key, Some(65534), Some(65534)).unwrap();
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let flags = ["--tls-cert", "/dev/null", "--tls-key"].map(std::ffi::OsStr::new);
    let stderr = refused_start(
        &dir.path().join("ours"),
        flags.iter().chain([&key.as_os_str()]),
    );
    assert!(
        stderr.contains("--tls-key")
            && stderr.contains("not readable")
            && stderr.contains("uid 65534"),
        "{stderr}"
    );
}

/// A range of action users is refused at start when it holds a user of
/// this machine (an action running as one could reach their files), naming
/// the uid and the user; so is a range that is empty or holds root.
#[test]
fn a_range_of_action_users_holding_a_user_of_the_machine_is_refused() {
    if !common::root_available("a root server's action users") {
        return;
    }
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap();
    let (name, uid) = passwd
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            Some((
                fields.first()?.to_string(),
                fields.get(2)?.parse::<u32>().ok()?,
            ))
        })
        .filter(|(_, uid)| (1..1000).contains(uid))
        .min_by_key(|(_, uid)| *uid)
        .expect("a system user below uid 1000");
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("kiln");
    let refused = |range: &str, more: &[&str]| {
        refused_start(&data_dir, ["--action-user", range].iter().chain(more))
    };
    let stderr = refused("1-999", &[]);
    assert!(
        stderr.contains("--action-user 1-999")
            && stderr.contains(&format!("uid {uid} "))
            && stderr.contains(&name),
        "{stderr}"
    );
    for bad in ["0-10", "10-5", "5-4294967295"] {
        let stderr = refused(bad, &[]);
        assert!(stderr.contains(&format!("--action-user {bad}")), "{stderr}");
    }
    // Fewer uids than runners may be held at once (one running action,
    // two warm runners, one directory being emptied per CPU).
    let first = kiln::isolation::DEFAULT_ACTION_UIDS.0;
    let few = format!("{first}-{}", first + 2);
    let stderr = refused(&few, &["--concurrency", "1", "--max-warm-runners", "2"]);
    assert!(
        stderr.contains(&format!("--action-user {few} holds 3 uids"))
            && stderr.contains("--max-warm-runners"),
        "{stderr}"
    );
}

/// A server killed with SIGKILL (no shutdown, no final sync) restarts with
/// every blob it acknowledged: the journal and data were written before
/// the acknowledgement, and start-up re-verifies what the last checkpoint
/// did not cover.
#[tokio::test]
async fn a_killed_server_restarts_with_everything_it_acknowledged() {
    use kiln_proto::reapi::content_addressable_storage_client::ContentAddressableStorageClient;
    use kiln_proto::reapi::{
        batch_update_blobs_request, BatchUpdateBlobsRequest, Digest, FindMissingBlobsRequest,
    };

    let dir = tempfile::tempdir().unwrap();
    // A long commit interval: nothing is checkpointed before the kill.
    let (mut child, addr) = serve(dir.path(), &["--sync-interval-ms", "3600000"]);
    let blobs: Vec<Vec<u8>> = (0..200u32)
        .map(|i| {
            format!("blob number {i}")
                .repeat(i as usize + 1)
                .into_bytes()
        })
        .collect();
    let digests: Vec<Digest> = blobs.iter().map(|b| kiln_cas::wire::digest_of(b)).collect();
    let mut client = ContentAddressableStorageClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let response = client
        .batch_update_blobs(BatchUpdateBlobsRequest {
            requests: blobs
                .iter()
                .zip(&digests)
                .map(|(data, digest)| batch_update_blobs_request::Request {
                    digest: Some(digest.clone()),
                    data: data.clone(),
                    compressor: 0,
                })
                .collect(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(response
        .responses
        .iter()
        .all(|r| r.status.as_ref().unwrap().code == 0));
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();

    // This client keeps its connection open, as Bazel does: the stop below
    // must not wait for it longer than the shutdown grace.
    let (restarted, addr) = serve(dir.path(), &["--shutdown-grace-ms", "300"]);
    let mut client = ContentAddressableStorageClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let missing = client
        .find_missing_blobs(FindMissingBlobsRequest {
            blob_digests: digests,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .missing_blob_digests;
    assert!(missing.is_empty(), "{} blobs lost", missing.len());
    signal(&restarted, "TERM");
    assert!(stderr_of(restarted).0.success());
}

#[test]
fn bench_cas_reports_the_upload_cpu_per_gib() {
    let dir = tempfile::tempdir().unwrap();
    let (mut server, addr) = serve(&dir.path().join("data"), &["--storage-backend", "memory"]);
    let output = kiln()
        .args(["bench", "cas", "--server", &format!("grpc://{addr}")])
        .args(["--server-pid", &server.id().to_string()])
        // Enough to take several of /proc's 10 ms CPU ticks.
        .args(["--large-size", "64MiB", "--small-count", "100"])
        .args(["--bytestream-count", "20"])
        .output()
        .unwrap();
    let _ = server.kill();
    let _ = server.wait();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // `upload cpu   N core-s of server CPU per GiB verified (SHA-256 alone here: M)`
    let line = stdout
        .lines()
        .find(|line| line.starts_with("upload cpu"))
        .unwrap_or_else(|| panic!("no upload cpu line:\n{stdout}"));
    let figure: f64 = line
        .split_whitespace()
        .nth(2)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no figure in {line:?}"));
    assert!(figure > 0.0, "{line}");
    assert!(
        line.contains("core-s of server CPU per GiB verified"),
        "{line}"
    );
}
