//! Warm runners (`recycle-runner=true`) driven by a real Bazel against
//! `kiln serve` offering `none` and `sandbox`:
//! - a second sandbox action with the same runner key sees what the first
//!   left in its /tmp; one with another `runner-recycling-key` does not;
//! - `preserve-workspace`: the previous action's leftover file stays, its
//!   declared output is gone, a changed input has its new content, an input
//!   that disappeared is gone, and `clean-workspace-inputs` removed what it
//!   matched (as the action user, and as root, whose workspace is an
//!   overlay that keeps its upper layer);
//! - under `none`, no process the first action left (`setsid` included) is
//!   alive during the second, which ran warm;
//! - a runner whose action failed, timed out, was OOM-killed or left
//!   `.KILN_DO_NOT_RECYCLE` is not reused;
//! - a warm-runner option without `recycle-runner` is refused, naming it;
//! - under `docker` and `podman`, a warm runner is one container: a second
//!   action with the same key sees the first's /tmp and the process it
//!   left running, one with another key does not, a failed, timed-out or
//!   OOM-killed action's runner is not reused, `preserve-workspace` holds as under the others, and an
//!   input that an action (root in its container) overwrote is whole
//!   again for the runner's next action; a server that stops removes its
//!   runners' containers.

mod common;

use std::fs;
use std::path::Path;

use common::{combined, Bazel, KilnServer};

/// BUILD files cannot define functions.
const DEFS: &str = r#"
def warm(key, isolation = "sandbox", extra = {}):
    properties = {
        "workload-isolation-type": isolation,
        "dockerNetwork": "off",
        "recycle-runner": "true",
        "runner-recycling-key": key,
    }
    properties.update(extra)
    return properties
"#;

const BUILD: &str = r#"
load(":defs.bzl", "warm")

# Leaves a token in the runner's /tmp; the readers say whether they see it.
LEAVE = "echo left-by-first > /tmp/kiln-runner-token; echo wrote > $@"
READ = "cat /tmp/kiln-runner-token > $@ 2>/dev/null || echo saw-nothing > $@"

genrule(name = "tmp_first", outs = ["tmp_first.txt"], cmd = LEAVE, exec_properties = warm("tmp"))
genrule(name = "tmp_second", srcs = [":tmp_first"], outs = ["tmp_second.txt"], cmd = READ, exec_properties = warm("tmp"))
genrule(name = "tmp_other_key", srcs = [":tmp_first"], outs = ["tmp_other_key.txt"], cmd = READ, exec_properties = warm("other"))

# Each leaves the token, then fails in its own way; its reader comes with
# the same properties (so the same runner key) in a later build.
genrule(name = "fail_first", outs = ["fail_first.txt"], cmd = "echo left > /tmp/kiln-runner-token; exit 3", exec_properties = warm("fail"))
genrule(name = "fail_second", outs = ["fail_second.txt"], cmd = READ, exec_properties = warm("fail"))
genrule(name = "timeout_first", outs = ["timeout_first.txt"], cmd = "echo left > /tmp/kiln-runner-token; sleep 30", exec_properties = warm("timeout", extra = {"default-timeout": "2s"}))
genrule(name = "timeout_second", outs = ["timeout_second.txt"], cmd = READ, exec_properties = warm("timeout", extra = {"default-timeout": "2s"}))
genrule(
    name = "oom_first",
    outs = ["oom_first.txt"],
    cmd = "echo left > /tmp/kiln-runner-token; x=$$(head -c 200000000 /dev/zero | tr '\\0' a); echo $${#x} > $@",
    exec_properties = warm("oom", extra = {"EstimatedMemory": "64MB"}),
)
genrule(name = "oom_second", outs = ["oom_second.txt"], cmd = READ, exec_properties = warm("oom", extra = {"EstimatedMemory": "64MB"}))
genrule(name = "marked_first", outs = ["marked_first.txt"], cmd = "echo left > /tmp/kiln-runner-token; touch .KILN_DO_NOT_RECYCLE; echo wrote > $@", exec_properties = warm("marked"))
genrule(name = "marked_second", srcs = [":marked_first"], outs = ["marked_second.txt"], cmd = READ, exec_properties = warm("marked"))

