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

# What an action can see of the machine it runs on.
PROBE = " ".join([
    "{ echo root-entries=$$(ls -A /root 2>/dev/null | wc -l);",
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
    // The host's /root is not empty (cargo lives there in CI); the
    // sandbox's is, and it sees only its own few processes.
    assert_ne!(
        probe_value(&none, "root-entries"),
        "0",
        "the control run sees no /root:\n{none}"
    );
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
