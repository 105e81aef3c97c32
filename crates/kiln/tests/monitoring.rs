//! The monitoring endpoint against real clients:
//! - a Prometheus scrape before and after a real Bazel build: the
//!   execution, Execute-RPC and CAS counters rise by what the build did,
//!   every family has HELP text, and no label carries a digest;
//! - gRPC health answers SERVING, and `/readyz` fails while the store is
//!   not open (a second server waiting for the data directory's lock);
//! - the web UI in a real headless Chromium after a real Bazel build: the
//!   overview lists the executor, the build's page lists its actions, a
//!   failing action's page shows its stderr, a queued action says why it
//!   waits, no page shows a registry password sent as a header, and no
//!   page logs a console message; screenshots go to the test's output.

#[path = "common/browser.rs"]
mod browser;
mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{combined, http_get, Bazel, KilnServer, ProcessSummary};

/// Upper bound for anything that could hang; never a pass/fail threshold.
const HANG_GUARD: Duration = Duration::from_secs(120);

const SECRET: &str = "kiln-ui-SECRET-4d2b8e9a17";

/// 5,000,000 bytes of output, the same every run: more than a batch
/// carries, so the executor streams it and the store keeps it in memory
/// for the download that follows.
const OUTPUT_BYTES: u64 = 5_000_000;

const BUILD: &str = r#"
genrule(
    name = "big",
    outs = ["big.txt"],
    cmd = "head -c 5000000 /dev/zero | tr '\\0' k > $@",
)

genrule(
    name = "broken",
    outs = ["broken.txt"],
    cmd = "echo 'compiling broken.c'; echo 'broken.c:3: error: expected a semicolon before kiln-ui-stderr-marker' >&2; exit 3",
)

# Both sleep: Bazel sends them in either order, and whichever gets the
# executor's one slot first, the other waits in the queue for seconds.
genrule(
    name = "slow",
    outs = ["slow.txt"],
    cmd = "sleep 8; echo slow > $@",
)

genrule(
    name = "waiting",
    outs = ["waiting.txt"],
    cmd = "sleep 8; echo waited > $@",
)
"#;

/// Every sample of a Prometheus text scrape: `name{labels}` → value.
fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            Some((series.to_string(), value.parse().ok()?))
        })
        .collect()
}

fn scrape(port: u16) -> (String, BTreeMap<String, f64>) {
    let (status, text) = http_get(port, "/metrics").expect("scrape /metrics");
    assert_eq!(status, 200, "/metrics answered {status}:\n{text}");
    let parsed = samples(&text);
    (text, parsed)
}

fn value(samples: &BTreeMap<String, f64>, series: &str) -> f64 {
    samples.get(series).copied().unwrap_or(0.0)
}

