//! `init-dockerd` driven by a real Bazel against `kiln serve --isolation
//! none,firecracker`: an action in a VM booted (under TCG here) from an
//! image the tests build from the host's Debian `docker.io`
//! (`tests/images/build-dockerd.sh`) finds a Docker daemon answering, loads
//! an image tarball from its inputs and runs a container of it.
//! - the container's output reaches Bazel through the action's output;
//! - with `enable-dockerd-tcp`, the daemon also answers on TCP port 2375;
//! - with `recycle-runner`, the next action of the same key runs in the
//!   same VM, warm, where the daemon still runs and still has the image the
//!   first action loaded (it runs a container of it with no tarball, and
//!   could not pull it: the VM has no network);
//! - `init-dockerd` with an image that has no `dockerd`, or one whose
//!   `dockerd` exits, fails with FAILED_PRECONDITION naming dockerd (and
//!   quoting its log);
//! - `init-dockerd` under `sandbox` is refused (INVALID_ARGUMENT) naming
//!   the property;
//! - nothing of a VM is left once the server has stopped.

mod common;

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use common::vm::{value, VmServer};
use common::{combined, Bazel};

const BUILD: &str = r#"
DOCKERD = {
    "workload-isolation-type": "firecracker",
    "container-image": "docker://127.0.0.1:5000/kiln-test/dockerd:latest",
    "init-dockerd": "true",
    "enable-dockerd-tcp": "true",
    "dockerNetwork": "off",
    "EstimatedMemory": "1GB",
    "default-timeout": "600s",
    "recycle-runner": "true",
}

genrule(
    name = "docker_run",
    srcs = ["base.tar"],
    outs = ["docker_run.txt"],
    cmd = "docker load -i $(location base.tar) >&2 && " +
          "docker run --rm 127.0.0.1:5000/kiln-test/base:latest " +
          "/bin/sh -c 'echo container-says=hello-from-docker-in-a-vm; " +
          "echo container-kernel=$$(uname -r); echo container-pid=$$$$' > $@ && " +
          "echo action-kernel=$$(uname -r) >> $@ && " +
          "echo over-tcp=$$(docker -H tcp://127.0.0.1:2375 image ls --format '{{.Repository}}' " +
          "| tr '\\n' ' ') >> $@",
    exec_properties = DOCKERD,
)

genrule(
    name = "docker_again",
    srcs = [":docker_run"],
    outs = ["docker_again.txt"],
    cmd = "echo images=$$(docker image ls --format '{{.Repository}}' | tr '\\n' ' ') > $@ && " +
          "docker run --rm 127.0.0.1:5000/kiln-test/base:latest " +
          "/bin/sh -c 'echo again-says=hello-again' >> $@",
    exec_properties = DOCKERD,
)

genrule(
    name = "no_dockerd",
    outs = ["no_dockerd.txt"],
    cmd = "touch $@",
    exec_properties = {
        "workload-isolation-type": "firecracker",
        "container-image": "docker://127.0.0.1:5000/kiln-test/base:latest",
        "init-dockerd": "true",
        "dockerNetwork": "off",
    },
)

genrule(
    name = "broken_dockerd",
    outs = ["broken_dockerd.txt"],
    cmd = "touch $@",
    exec_properties = {
        "workload-isolation-type": "firecracker",
        "container-image": "docker://127.0.0.1:5000/kiln-test/dockerd-broken:latest",
        "init-dockerd": "true",
        "dockerNetwork": "off",
    },
)

genrule(
    name = "in_sandbox",
    outs = ["in_sandbox.txt"],
    cmd = "touch $@",
    exec_properties = {
        "workload-isolation-type": "sandbox",
        "init-dockerd": "true",
    },
)
"#;

