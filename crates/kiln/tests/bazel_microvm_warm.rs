//! Warm VMs (`recycle-runner=true` with `workload-isolation-type=firecracker`)
//! driven by a real Bazel against `kiln serve --isolation none,firecracker`
//! (QEMU under TCG here, the busybox test image of `tests/images/build.sh`):
//! - a second action with the same `runner-recycling-key` runs in the
//!   first's VM, resumed: it sees a file the first wrote in /tmp and one in
//!   its root overlay, and the process it left running; not the stray file
//!   it left in its workspace, but its own inputs, changed ones included;
//! - an input the VM holds from the last action (one of its inputs or
//!   outputs) is not sent again, but one that action changed in place
//!   is: the next action reads the input's own bytes;
//! - an action with another key gets a fresh VM;
//! - a kept VM that died (its QEMU killed) is replaced by a fresh one, and
//!   the action in it is not called warm;
//! - a failed action's VM, and one whose action left
//!   `.KILN_DO_NOT_RECYCLE`, are not reused;
//! - the server's log says which actions ran warm (as their results'
//!   metadata does); the server, stopping, discards its warm VMs, and no
//!   QEMU process or VM file is left.

mod common;

use std::fs;
use std::path::Path;

use common::vm::{value, VmServer};
use common::{combined, Bazel};

/// BUILD files cannot define functions.
const DEFS: &str = r#"
def warm(key):
    return {
        "workload-isolation-type": "firecracker",
        "container-image": "docker://127.0.0.1:5000/kiln-test/base:latest",
        "dockerNetwork": "off",
        "recycle-runner": "true",
        "runner-recycling-key": key,
    }
"#;

/// What a first action leaves: a file in /tmp (a tmpfs of the guest), one
/// in the root overlay, a process, and a stray file in its workspace.
const LEAVE: &str = "echo left-by-first > /tmp/kiln-warm-token; \
    mkdir -p /var/kiln && echo in-the-root-overlay > /var/kiln/token; \
    sleep 300 </dev/null >/dev/null 2>&1 & echo $$! > /tmp/kiln-warm-sleep.pid; \
    echo stray > stray.txt";

/// What a later action reports of it, and its own input.
const READ: &str = "{ echo tmp=$$(cat /tmp/kiln-warm-token 2>/dev/null || echo none); \
    echo root=$$(cat /var/kiln/token 2>/dev/null || echo none); \
    if kill -0 $$(cat /tmp/kiln-warm-sleep.pid 2>/dev/null || echo 999999) 2>/dev/null; \
    then echo sleep=alive; else echo sleep=gone; fi; \
    echo stray=$$(test -e stray.txt && echo present || echo absent); \
    echo input=$$(cat $(location input.txt)); } > $@";

fn build_file() -> String {
    format!(
        r#"
load(":defs.bzl", "warm")

LEAVE = "{LEAVE}"
READ = "{READ}"

genrule(name = "first", outs = ["first.txt"], cmd = LEAVE + "; echo wrote > $@", exec_properties = warm("vm"))
genrule(name = "second", srcs = [":first", "input.txt"], outs = ["second.txt"], cmd = READ, exec_properties = warm("vm"))
genrule(name = "tamper", srcs = [":second", "input.txt"], outs = ["tamper.txt"], cmd = "cat $(location input.txt) > $@; echo tampered >> $(location input.txt)", exec_properties = warm("vm"))
genrule(name = "third", srcs = [":tamper", "input.txt"], outs = ["third.txt"], cmd = READ + "; echo tamper=$$(cat $(location :tamper)) >> $@", exec_properties = warm("vm"))
genrule(name = "other_key", srcs = [":first", "input.txt"], outs = ["other_key.txt"], cmd = READ, exec_properties = warm("other"))

genrule(name = "fail_first", outs = ["fail_first.txt"], cmd = LEAVE + "; exit 3", exec_properties = warm("fail"))
genrule(name = "fail_second", srcs = ["input.txt"], outs = ["fail_second.txt"], cmd = READ, exec_properties = warm("fail"))

genrule(name = "marked_first", outs = ["marked_first.txt"], cmd = LEAVE + "; touch .KILN_DO_NOT_RECYCLE; echo wrote > $@", exec_properties = warm("marked"))
genrule(name = "marked_second", srcs = [":marked_first", "input.txt"], outs = ["marked_second.txt"], cmd = READ, exec_properties = warm("marked"))
"#
    )
}

/// Actions the server's log says ran in a warm runner.
fn warm_runs_in(server_log: &Path) -> usize {
    fs::read_to_string(server_log)
        .unwrap_or_default()
        .lines()
        .filter(|line| line.contains("action ran") && line.contains("warm=true"))
        .count()
}