#[test]
fn a_bazel_build_moves_the_metrics_by_what_it_did() {
    if !common::bazel_available() {
        return;
    }
    let scratch = tempfile::Builder::new()
        .prefix("kiln-metrics-")
        .tempdir()
        .unwrap();
    let data_dir = scratch.path().join("kiln-data");
    let server = KilnServer::start(&data_dir, &scratch.path().join("kiln.log"), &[]);
    let bazel = Bazel::new(scratch.path(), common::remote_only_flags(server.port));
    let package = bazel.workspace.join("ui");
    fs::create_dir_all(&package).unwrap();
    fs::write(package.join("BUILD"), BUILD).unwrap();

    let (text, before) = scrape(server.monitoring_port);
    // Every family says what it measures.
    for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
        let name = line.split_whitespace().nth(2).unwrap();
        assert!(
            text.contains(&format!("# HELP {name} ")),
            "metric family {name} has no HELP text:\n{text}"
        );
    }

    let output = bazel.run_ok(&["build", "//ui:big"]);
    let remote = ProcessSummary::parse(&output).count("remote");
    assert!(remote >= 1, "nothing ran remotely:\n{output}");

    let (text, after) = scrape(server.monitoring_port);
    let delta = |series: &str| value(&after, series) - value(&before, series);
    assert_eq!(
        delta(r#"kiln_executions_total{outcome="success",isolation="none"}"#),
        remote as f64,
        "successful executions did not rise by the {remote} remote actions:\n{text}"
    );
    assert_eq!(
        delta(
            r#"kiln_grpc_requests_total{service="build.bazel.remote.execution.v2.Execution",method="Execute",code="Ok"}"#
        ),
        remote as f64,
        "Execute calls did not rise by the {remote} remote actions:\n{text}"
    );
    let written = delta("kiln_cas_written_bytes_total");
    let read = delta("kiln_cas_read_bytes_total");
    // The output was uploaded once and downloaded once; inputs, Actions and
    // Commands of a one-genrule build add a few KiB at most.
    let slack = 64.0 * 1024.0;
    assert!(
        (OUTPUT_BYTES as f64..OUTPUT_BYTES as f64 + slack).contains(&written),
        "CAS bytes written rose by {written}, expected {OUTPUT_BYTES} plus a little:\n{text}"
    );
    assert!(
        (OUTPUT_BYTES as f64..OUTPUT_BYTES as f64 + slack).contains(&read),
        "CAS bytes read rose by {read}, expected {OUTPUT_BYTES} plus a little:\n{text}"
    );
    assert!(
        delta(r#"kiln_execution_phase_duration_seconds_count{phase="execution"}"#) >= remote as f64,
        "no execution times were observed:\n{text}"
    );
    assert!(value(&after, "kiln_store_size_bytes") >= OUTPUT_BYTES as f64);
    // The output Bazel downloaded right after its upload is held in memory.
    assert!(
        value(&after, "kiln_store_recent_memory_bytes") >= OUTPUT_BYTES as f64,
        "the output is not among the recent blobs kept in memory:\n{text}"
    );
    assert_eq!(value(&after, r#"kiln_executors{pool="default"}"#), 1.0);

    // A second build of the same target is answered from the cache.
    bazel.run_ok(&["clean"]);
    let output = bazel.run_ok(&["build", "//ui:big"]);
    let hits = ProcessSummary::parse(&output).count("remote cache hit");
    let (text, last) = scrape(server.monitoring_port);
    assert!(
        value(&last, "kiln_action_cache_hits_total")
            - value(&after, "kiln_action_cache_hits_total")
            >= hits as f64,
        "Action Cache hits did not rise by Bazel's {hits} remote cache hits:\n{text}"
    );

    // No label value is a digest (32+ hex digits) or anything long.
    for series in last.keys() {
        for value in series.split('"').skip(1).step_by(2) {
            let digest_like = value.len() >= 32 && value.chars().all(|c| c.is_ascii_hexdigit());
            assert!(
                !digest_like && value.len() < 64,
                "label value {value:?} of {series} looks unbounded"
            );
        }
    }
    bazel.run_ok(&["shutdown"]);
}

/// A port nothing listens on now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread")]
async fn grpc_health_serves_and_readyz_waits_for_the_store() {
    let scratch = tempfile::tempdir().unwrap();
    let data_dir = scratch.path().join("kiln-data");
    let first = KilnServer::start(&data_dir, &scratch.path().join("first.log"), &[]);

    // gRPC health on the first server.
    let channel =
        tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{}", first.port))
            .unwrap()
            .connect()
            .await
            .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let answer = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("grpc.health.v1 Check")
        .into_inner();
    assert_eq!(
        answer.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    let (status, body) = http_get(first.monitoring_port, "/readyz").unwrap();
    assert_eq!((status, body.as_str()), (200, "ready\n"));
    let (status, _) = http_get(first.monitoring_port, "/healthz").unwrap();
    assert_eq!(status, 200);

    // A second server on the same data directory: alive, but not ready
    // while the first holds the store.
    let monitoring = free_port();
    let second_log = fs::File::create(scratch.path().join("second.log")).unwrap();
    let mut second = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["serve", "--listen", "127.0.0.1:0", "--monitoring-listen"])
        .arg(format!("127.0.0.1:{monitoring}"))
        .arg("--data-dir")
        .arg(&data_dir)
        .stdout(Stdio::null())
        .stderr(second_log)
        .spawn()
        .unwrap();
    let started = Instant::now();
    let not_ready = loop {
        assert!(
            started.elapsed() < HANG_GUARD,
            "the second server's endpoint never answered"
        );
        match http_get(monitoring, "/readyz") {
            Ok((503, body)) => break body,
            Ok((status, body)) => {
                panic!("/readyz answered {status} {body:?} while the store is held")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    assert!(not_ready.contains("opening the store"), "{not_ready:?}");
    assert_eq!(http_get(monitoring, "/healthz").unwrap().0, 200);

    // The first lets go: the second opens the store and becomes ready.
    drop(first);
    let started = Instant::now();
    loop {
        assert!(
            started.elapsed() < HANG_GUARD,
            "the second server never became ready:\n{}",
            fs::read_to_string(scratch.path().join("second.log")).unwrap_or_default()
        );
        if let Ok((200, _)) = http_get(monitoring, "/readyz") {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = second.kill();
    let _ = second.wait();
}

/// Where this test leaves its screenshots: `KILN_SCREENSHOT_DIR`, else the
/// test's temporary target directory.
fn screenshot_dir() -> PathBuf {
    let dir = std::env::var_os("KILN_SCREENSHOT_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("ui-screenshots"));
    fs::create_dir_all(&dir).unwrap();
    dir
}

/// The links to action pages in `dom`, with the row text around each.
fn operation_links(dom: &str) -> Vec<String> {
    dom.split("href=\"/operation/")
        .skip(1)
        .filter_map(|rest| rest.split('"').next())
        .map(|id| format!("/operation/{id}"))
        .collect()
}

#[test]
fn the_web_ui_shows_a_real_build_in_chromium() {
    if !common::bazel_available() || !common::chromium_available() {
        return;
    }
    let scratch = tempfile::Builder::new()
        .prefix("kiln-ui-")
        .tempdir()
        .unwrap();
    let data_dir = scratch.path().join("kiln-data");
    let server_log = scratch.path().join("kiln.log");
    // One action at a time, so a second one waits visibly in the queue.
    let server = KilnServer::start(&data_dir, &server_log, &["--concurrency", "1"]);
    let base = format!("http://127.0.0.1:{}", server.monitoring_port);
    let profile = scratch.path().join("chromium-profile");
    let bazel = Bazel::new(scratch.path(), common::remote_only_flags(server.port));
    let package = bazel.workspace.join("ui");
    fs::create_dir_all(&package).unwrap();
    fs::write(package.join("BUILD"), BUILD).unwrap();

    let header =
        format!("--remote_exec_header=x-buildbuddy-platform.container-registry-password={SECRET}");
    let output = bazel.run(&[
        "build",
        "--keep_going",
        "--remote_exec_header=x-buildbuddy-platform.container-registry-username=kiln-user",
        &header,
        "//ui:big",
        "//ui:broken",
    ]);
    let text = combined(&output);
    assert!(!output.status.success(), "//ui:broken built:\n{text}");
    assert!(text.contains("kiln-ui-stderr-marker"), "{text}");
    let invocation = text
        .lines()
        .find_map(|line| line.strip_prefix("INFO: Invocation ID: "))
        .unwrap_or_else(|| panic!("no invocation id in Bazel's output:\n{text}"))
        .trim()
        .to_string();

    let dir = screenshot_dir();
    let mut browser = browser::Browser::start(&profile);
    let mut pages = Vec::new();
    let mut console = Vec::new();
    // Each page is loaded in a real tab and left to run long enough for
    // one live update; its screenshot is saved as `shot`.
    let mut visit = |path: &str, shot: &str, width: u32, height: u32| -> String {
        let visit = browser.visit(
            &format!("{base}{path}"),
            width,
            height,
            Duration::from_millis(2600),
            Some(&dir.join(format!("{shot}.png"))),
        );
        console.extend(
            visit
                .console
                .into_iter()
                .map(|line| format!("{path}: {line}")),
        );
        pages.push((path.to_string(), visit.dom.clone()));
        visit.dom
    };

    // The overview lists the executor and the build.
    let overview = visit("/", "overview", 1280, 800);
    assert!(overview.contains("kiln-embedded/default"), "{overview}");
    assert!(overview.contains(&invocation), "{overview}");

    // The build's page lists its actions by target, the failure first.
    let build = visit(&format!("/build?id={invocation}"), "build", 1280, 800);
    let broken_at = build
        .find("//ui:broken")
        .unwrap_or_else(|| panic!("{build}"));
    let big_at = build.find("//ui:big").unwrap_or_else(|| panic!("{build}"));
    assert!(
        broken_at < big_at,
        "the failure is not listed first:\n{build}"
    );

    // The failing action's page shows its stderr and exit code.
    let broken_link = operation_links(&build)
        .into_iter()
        .next()
        .unwrap_or_else(|| panic!("no action links on the build page:\n{build}"));
    let broken = visit(&broken_link, "failed-action", 1280, 1000);
    visit(&broken_link, "failed-action-phone", 390, 844);
    assert!(broken.contains("kiln-ui-stderr-marker"), "{broken}");
    assert!(broken.contains("compiling broken.c"), "{broken}");
    assert!(broken.contains("Exit code"), "{broken}");
    // The header property is listed by name only.
    assert!(broken.contains("container-registry-password"), "{broken}");

    // The successful action offers its output for download.
    let big = visit(&operation_links(&build)[1], "successful-action", 1280, 800);
    let download = big
        .split("href=\"/blob/")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .map(|rest| format!("/blob/{}", rest.replace("&amp;", "&")))
        .unwrap_or_else(|| panic!("no download link on {big}"));
    let (status, body) = http_get(server.monitoring_port, &download).unwrap();
    assert_eq!(status, 200);
    assert_eq!(body.len() as u64, OUTPUT_BYTES);

    // One slow action holds the executor's one slot; the other waits, and
    // its page says why.
    let mut background = bazel.spawn(&["build", "--jobs=2", "//ui:slow", "//ui:waiting"]);
    let (queued_link, _) = waiting_page(server.monitoring_port);
    let queued = visit(&queued_link, "queued-action", 1280, 800);
    assert!(queued.contains("Why is this still queued?"), "{queued}");
    assert!(queued.contains("free slot"), "{queued}");
    let _ = background.wait();

    let operations = visit("/operations", "operations", 1280, 800);
    assert!(operations.contains("//ui:waiting"), "{operations}");
    visit("/", "overview-after", 1280, 800);
    drop(browser);
    eprintln!("screenshots in {}", dir.display());

    for (path, dom) in &pages {
        assert!(!dom.contains(SECRET), "{path} shows the registry password");
    }
    let (_, metrics) = http_get(server.monitoring_port, "/metrics").unwrap();
    assert!(
        !metrics.contains(SECRET),
        "/metrics shows the registry password"
    );
    assert!(
        console.is_empty(),
        "the pages logged to the console:\n{}",
        console.join("\n")
    );

    bazel.run_ok(&["shutdown"]);
    drop(server);
    common::assert_nowhere(SECRET, &[&server_log], &[&data_dir]);
}

/// The UI test's "no console messages" holds only if the harness sees
/// them: a page that logs an error, throws, and loads a missing script is
/// reported three times over.
#[test]
fn the_browser_harness_reports_console_errors() {
    if !common::chromium_available() {
        return;
    }
    let scratch = tempfile::tempdir().unwrap();
    let mut browser = browser::Browser::start(&scratch.path().join("profile"));
    let page = "data:text/html,<p>x</p><script>console.error('harness-marker')</script>\
                <script>null.boom()</script><script src='http://127.0.0.1:9/missing.js'></script>";
    let visit = browser.visit(page, 800, 600, Duration::from_millis(200), None);
    let console = visit.console.join("\n");
    assert!(console.contains("harness-marker"), "{console}");
    assert!(console.contains("exception"), "{console}");
    assert!(visit.dom.contains("<p>x</p>"), "{}", visit.dom);
}

/// The link and page of whichever of //ui:slow and //ui:waiting waits in
/// the queue behind the other (Bazel sends them in either order), once its
/// page has said why for a second: the one assigned first may be seen
/// queued for the moment before it is, the one that waits for eight
/// seconds. Bounded wait.
fn waiting_page(port: u16) -> (String, String) {
    let started = Instant::now();
    let mut first_seen: BTreeMap<String, Instant> = BTreeMap::new();
    loop {
        assert!(
            started.elapsed() < HANG_GUARD,
            "neither //ui:slow nor //ui:waiting waited in the queue"
        );
        let (_, list) = http_get(port, "/operations?state=queued").unwrap();
        for link in operation_links(&list) {
            let (_, page) = http_get(port, &link).unwrap();
            let ours = page.contains("//ui:waiting") || page.contains("//ui:slow");
            if !(ours && page.contains("Why is this still queued?")) {
                continue;
            }
            let since = *first_seen.entry(link.clone()).or_insert_with(Instant::now);
            if since.elapsed() >= Duration::from_secs(1) {
                return (link, page);
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_queued_action_says_why_until_no_executor_can_take_it() {
    if !common::bazel_available() {
        return;
    }
    let scratch = tempfile::tempdir().unwrap();
    let data_dir = scratch.path().join("kiln-data");
    let log = scratch.path().join("kiln.log");
    // No embedded executor: one executor process with one slot serves the
    // pool; actions it no longer serves wait 10 s before failing.
    let server = KilnServer::start(
        &data_dir,
        &log,
        &[
            "--embedded-executor",
            "false",
            "--unmatched-grace-ms",
            "10000",
        ],
    );
    let work = scratch.path().join("executor");
    common::open_to_actions(&work);
    let scheduler = format!("grpc://127.0.0.1:{}", server.port);
    let executor = common::Process::spawn(&[
        "executor",
        "--scheduler",
        &scheduler,
        "--pool",
        "lanes",
        "--property",
        "lane=a",
        "--capacity",
        "1",
        "--work-dir",
        work.to_str().unwrap(),
    ]);
    executor.wait_for_log("executor registered");

    let mut flags = common::remote_only_flags(server.port);
    flags.push("--remote_default_exec_properties=Pool=lanes".into());
    flags.push("--remote_default_exec_properties=lane=a".into());
    let bazel = Bazel::new(scratch.path(), flags);
    let package = bazel.workspace.join("ui");
    fs::create_dir_all(&package).unwrap();
    fs::write(package.join("BUILD"), BUILD).unwrap();
    std::thread::scope(|scope| {
        let build = scope.spawn(|| bazel.run(&["build", "--jobs=2", "//ui:slow", "//ui:waiting"]));
        the_queue_explains_itself(server.monitoring_port, executor);
        // After the grace, Bazel is told which property nothing serves.
        let output = build.join().unwrap();
        let text = combined(&output);
        assert!(!output.status.success(), "{text}");
        assert!(
            text.contains("no executor matches") && text.contains("lane=a"),
            "{text}"
        );
    });
    bazel.run_ok(&["shutdown"]);
}

/// While `executor` holds its one slot the other action's page says so;
/// once it is gone, the page says no executor matches.
fn the_queue_explains_itself(port: u16, executor: common::Process) {
    // One action holds the slot; the other's page says so.
    let (link, page) = waiting_page(port);
    assert!(page.contains("Why is this still queued?"), "{page}");
    assert!(page.contains("free slot"), "{page}");

    // The executor goes away: both wait for one that matches, and say so.
    drop(executor);
    let started = Instant::now();
    let page = loop {
        assert!(started.elapsed() < HANG_GUARD, "the page never said why");
        let (_, page) = http_get(port, &link).unwrap();
        if page.contains("no executor matches") {
            break page;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        page.contains("lane"),
        "the page does not name what is unmatched: {page}"
    );
}
