//! What `workload-isolation-type=none` does with the properties that ask
//! for more than a plain host process, driven by a real Bazel against a
//! root `kiln serve` (embedded executor):
//! - `dockerNetwork=off` (also with `dockerInit`) takes the action off the
//!   host's network: a listener the test holds on 127.0.0.1 is out of its
//!   reach, which it is without the property;
//! - `dockerInit=true` runs Kiln's init as PID 1;
//! - `dockerRunAsRoot` and `dockerUser` fail the action with
//!   `FAILED_PRECONDITION` naming the property and
//!   `--none-allow-user-switch` unless the server has that switch; with it,
//!   they run as root and as uid 1234, and root's writes to its input land
//!   in its own copy: the cache and the next action keep the original.

mod common;

use std::fs;
use std::net::TcpListener;

use common::{combined, Bazel, KilnServer};

/// The input the root action overwrites.
const VICTIM: &str = "original-bytes\n";

/// Bazel's BUILD file; `PORT` is the test's listener.
fn build_file(port: u16) -> String {
    format!(
        r#"
NONE = {{"workload-isolation-type": "none"}}

# The interfaces of the action's network, and whether it reaches the test's
# listener on the host's loopback.
NET = " ".join([
    "{{ awk -F: 'NR > 2 {{ gsub(/ /, \"\", $$1); print $$1 }}' /proc/net/dev | sort | tr '\\n' ' ';",
    "if (exec 3<>/dev/tcp/127.0.0.1/{port}) 2>/dev/null; then echo reached; else echo unreachable; fi; }} > $@",
])

genrule(name = "net_host", outs = ["net_host.txt"], cmd = NET, exec_properties = NONE)
genrule(name = "net_off", outs = ["net_off.txt"], cmd = NET, exec_properties = dict(NONE, dockerNetwork = "off"))
genrule(name = "net_off_init", outs = ["net_off_init.txt"], cmd = NET, exec_properties = dict(NONE, dockerNetwork = "off", dockerInit = "true"))

genrule(name = "init", outs = ["init.txt"], cmd = "echo $$(cat /proc/1/comm) $$(id -u) > $@", exec_properties = dict(NONE, dockerInit = "true"))

# Tries to change its input in place, then says whom it ran as and what its
# own copy holds. (Genrules run under `set -e`: each attempt may fail.)
ATTACK = " ".join([
    "f=$(location victim.txt);",
    "chmod 666 $$f 2>/dev/null || true; {{ echo poisoned >$$f; }} 2>/dev/null || true;",
    "echo $$(id -u) $$(cat $$f) > $@",
])

genrule(name = "as_root", srcs = ["victim.txt"], outs = ["as_root.txt"], cmd = ATTACK, exec_properties = dict(NONE, dockerRunAsRoot = "true"))
genrule(name = "as_1234", outs = ["as_1234.txt"], cmd = "id -u > $@", exec_properties = dict(NONE, dockerUser = "1234"))

# Built after the attack: the same input, staged again.
genrule(name = "after", srcs = ["victim.txt"], outs = ["after.txt"], cmd = "cat $(location victim.txt) > $@", exec_properties = NONE)
"#
    )
}

#[test]
fn none_honours_or_refuses_network_init_and_user_properties() {
    if !common::bazel_available() || !common::root_available("none switching users") {
        return;
    }
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let scratch = tempfile::Builder::new()
        .prefix("kiln-none-properties-")
        .tempdir()
        .expect("create scratch directory");
    let allowing_dir = scratch.path().join("allowing");
    let allowing = KilnServer::start(
        &allowing_dir,
        &scratch.path().join("allowing.log"),
        &["--isolation", "none", "--none-allow-user-switch"],
    );
    let refusing = KilnServer::start(
        &scratch.path().join("refusing"),
        &scratch.path().join("refusing.log"),
        &["--isolation", "none"],
    );
    let bazel = Bazel::new(scratch.path(), common::remote_only_flags(allowing.port));
    let package = bazel.workspace.join("none");
    fs::create_dir_all(&package).unwrap();
    fs::write(package.join("BUILD"), build_file(port)).unwrap();
    fs::write(package.join("victim.txt"), VICTIM).unwrap();
    let read = |name: &str| {
        fs::read_to_string(bazel.workspace.join(format!("bazel-bin/none/{name}.txt")))
            .unwrap_or_else(|e| panic!("{name}.txt: {e}"))
    };

    bazel.run_ok(&[
        "build",
        "//none:net_host",
        "//none:net_off",
        "//none:net_off_init",
        "//none:init",
        "//none:as_root",
        "//none:as_1234",
    ]);
    let host = read("net_host");
    assert!(host.ends_with(" reached\n"), "net_host: {host}");
    assert_ne!(host, "lo reached\n", "the host has more than lo: {host}");
    assert_eq!(read("net_off"), "lo unreachable\n");
    assert_eq!(read("net_off_init"), "lo unreachable\n");
    // Kiln's init is PID 1; the action runs as an action user.
    let init = read("init");
    let (name, uid) = init.split_once(' ').expect("name and uid");
    assert_eq!(name, "kiln-init", "{init}");
    assert!(common::is_default_action_user(uid), "{init}");
    // Root changed its own copy; uid 1234 is who it asked to be.
    assert_eq!(read("as_root"), "0 poisoned\n");
    assert_eq!(read("as_1234"), "1234\n");
    bazel.run_ok(&["build", "//none:after"]);
    assert_eq!(read("after"), VICTIM, "a later action got a changed input");
    // The executor's cache entry of the input still holds it.
    let hash = kiln_cas::wire::digest_of(VICTIM.as_bytes()).hash;
    let entry = allowing_dir
        .join("execution/cache/blobs")
        .join(&hash[..2])
        .join(format!("{hash}-{}", VICTIM.len()));
    assert_eq!(
        fs::read_to_string(&entry).unwrap_or_else(|e| panic!("{}: {e}", entry.display())),
        VICTIM,
        "the root action changed the executor's input cache"
    );

    // Without the switch, both fail naming the property and the switch
    // (after a clean: Bazel would otherwise keep the outputs it has).
    bazel.run_ok(&["clean"]);
    let elsewhere = format!("--remote_executor=grpc://127.0.0.1:{}", refusing.port);
    for (target, property) in [
        ("//none:as_root", "dockerRunAsRoot=true"),
        ("//none:as_1234", "dockerUser=1234"),
    ] {
        let output = bazel.run(&["build", &elsewhere, "--noremote_accept_cached", target]);
        let text = combined(&output);
        assert!(!output.status.success(), "{target} ran:\n{text}");
        assert!(
            text.contains(&format!("Failed Precondition: {property}: ")),
            "{target} did not fail naming {property}:\n{text}"
        );
        assert!(text.contains("--none-allow-user-switch"), "{text}");
    }
    bazel.run_ok(&["shutdown"]);
    drop(listener);
}