#[test]
fn bazel_reuses_warm_vms_with_their_processes_and_files() {
    assert!(
        common::bazel_available(),
        "Bazel 4.2.3 is needed for this test (scripts/install-deps.sh)"
    );
    if let Err(error) = common::test_images() {
        panic!("building the test images: {error}");
    }
    let scratch = tempfile::Builder::new()
        .prefix("kiln-bazel-vm-warm-")
        .tempdir()
        .expect("create scratch directory");
    let vms = VmServer::start(scratch.path(), &[]);
    let log = || vms.log_text();

    let bazel = Bazel::new(scratch.path(), common::remote_only_flags(vms.server.port));
    let package = bazel.workspace.join("vm");
    fs::create_dir_all(&package).unwrap();
    fs::write(package.join("BUILD"), build_file()).unwrap();
    fs::write(package.join("defs.bzl"), DEFS).unwrap();
    fs::write(package.join("input.txt"), "v1\n").unwrap();
    let read = |name: &str| {
        fs::read_to_string(bazel.workspace.join(format!("bazel-bin/vm/{name}.txt")))
            .unwrap_or_else(|e| panic!("{name}.txt: {e}"))
    };
    let warm_runs = || warm_runs_in(&vms.log);

    // The same key: the first's VM, resumed with what it had.
    bazel.run_ok(&["build", "//vm:second", "//vm:other_key"]);
    let second = read("second");
    eprintln!("---- second ----\n{second}");
    assert_eq!(value(&second, "tmp"), "left-by-first");
    assert_eq!(value(&second, "root"), "in-the-root-overlay");
    assert_eq!(
        value(&second, "sleep"),
        "alive",
        "the first's process is gone"
    );
    assert_eq!(
        value(&second, "stray"),
        "absent",
        "the last workspace was kept"
    );
    assert_eq!(value(&second, "input"), "v1");
    let other = read("other_key");
    eprintln!("---- other_key ----\n{other}");
    assert_eq!(value(&other, "tmp"), "none", "another key shared the VM");
    assert_eq!(value(&other, "root"), "none");
    assert_eq!(value(&other, "sleep"), "gone");
    assert_eq!(warm_runs(), 1, "expected one warm run (second)\n{}", log());

    // Again, with a changed input: the warm VM gets it.
    fs::write(package.join("input.txt"), "v2\n").unwrap();
    bazel.run_ok(&["build", "//vm:second"]);
    let again = read("second");
    eprintln!("---- second, again ----\n{again}");
    assert_eq!(warm_runs(), 2, "the second run of second was not warm");
    assert_eq!(value(&again, "input"), "v2");
    assert_eq!(value(&again, "sleep"), "alive");
    assert_eq!(value(&again, "stray"), "absent");

    // An action changes an input in place; the next one in the VM, with
    // the same input, reads its own bytes, not what the last one left.
    bazel.run_ok(&["build", "//vm:third"]);
    assert_eq!(read("tamper"), "v2\n");
    let third = read("third");
    eprintln!("---- third, after tamper ----\n{third}");
    assert_eq!(warm_runs(), 4, "tamper and third were not warm");
    assert_eq!(value(&third, "input"), "v2", "a changed input was kept");
    // tamper's output, left in the VM, is third's input: its own bytes.
    assert_eq!(value(&third, "tamper"), "v2");
    assert!(
        log().contains("the last action changed an input this one shares"),
        "the changed input was not noticed:\n{}",
        log()
    );

    // The kept VMs die between actions (kill -9 of their QEMU): the next
    // action of the key runs in a fresh VM, and its metadata and the log
    // say it was not warm.
    for line in common::vm::qemu_processes_under(&vms.run_dir) {
        let pid = line.split_whitespace().next().unwrap();
        let killed = std::process::Command::new("kill")
            .args(["-KILL", pid])
            .status()
            .unwrap();
        assert!(killed.success(), "kill -KILL {pid}");
    }
    fs::write(package.join("input.txt"), "v3\n").unwrap();
    bazel.run_ok(&["build", "//vm:second"]);
    let replaced = read("second");
    eprintln!("---- second, its VM killed ----\n{replaced}");
    assert_eq!(value(&replaced, "input"), "v3");
    assert_eq!(value(&replaced, "tmp"), "none", "the killed VM's files");
    assert_eq!(value(&replaced, "sleep"), "gone");
    assert!(
        log().contains("a warm VM could not take the next action"),
        "the dead VM was not noticed:\n{}",
        log()
    );
    assert_eq!(warm_runs(), 4, "an action in a fresh VM was called warm");

    // A failed action's VM is not reused, nor one marked not to be.
    let output = bazel.run(&["build", "//vm:fail_first"]);
    assert!(
        !output.status.success(),
        "fail_first built:\n{}",
        combined(&output)
    );
    bazel.run_ok(&["build", "//vm:fail_second"]);
    let after_failure = read("fail_second");
    assert_eq!(
        value(&after_failure, "tmp"),
        "none",
        "fail_second ran in the VM of fail_first"
    );
    assert_eq!(value(&after_failure, "sleep"), "gone");
    bazel.run_ok(&["build", "//vm:marked_second"]);
    let after_mark = read("marked_second");
    assert_eq!(
        value(&after_mark, "tmp"),
        "none",
        "a VM marked .KILN_DO_NOT_RECYCLE was reused"
    );
    assert_eq!(warm_runs(), 4, "a VM that failed was reused");
    // Kept now: the VMs of keys vm, other, fail (its second action) and
    // marked (its second action).
    assert!(
        !common::vm::qemu_processes_under(&vms.run_dir).is_empty(),
        "no warm VM is kept"
    );

    bazel.run_ok(&["shutdown"]);
    let log = vms.stop_and_check_nothing_left();
    assert!(
        log.contains("discarding the warm runners"),
        "the stopping server did not discard its warm runners:\n{log}"
    );
}
