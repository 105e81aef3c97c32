//! Isolation types chosen per target with `exec_properties`, driven by a
//! real Bazel against `kiln serve` whose embedded executor offers `none`,
//! `sandbox`, `docker` and `podman` (real dockerd, podman and registries,
//! started by `scripts/services.sh`; images from `tests/images/build.sh`):
//! - a genrule and an sh_test run under each type, and each can tell where
//!   it ran (the sandbox hides `/root` and the host's processes; the
//!   containers run the busybox test image, not the Debian host);
//! - a private image pulls with credentials sent as
//!   `--remote_exec_header=x-buildbuddy-platform.container-registry-*`;
//!   a wrong password fails naming the image, and neither password shows
//!   up in any log, stored blob or Bazel output;
//! - a server whose executor does not offer `docker` fails a docker action
//!   fast, naming `docker`.

mod common;

use std::fs;

use common::{combined, Bazel, KilnServer};

/// The auth registry's password (`scripts/services.sh`).
const PASSWORD: &str = "Kiln-Test-Secret-7f3a9c";
const WRONG_PASSWORD: &str = "Wrong-Secret-0b1d2e";
const PRIVATE_IMAGE: &str = "127.0.0.1:5001/kiln-test/private";

const BUILD: &str = r#"
SANDBOX = {"workload-isolation-type": "sandbox", "dockerNetwork": "off"}

DOCKER = {
    "workload-isolation-type": "docker",
    "container-image": "docker://127.0.0.1:5000/kiln-test/base:latest",
    "dockerNetwork": "off",
}

PODMAN = {
    "workload-isolation-type": "podman",
    "container-image": "docker://127.0.0.1:5000/kiln-test/base:latest",
    "dockerNetwork": "off",
}

# What an action can see of the machine it runs on, and whom it runs as.
PROBE = " ".join([
    "{ echo root-entries=$$(ls -A /root 2>/dev/null | wc -l);",
    "echo uid=$$(id -u);",
    "echo processes=$$(ls /proc | grep -c '^[0-9]');",
    "if test -e /etc/debian_version; then echo os=debian; else echo os=other; fi; } > $@",
])

genrule(name = "in_none", outs = ["in_none.txt"], cmd = PROBE)

genrule(name = "in_sandbox", outs = ["in_sandbox.txt"], cmd = PROBE, exec_properties = SANDBOX)

genrule(name = "in_docker", outs = ["in_docker.txt"], cmd = PROBE, exec_properties = DOCKER)

genrule(name = "in_podman", outs = ["in_podman.txt"], cmd = PROBE, exec_properties = PODMAN)

sh_test(name = "sandbox_test", size = "small", srcs = ["probe_test.sh"], exec_properties = SANDBOX)

sh_test(name = "docker_test", size = "small", srcs = ["probe_test.sh"], exec_properties = DOCKER)

sh_test(name = "podman_test", size = "small", srcs = ["probe_test.sh"], exec_properties = PODMAN)

# Holds ~200 MB in a shell variable under a 64 MB limit.
genrule(
    name = "memory_hog",
    outs = ["memory_hog.txt"],
    cmd = "x=$$(head -c 200000000 /dev/zero | tr '\\0' a); echo $${#x} > $@",
    exec_properties = {
        "workload-isolation-type": "sandbox",
        "EstimatedMemory": "64MB",
    },
)

# Each tries to change its input for the actions after it: in place
# (chmod and write, truncate), by replacing it, and through the executor's
# cache entry of it (KILN_TEST_CACHE, the server's cache directory, comes
# with --action_env). It records whom it ran as and what its own copy
# holds afterwards.
# (Genrules run under `set -e`: each attempt may fail.)
ATTACK = " ".join([
    "f=$(location victim.txt);",
    "chmod 666 $$f 2>/dev/null || true; { echo poisoned >$$f; } 2>/dev/null || true;",
    "truncate -s 3 $$f 2>/dev/null || true;",
    "for c in $$KILN_TEST_CACHE/blobs/*/*; do",
    "chmod 666 $$c 2>/dev/null || true; { echo poisoned >$$c; } 2>/dev/null || true; done;",
    "{ echo uid=$$(id -u); echo saw=$$(cat $$f); } > $@;",
    "{ mv $$f $$f.moved && echo poisoned >$$f; } 2>/dev/null || true",
])