# The same action twice, its inputs changed in between: it reports what it
# finds of the previous run, then leaves files of its own.
PRESERVE = " ".join([
    "{ echo leftover=$$(cat leftover.txt 2>/dev/null || echo none);",
    "if test -e $@; then echo previous_output=present; else echo previous_output=absent; fi;",
    "echo input=$$(cat runners/inputs/data.txt);",
    "if test -e runners/inputs/gone.txt; then echo gone=present; else echo gone=absent; fi;",
    "if test -e junk/stale.o; then echo junk=present; else echo junk=absent; fi;",
    "if test -e kept/note.txt; then echo kept=present; else echo kept=absent; fi; } > $@.tmp;",
    "echo run-$$(cat runners/inputs/data.txt) > leftover.txt;",
    "mkdir -p junk kept; echo x > junk/stale.o; echo x > kept/note.txt;",
    "mv $@.tmp $@",
])
PRESERVING = {"preserve-workspace": "true", "clean-workspace-inputs": "junk/**"}

genrule(name = "preserve_none", srcs = glob(["inputs/*"]), outs = ["preserve_none.txt"], cmd = PRESERVE, exec_properties = warm("preserve", "none", PRESERVING))
genrule(name = "preserve_sandbox", srcs = glob(["inputs/*"]), outs = ["preserve_sandbox.txt"], cmd = PRESERVE, exec_properties = warm("preserve", extra = PRESERVING))

# As root in the sandbox, the workspace is an overlay: what it writes, and
# its change to an input, land in the upper layer the runner keeps.
genrule(
    name = "preserve_sandbox_root",
    srcs = glob(["inputs/*"]),
    outs = ["preserve_sandbox_root.txt"],
    cmd = PRESERVE + "; chmod u+w runners/inputs/data.txt; echo changed-by-root > runners/inputs/data.txt",
    exec_properties = warm("preserve", extra = dict(PRESERVING, dockerRunAsRoot = "true")),
)

# Under none: a daemon out of the first action's process group, and a
# second action in the same (warm) runner that looks for it.
genrule(name = "daemon_first", outs = ["daemon_first.txt"], cmd = "sh -c 'setsid sleep 300 </dev/null >/dev/null 2>&1 & echo $$!' > $@", exec_properties = warm("daemon", "none"))
genrule(
    name = "daemon_second",
    srcs = [":daemon_first"],
    outs = ["daemon_second.txt"],
    cmd = "p=$$(cat $(location :daemon_first)); if grep -q sleep /proc/$$p/cmdline 2>/dev/null; then echo alive > $@; else echo gone > $@; fi",
    exec_properties = warm("daemon", "none"),
)

genrule(name = "preserve_alone", outs = ["preserve_alone.txt"], cmd = "echo ran > $@", exec_properties = {"preserve-workspace": "true"})
"#;