/// Builds the dockerd test image (and the base it starts from).
fn dockerd_image() -> Result<(), String> {
    let manifest_dir =
        std::env::var("CARGO_MANIFEST_DIR").expect("cargo test sets CARGO_MANIFEST_DIR");
    let script = Path::new(&manifest_dir).join("../../tests/images/build-dockerd.sh");
    let output = Command::new("bash")
        .arg(&script)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running {}: {e}", script.display()))?;
    if output.status.success() {
        return Ok(());
    }
    Err(format!(
        "{} failed: {}{}",
        script.display(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    ))
}

#[test]
fn bazel_actions_run_containers_with_dockerd_in_their_microvm() {
    if !common::bazel_available() {
        return;
    }
    if let Err(error) = common::test_images().and_then(|()| dockerd_image()) {
        panic!("building the test images: {error}");
    }
    let scratch = tempfile::Builder::new()
        .prefix("kiln-bazel-vm-docker-")
        .tempdir()
        .expect("create scratch directory");
    let vms = VmServer::start(scratch.path(), &[]);
    let log = || vms.log_text();

    let bazel = Bazel::new(scratch.path(), common::remote_only_flags(vms.server.port));
    let package = bazel.workspace.join("vm");
    fs::create_dir_all(&package).unwrap();
    fs::write(package.join("BUILD"), BUILD).unwrap();
    // The image the action loads: the base test image, saved by the
    // host's docker (build.sh keeps it in the local store).
    let saved = Command::new("docker")
        .args(["save", "-o"])
        .arg(package.join("base.tar"))
        .arg("127.0.0.1:5000/kiln-test/base:latest")
        .output()
        .expect("running docker save");
    assert!(
        saved.status.success(),
        "docker save of the base test image: {}",
        String::from_utf8_lossy(&saved.stderr)
    );

    let started = Instant::now();
    let output = bazel.run(&["build", "//vm:docker_run"]);
    let took = started.elapsed();
    let text = combined(&output);
    assert!(
        output.status.success(),
        "the docker action failed:\n{text}\n---- server log ----\n{}",
        log()
    );
    let result = fs::read_to_string(bazel.workspace.join("bazel-bin/vm/docker_run.txt"))
        .expect("docker_run.txt");
    eprintln!("---- docker_run ({took:?} for the whole build) ----\n{result}");
    // Where the time went (for the record; nothing is asserted on it).
    let timings = [
        "pulling image",
        "built a VM disk",
        "dockerd answers",
        "action ran",
    ];
    for line in log()
        .lines()
        .filter(|l| timings.iter().any(|t| l.contains(t)))
    {
        eprintln!("server: {line}");
    }
    assert_eq!(
        value(&result, "container-says"),
        "hello-from-docker-in-a-vm"
    );
    // The container shares the VM's kernel, and is a process namespace of
    // its own (its shell is PID 1 there).
    assert_eq!(
        value(&result, "container-kernel"),
        value(&result, "action-kernel")
    );
    assert!(
        value(&result, "action-kernel").contains("cloud-amd64"),
        "not the guest kernel: {result}"
    );
    assert_eq!(value(&result, "container-pid"), "1");
    // enable-dockerd-tcp: the same daemon answers on TCP port 2375.
    assert_eq!(value(&result, "over-tcp"), "127.0.0.1:5000/kiln-test/base");

    // recycle-runner: the next action of the key finds the VM, its daemon
    // and the image the first loaded.
    let warm_runs = || {
        log()
            .lines()
            .filter(|line| line.contains("action ran") && line.contains("warm=true"))
            .count()
    };
    assert_eq!(warm_runs(), 0, "the first action was called warm");
    let output = bazel.run(&["build", "//vm:docker_again"]);
    let text = combined(&output);
    assert!(
        output.status.success(),
        "the second docker action failed:\n{text}\n---- server log ----\n{}",
        log()
    );
    let again = fs::read_to_string(bazel.workspace.join("bazel-bin/vm/docker_again.txt"))
        .expect("docker_again.txt");
    eprintln!("---- docker_again ----\n{again}");
    assert_eq!(value(&again, "images"), "127.0.0.1:5000/kiln-test/base");
    assert_eq!(value(&again, "again-says"), "hello-again");
    assert_eq!(
        warm_runs(),
        1,
        "the second action did not run warm:\n{}",
        log()
    );

    // An image without dockerd: FAILED_PRECONDITION naming it.
    let output = bazel.run(&["build", "//vm:no_dockerd"]);
    let text = combined(&output);
    eprintln!("---- no_dockerd ----\n{text}");
    assert!(!output.status.success(), "no_dockerd succeeded");
    assert!(text.contains("Failed Precondition"), "{text}");
    assert!(text.contains("init-dockerd=true"), "{text}");
    assert!(text.contains("no dockerd on its PATH"), "{text}");

    // A dockerd that gives up: FAILED_PRECONDITION with its log's last
    // lines.
    let output = bazel.run(&["build", "//vm:broken_dockerd"]);
    let text = combined(&output);
    eprintln!("---- broken_dockerd ----\n{text}");
    assert!(!output.status.success(), "broken_dockerd succeeded");
    assert!(text.contains("Failed Precondition"), "{text}");
    assert!(
        text.contains("dockerd (/usr/local/bin/dockerd) ended (exit status: 3)"),
        "{text}"
    );
    assert!(
        text.contains("kiln-test broken dockerd: no daemon here"),
        "dockerd's log is not quoted: {text}"
    );

    // Under sandbox: refused before it runs, naming the property.
    let output = bazel.run(&["build", "//vm:in_sandbox"]);
    let text = combined(&output);
    eprintln!("---- in_sandbox ----\n{text}");
    assert!(!output.status.success(), "in_sandbox succeeded");
    assert!(text.contains("INVALID_ARGUMENT"), "{text}");
    assert!(text.contains("init-dockerd"), "{text}");
    assert!(text.contains("workload-isolation-type=sandbox"), "{text}");

    bazel.run_ok(&["shutdown"]);
    vms.stop_and_check_nothing_left();
}