genrule(name = "poison_none", srcs = ["victim.txt"], outs = ["poison_none.txt"], cmd = ATTACK)

genrule(name = "poison_sandbox", srcs = ["victim.txt"], outs = ["poison_sandbox.txt"], cmd = ATTACK, exec_properties = SANDBOX)

genrule(
    name = "poison_sandbox_root",
    srcs = ["victim.txt"],
    outs = ["poison_sandbox_root.txt"],
    cmd = ATTACK,
    exec_properties = dict(SANDBOX, dockerRunAsRoot = "true"),
)

genrule(name = "poison_docker", srcs = ["victim.txt"], outs = ["poison_docker.txt"], cmd = ATTACK, exec_properties = DOCKER)

genrule(name = "poison_podman", srcs = ["victim.txt"], outs = ["poison_podman.txt"], cmd = ATTACK, exec_properties = PODMAN)

# Leaves a daemon behind under none (setsid: out of its process group)
# and prints its pid.
genrule(name = "leave_behind", outs = ["leave_behind.txt"], cmd = "sh -c 'setsid sleep 300 </dev/null >/dev/null 2>&1 & echo $$!' > $@")

# Built after the attacks: the same input, staged again.
genrule(name = "after_poison", srcs = ["victim.txt"], outs = ["after_poison.txt"], cmd = "cat $(location victim.txt) > $@")

# A user only the image knows: with nonroot-workspace every directory of
# the workspace is writable to it, the output's parents included.
NONROOT = {"dockerUser": "1234", "nonroot-workspace": "true"}

genrule(name = "nonroot_docker", outs = ["nonroot_docker.txt"], cmd = "id -u > $@", exec_properties = dict(DOCKER.items() + NONROOT.items()))

genrule(name = "nonroot_podman", outs = ["nonroot_podman.txt"], cmd = "id -u > $@", exec_properties = dict(PODMAN.items() + NONROOT.items()))

# Built only against a server without docker.
genrule(name = "docker_elsewhere", outs = ["docker_elsewhere.txt"], cmd = "echo ran > $@", exec_properties = DOCKER)

genrule(
    name = "private_docker",
    outs = ["private_docker.txt"],
    cmd = "echo private-image-ran > $@",
    exec_properties = {
        "workload-isolation-type": "docker",
        "container-image": "docker://127.0.0.1:5001/kiln-test/private:latest",
    },
)

genrule(
    name = "private_podman",
    outs = ["private_podman.txt"],
    cmd = "echo private-image-ran > $@",
    exec_properties = {
        "workload-isolation-type": "podman",
        "container-image": "docker://127.0.0.1:5001/kiln-test/private:latest",
    },
)
"#;

/// The test: passes only where it ran, so a test "PASSED" under each type
/// means the type's environment was really used.
const PROBE_TEST: &str = r#"#!/bin/bash
echo "probe: os=$(test -e /etc/debian_version && echo debian || echo other) root-entries=$(ls -A /root 2>/dev/null | wc -l)"
case "$TEST_TARGET" in
  *sandbox_test) test "$(ls -A /root 2>/dev/null | wc -l)" = 0 && test -e /etc/debian_version ;;
  *) test ! -e /etc/debian_version ;;
esac
"#;

/// The input every `poison_*` action attacks.
const VICTIM: &str = "original-bytes\n";