/// `key=value` lines of an output.
fn value(text: &str, key: &str) -> String {
    text.lines()
        .find_map(|line| line.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= in {text:?}"))
        .trim()
        .to_string()
}

/// The `bazel-bin/runners/NAME.txt` output of the last build.
fn output_of(bazel: &Bazel, name: &str) -> String {
    fs::read_to_string(
        bazel
            .workspace
            .join(format!("bazel-bin/runners/{name}.txt")),
    )
    .unwrap_or_else(|e| panic!("{name}.txt: {e}"))
}

/// Actions the server's log says ran in a warm runner.
fn warm_runs_in(server_log: &Path) -> usize {
    fs::read_to_string(server_log)
        .unwrap_or_default()
        .lines()
        .filter(|line| line.contains("action ran") && line.contains("warm=true"))
        .count()
}

/// Builds `//runners:NAME` (a `PRESERVE` target) twice, changing its
/// inputs in between: the second run, warm, finds what `preserve-workspace`
/// promises.
fn preserved_workspace_holds(bazel: &Bazel, package: &Path, server_log: &Path, name: &str) {
    let inputs = package.join("inputs");
    fs::write(inputs.join("data.txt"), "v1\n").unwrap();
    fs::write(inputs.join("gone.txt"), "soon gone\n").unwrap();
    let target = format!("//runners:{name}");
    bazel.run_ok(&["build", &target]);
    let first = output_of(bazel, name);
    eprintln!("{name}, first run:\n{first}");
    assert_eq!(value(&first, "leftover"), "none", "{name}");
    assert_eq!(value(&first, "input"), "v1", "{name}");
    assert_eq!(value(&first, "gone"), "present", "{name}");
    let warm_before = warm_runs_in(server_log);
    fs::write(inputs.join("data.txt"), "v2\n").unwrap();
    fs::remove_file(inputs.join("gone.txt")).unwrap();
    bazel.run_ok(&["build", &target]);
    let second = output_of(bazel, name);
    eprintln!("{name}, second run:\n{second}");
    assert_eq!(
        warm_runs_in(server_log),
        warm_before + 1,
        "{name} did not run warm"
    );
    assert_eq!(value(&second, "leftover"), "run-v1", "{name}");
    assert_eq!(value(&second, "previous_output"), "absent", "{name}");
    assert_eq!(value(&second, "input"), "v2", "{name}");
    assert_eq!(value(&second, "gone"), "absent", "{name}");
    assert_eq!(value(&second, "junk"), "absent", "{name}: not cleaned");
    assert_eq!(value(&second, "kept"), "present", "{name}");
}

#[test]
fn bazel_reuses_warm_runners_and_preserves_workspaces() {
    if !common::bazel_available() {
        return;
    }
    let scratch = tempfile::Builder::new()
        .prefix("kiln-bazel-runners-")
        .tempdir()
        .expect("create scratch directory");
    let data_dir = scratch.path().join("kiln-data");
    let server_log = scratch.path().join("kiln.log");
    let server = KilnServer::start(&data_dir, &server_log, &["--isolation", "none,sandbox"]);
    let bazel = Bazel::new(scratch.path(), common::remote_only_flags(server.port));
    let package = bazel.workspace.join("runners");
    fs::create_dir_all(package.join("inputs")).unwrap();
    fs::write(package.join("BUILD"), BUILD).unwrap();
    fs::write(package.join("defs.bzl"), DEFS).unwrap();
    let read = |name: &str| output_of(&bazel, name);
    let warm_runs = || warm_runs_in(&server_log);

    // The same key: warm, and its /tmp is the first action's.
    bazel.run_ok(&["build", "//runners:tmp_second", "//runners:tmp_other_key"]);
    assert_eq!(read("tmp_second").trim(), "left-by-first");
    assert_eq!(read("tmp_other_key").trim(), "saw-nothing");
    assert_eq!(warm_runs(), 1, "expected one warm run (tmp_second)");

    // A runner that did not finish cleanly is not reused.
    for (first, second) in [
        ("fail_first", "fail_second"),
        ("timeout_first", "timeout_second"),
        ("oom_first", "oom_second"),
    ] {
        let output = bazel.run(&["build", &format!("//runners:{first}")]);
        assert!(
            !output.status.success(),
            "{first} built:\n{}",
            combined(&output)
        );
        bazel.run_ok(&["build", &format!("//runners:{second}")]);
        assert_eq!(
            read(second).trim(),
            "saw-nothing",
            "{second} ran in the runner of {first}"
        );
    }
    bazel.run_ok(&["build", "//runners:marked_second"]);
    assert_eq!(
        read("marked_second").trim(),
        "saw-nothing",
        "a runner marked .KILN_DO_NOT_RECYCLE was reused"
    );
    assert_eq!(warm_runs(), 1, "a runner that failed was reused");

    // preserve-workspace, under none and in the sandbox.
    for name in ["preserve_none", "preserve_sandbox", "preserve_sandbox_root"] {
        preserved_workspace_holds(&bazel, &package, &server_log, name);
    }

    // Under none, the warm runner's previous action left nothing running.
    let before = warm_runs();
    bazel.run_ok(&["build", "//runners:daemon_second"]);
    assert_eq!(warm_runs(), before + 1, "daemon_second did not run warm");
    assert_eq!(read("daemon_second").trim(), "gone");

    // An option of a warm runner without one is refused, not ignored.
    let output = bazel.run(&["build", "//runners:preserve_alone"]);
    let text = combined(&output);
    assert!(!output.status.success(), "preserve_alone built:\n{text}");
    assert!(
        text.contains("preserve-workspace") && text.contains("recycle-runner=true"),
        "the failure does not name the option:\n{text}"
    );

    bazel.run_ok(&["shutdown"]);
    drop(server);
}

/// The container runners' targets, for `runtime` (`docker` or `podman`).
fn container_targets(runtime: &str) -> String {
    format!(
        r#"
genrule(
    name = "{runtime}_first",
    outs = ["{runtime}_first.txt"],
    cmd = "echo left-by-first > /tmp/kiln-runner-token; sleep 300 </dev/null >/dev/null 2>&1 & echo $$! > /tmp/kiln-sleeper; echo wrote > $@",
    exec_properties = warm("c", "{runtime}", IMAGE),
)
genrule(name = "{runtime}_second", srcs = [":{runtime}_first"], outs = ["{runtime}_second.txt"], cmd = CONTAINER_READ, exec_properties = warm("c", "{runtime}", IMAGE))
genrule(name = "{runtime}_other_key", srcs = [":{runtime}_first"], outs = ["{runtime}_other_key.txt"], cmd = CONTAINER_READ, exec_properties = warm("c-other", "{runtime}", IMAGE))
genrule(name = "{runtime}_fail_first", outs = ["{runtime}_fail_first.txt"], cmd = "echo left > /tmp/kiln-runner-token; exit 3", exec_properties = warm("c-fail", "{runtime}", IMAGE))
genrule(name = "{runtime}_fail_second", outs = ["{runtime}_fail_second.txt"], cmd = CONTAINER_READ, exec_properties = warm("c-fail", "{runtime}", IMAGE))
genrule(name = "{runtime}_timeout_first", outs = ["{runtime}_timeout_first.txt"], cmd = "echo left > /tmp/kiln-runner-token; sleep 30", exec_properties = warm("c-timeout", "{runtime}", dict(IMAGE.items() + {{"default-timeout": "2s"}}.items())))
genrule(name = "{runtime}_timeout_second", outs = ["{runtime}_timeout_second.txt"], cmd = CONTAINER_READ, exec_properties = warm("c-timeout", "{runtime}", dict(IMAGE.items() + {{"default-timeout": "2s"}}.items())))
genrule(
    name = "{runtime}_oom_first",
    outs = ["{runtime}_oom_first.txt"],
    cmd = "echo left > /tmp/kiln-runner-token; x=$$(head -c 200000000 /dev/zero | tr '\\0' a); echo $${{#x}} > $@",
    exec_properties = warm("c-oom", "{runtime}", dict(IMAGE.items() + {{"EstimatedMemory": "64MB"}}.items())),
)
genrule(name = "{runtime}_oom_second", outs = ["{runtime}_oom_second.txt"], cmd = CONTAINER_READ, exec_properties = warm("c-oom", "{runtime}", dict(IMAGE.items() + {{"EstimatedMemory": "64MB"}}.items())))
genrule(name = "preserve_{runtime}", srcs = glob(["inputs/*"]), outs = ["preserve_{runtime}.txt"], cmd = PRESERVE, exec_properties = warm("c-preserve", "{runtime}", dict(IMAGE.items() + PRESERVING.items())))
genrule(name = "{runtime}_poison", srcs = ["victim.txt"], outs = ["{runtime}_poison.txt"], cmd = POISON, exec_properties = warm("c-poison", "{runtime}", IMAGE))
genrule(name = "{runtime}_poison_after", srcs = ["victim.txt", ":{runtime}_poison"], outs = ["{runtime}_poison_after.txt"], cmd = "cat runners/victim.txt > $@", exec_properties = warm("c-poison", "{runtime}", IMAGE))
"#
    )
}

const CONTAINER_BUILD: &str = r#"
IMAGE = {"container-image": "docker://127.0.0.1:5000/kiln-test/base:latest"}
CONTAINER_READ = "{ cat /tmp/kiln-runner-token 2>/dev/null || echo saw-nothing; if kill -0 $$(cat /tmp/kiln-sleeper 2>/dev/null) 2>/dev/null; then echo sleeper=alive; else echo sleeper=gone; fi; } > $@"
POISON = "chmod 0666 runners/victim.txt; echo poisoned > runners/victim.txt; cat runners/victim.txt > $@"
"#;

#[test]
fn bazel_keeps_warm_docker_and_podman_runners() {
    if !common::bazel_available() {
        return;
    }
    let runtimes: Vec<&str> = ["docker", "podman"]
        .into_iter()
        .filter(|runtime| common::runtime_available(runtime))
        .collect();
    if runtimes.is_empty() {
        common::say_skipped("warm container runners: neither docker nor podman is available");
        return;
    }
    container_runners_hold(&runtimes, &[]);
}

/// The same build, by a root server run as a user of its own
/// (`--run-as`), whose docker actions go through its docker gate.
#[test]
fn bazel_keeps_warm_docker_runners_of_a_server_run_as_a_user() {
    if !common::bazel_available()
        || !common::root_available("a server run as a user of its own")
        || !common::runtime_available("docker")
    {
        return;
    }
    container_runners_hold(
        &["docker"],
        &["--run-as", &format!("{}:{}", RUN_AS.0, RUN_AS.1)],
    );
}

/// The user a `--run-as` server of these tests becomes.
const RUN_AS: (u32, u32) = (64000, 64000);

/// Builds the container runners' targets of `runtimes` with real Bazel
/// against a server started with `extra` flags, and checks what each
/// says about warm runners, failed ones, preserved workspaces and
/// poisoned inputs; the stopped server leaves no container.
fn container_runners_hold(runtimes: &[&str], extra: &[&str]) {
    if let Err(error) = common::test_images() {
        panic!("building the test images: {error}");
    }
    let scratch = tempfile::Builder::new()
        .prefix("kiln-bazel-container-runners-")
        .tempdir()
        .expect("create scratch directory");
    // A server run as a user of its own reaches its data directory, and
    // owns it (one of another owner is refused at start).
    common::open_to_actions(scratch.path());
    let data_dir = scratch.path().join("kiln-data");
    if extra.contains(&"--run-as") {
        fs::create_dir(&data_dir).unwrap();
        std::os::unix::fs::chown(&data_dir, Some(RUN_AS.0), Some(RUN_AS.1)).unwrap();
    }
    let server_log = scratch.path().join("kiln.log");
    let isolation = format!("none,{}", runtimes.join(","));
    // A shutdown grace long enough for the idle executor's session to end
    // but far shorter than removing its runners' containers one by one:
    // the stopping server removes them all the same.
    let config = scratch.path().join("kiln.toml");
    fs::write(&config, "shutdown_grace_ms = 1000\n").unwrap();
    let mut args = vec![
        "--isolation",
        &isolation,
        "--config",
        config.to_str().unwrap(),
    ];
    args.extend(extra);
    let server = KilnServer::start(&data_dir, &server_log, &args);
    let bazel = Bazel::new(scratch.path(), common::remote_only_flags(server.port));
    let package = bazel.workspace.join("runners");
    fs::create_dir_all(package.join("inputs")).unwrap();
    let mut build = BUILD.to_string() + CONTAINER_BUILD;
    for runtime in runtimes {
        build += &container_targets(runtime);
    }
    fs::write(package.join("BUILD"), build).unwrap();
    fs::write(package.join("defs.bzl"), DEFS).unwrap();
    fs::write(package.join("victim.txt"), "original-bytes\n").unwrap();
    let read = |name: &str| output_of(&bazel, name);
    let warm_runs = || warm_runs_in(&server_log);

    for runtime in runtimes {
        // The same key: the same container, its /tmp and its processes.
        let before = warm_runs();
        bazel.run_ok(&[
            "build",
            &format!("//runners:{runtime}_second"),
            &format!("//runners:{runtime}_other_key"),
        ]);
        let second = read(&format!("{runtime}_second"));
        assert!(second.starts_with("left-by-first\n"), "{runtime}: {second}");
        assert_eq!(value(&second, "sleeper"), "alive", "{runtime}: {second}");
        let other = read(&format!("{runtime}_other_key"));
        assert!(other.starts_with("saw-nothing\n"), "{runtime}: {other}");
        assert_eq!(warm_runs(), before + 1, "{runtime}: one warm run expected");

        // A failed, timed-out or OOM-killed action's runner is not reused.
        for how in ["fail", "timeout", "oom"] {
            let first = format!("{runtime}_{how}_first");
            let output = bazel.run(&["build", &format!("//runners:{first}")]);
            assert!(
                !output.status.success(),
                "{first} built:\n{}",
                combined(&output)
            );
            let second = format!("{runtime}_{how}_second");
            bazel.run_ok(&["build", &format!("//runners:{second}")]);
            let after = read(&second);
            assert!(
                after.starts_with("saw-nothing\n"),
                "{second} ran in the runner of {first}: {after}"
            );
        }

        // preserve-workspace, as under the other types.
        preserved_workspace_holds(
            &bazel,
            &package,
            &server_log,
            &format!("preserve_{runtime}"),
        );

        // Root in the container overwrites an input: the runner's next
        // action (warm) sees the original bytes, as does the host.
        let warm_before = warm_runs();
        bazel.run_ok(&["build", &format!("//runners:{runtime}_poison_after")]);
        assert_eq!(read(&format!("{runtime}_poison")).trim(), "poisoned");
        assert_eq!(
            read(&format!("{runtime}_poison_after")),
            "original-bytes\n",
            "{runtime}: an input overwritten in a warm runner reached its next action"
        );
        assert_eq!(
            warm_runs(),
            warm_before + 1,
            "{runtime}: poison_after ran cold"
        );
        assert_eq!(
            fs::read_to_string(package.join("victim.txt")).unwrap(),
            "original-bytes\n"
        );
        assert!(
            !common::containers_of_server(runtime, &data_dir).is_empty(),
            "{runtime}: no warm runner container while the server runs"
        );
    }

    // A server that stops removes its runners' containers.
    bazel.run_ok(&["shutdown"]);
    let status = server.terminate(std::time::Duration::from_secs(60));
    assert!(status.success(), "kiln serve stopped with {status}");
    for runtime in runtimes {
        let left = common::containers_of_server(runtime, &data_dir);
        assert!(
            left.is_empty(),
            "{runtime}: the stopped server left {left:?}; its log:\n{}",
            fs::read_to_string(&server_log).unwrap_or_default()
        );
    }
}