/// `key=value` lines of a probe output.
fn probe_value(text: &str, key: &str) -> String {
    text.lines()
        .find_map(|line| line.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= in {text:?}"))
        .trim()
        .to_string()
}

fn credentials(password: &str) -> [String; 2] {
    [
        "--remote_exec_header=x-buildbuddy-platform.container-registry-username=kiln".into(),
        format!(
            "--remote_exec_header=x-buildbuddy-platform.container-registry-password={password}"
        ),
    ]
}

#[test]
fn bazel_runs_targets_under_each_isolation_type() {
    if !common::bazel_available() {
        return;
    }
    let docker = common::runtime_available("docker");
    let podman = common::runtime_available("podman");
    if docker || podman {
        if let Err(error) = common::test_images() {
            panic!("building the test images: {error}");
        }
    }
    let scratch = tempfile::Builder::new()
        .prefix("kiln-bazel-isolation-")
        .tempdir()
        .expect("create scratch directory");
    let data_dir = scratch.path().join("kiln-data");
    let server_log = scratch.path().join("kiln.log");
    let server = KilnServer::start(
        &data_dir,
        &server_log,
        &["--isolation", "none,sandbox,docker,podman"],
    );
    let bazel = Bazel::new(scratch.path(), common::remote_only_flags(server.port));
    let package = bazel.workspace.join("isolation");
    fs::create_dir_all(&package).unwrap();
    fs::write(package.join("BUILD"), BUILD).unwrap();
    fs::write(package.join("probe_test.sh"), PROBE_TEST).unwrap();
    fs::write(package.join("victim.txt"), VICTIM).unwrap();
    common::make_executable(&package.join("probe_test.sh"));
    let server_text = || fs::read_to_string(&server_log).unwrap_or_default();
    assert!(
        server_text().contains("sandbox"),
        "the server log does not mention the sandbox probe:\n{}",
        server_text()
    );

    let mut targets = vec![
        "//isolation:in_none",
        "//isolation:in_sandbox",
        "//isolation:sandbox_test",
    ];
    if docker {
        targets.extend(["//isolation:in_docker", "//isolation:docker_test"]);
    } else {
        common::say_skipped("docker targets: docker is not available");
    }
    if podman {
        targets.extend(["//isolation:in_podman", "//isolation:podman_test"]);
    } else {
        common::say_skipped("podman targets: podman is not available");
    }
    let mut args = vec!["test", "--test_output=all"];
    args.extend(&targets);
    let text = bazel.run_ok(&args);
    for target in targets.iter().filter(|t| t.ends_with("_test")) {
        assert!(
            text.lines()
                .any(|line| line.starts_with(*target) && line.contains("PASSED")),
            "{target} did not pass:\n{text}"
        );
    }
    let read = |name: &str| {
        fs::read_to_string(
            bazel
                .workspace
                .join(format!("bazel-bin/isolation/{name}.txt")),
        )
        .unwrap_or_else(|e| panic!("{name}.txt: {e}"))
    };
    let none = read("in_none");
    let sandbox = read("in_sandbox");
    eprintln!("none: {none}\nsandbox: {sandbox}");
    // A root server runs `none` and `sandbox` actions as unprivileged
    // action users by default, a uid of its own for each.
    if rustix::process::geteuid().is_root() {
        for (name, seen) in [("none", &none), ("sandbox", &sandbox)] {
            let uid = probe_value(seen, "uid");
            assert!(
                common::is_default_action_user(&uid),
                "{name} ran as {uid}:\n{seen}"
            );
        }
    }
    // The sandbox's /root is empty, and it sees only its own few processes.
    assert_eq!(
        probe_value(&sandbox, "root-entries"),
        "0",
        "the sandbox sees /root:\n{sandbox}"
    );
    let processes: u32 = probe_value(&sandbox, "processes").parse().unwrap();
    let host_processes: u32 = probe_value(&none, "processes").parse().unwrap();
    assert!(
        processes < 10 && processes < host_processes,
        "the sandbox sees {processes} processes (host: {host_processes})"
    );
    assert_eq!(probe_value(&sandbox, "os"), "debian");
    for (available, name) in [(docker, "in_docker"), (podman, "in_podman")] {
        if available {
            let seen = read(name);
            assert_eq!(
                probe_value(&seen, "os"),
                "other",
                "{name} ran on the host:\n{seen}"
            );
        }
    }

    // No action can change what a later action gets as the same input:
    // not as the action user, and not as root in a sandbox or container,
    // whose writes land on a copy of its own.
    let cache = data_dir.join("execution/cache");
    let mut attacks = vec!["none", "sandbox", "sandbox_root"];
    attacks.extend(docker.then_some("docker"));
    attacks.extend(podman.then_some("podman"));
    let mut args = vec![
        "build".to_string(),
        format!("--action_env=KILN_TEST_CACHE={}", cache.display()),
    ];
    args.extend(attacks.iter().map(|a| format!("//isolation:poison_{a}")));
    bazel.run_ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    for attack in &attacks {
        let seen = read(&format!("poison_{attack}"));
        eprintln!("poison_{attack}: {seen}");
        let root = probe_value(&seen, "uid") == "0";
        assert_eq!(
            root,
            ["sandbox_root", "docker", "podman"].contains(attack),
            "poison_{attack} ran as the wrong user:\n{seen}"
        );
        // Root changed its own copy; the action user could not.
        assert_eq!(
            probe_value(&seen, "saw") != VICTIM.trim(),
            root,
            "poison_{attack}:\n{seen}"
        );
    }
    bazel.run_ok(&["build", "//isolation:after_poison"]);

    // Under none, nothing an action started outlives it.
    bazel.run_ok(&["build", "//isolation:leave_behind"]);
    let daemon = read("leave_behind").trim().to_string();
    let cmdline = fs::read(format!("/proc/{daemon}/cmdline")).unwrap_or_default();
    assert!(
        !String::from_utf8_lossy(&cmdline).starts_with("sleep"),
        "the daemon of a none action (pid {daemon}) outlived it"
    );
    for (available, runtime) in [(docker, "docker"), (podman, "podman")] {
        if available {
            bazel.run_ok(&["build", &format!("//isolation:nonroot_{runtime}")]);
            assert_eq!(read(&format!("nonroot_{runtime}")).trim(), "1234");
        }
    }
    assert_eq!(
        read("after_poison"),
        VICTIM,
        "a later action got a changed input"
    );
    let victim_hash = kiln_cas::wire::digest_of(VICTIM.as_bytes()).hash;
    let entries = common::files_named_like(&cache.join("blobs"), &victim_hash);
    assert!(
        !entries.is_empty(),
        "no cache entry of the input under {}",
        cache.display()
    );
    for entry in entries {
        assert_eq!(
            fs::read_to_string(&entry).unwrap(),
            VICTIM,
            "{}",
            entry.display()
        );
    }

    // A memory hog in the sandbox is killed at its limit, and Bazel shows
    // why.
    let output = bazel.run(&["build", "//isolation:memory_hog"]);
    let text = combined(&output);
    eprintln!("---- memory hog ----\n{text}");
    assert!(!output.status.success(), "the memory hog built:\n{text}");
    assert!(
        text.contains("exceeding its memory limit"),
        "the failure does not say the memory limit was exceeded:\n{text}"
    );

    // A private image: the wrong password fails, naming the image; the
    // right one pulls and runs.
    for (available, runtime) in [(docker, "docker"), (podman, "podman")] {
        if !available {
            continue;
        }
        let target = format!("//isolation:private_{runtime}");
        let wrong = credentials(WRONG_PASSWORD);
        let output = bazel.run(&["build", &wrong[0], &wrong[1], &target]);
        let text = combined(&output);
        eprintln!("---- {target}, wrong password ----\n{text}");
        assert!(
            !output.status.success(),
            "{target} built with a wrong password:\n{text}"
        );
        assert!(
            text.contains(PRIVATE_IMAGE),
            "the failure of {target} does not name {PRIVATE_IMAGE}:\n{text}"
        );
        assert!(
            !text.contains(WRONG_PASSWORD),
            "the error shows the password"
        );
        let right = credentials(PASSWORD);
        let text = bazel.run_ok(&["build", &right[0], &right[1], &target]);
        assert!(!text.contains(PASSWORD) && !text.contains(WRONG_PASSWORD));
        assert_eq!(
            read(&format!("private_{runtime}")).trim(),
            "private-image-ran"
        );
    }

    // An executor that does not offer docker: the action fails fast,
    // naming it.
    let plain_log = scratch.path().join("kiln-plain.log");
    let plain = KilnServer::start(
        &scratch.path().join("kiln-plain-data"),
        &plain_log,
        &["--isolation", "none,sandbox"],
    );
    let output = bazel.run(&[
        "build",
        &format!("--remote_executor=grpc://127.0.0.1:{}", plain.port),
        "//isolation:docker_elsewhere",
    ]);
    let text = combined(&output);
    eprintln!("---- docker on an executor without it ----\n{text}");
    assert!(
        !output.status.success(),
        "a docker action built without docker:\n{text}"
    );
    assert!(
        text.contains("workload-isolation-type=docker"),
        "the failure does not name docker:\n{text}"
    );

    bazel.run_ok(&["shutdown"]);
    drop(server);
    drop(plain);
    for secret in [PASSWORD, WRONG_PASSWORD] {
        common::assert_nowhere(secret, &[&server_log, &plain_log], &[&data_dir]);
    }
}
