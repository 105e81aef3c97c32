//! `workload-isolation-type=firecracker` driven by a real Bazel against
//! `kiln serve --isolation none,firecracker`: each action runs in a VM that
//! QEMU boots (under TCG here) from the busybox test image
//! (`tests/images/build.sh`), converted to a disk by Kiln.
//! - the action sees the guest kernel, not the host's, and the image's
//!   files; its inputs and outputs travel as for any other type;
//! - `EstimatedMemory` is the guest's RAM, within the documented overhead;
//! - `dockerNetwork=off` leaves the VM without a network device; the
//!   default (bridge) gives it one, from which neither the host's loopback
//!   nor its own addresses can be reached;
//! - a timed-out action's partial output reaches Bazel;
//! - the executor advertises its VMM (`vmm=qemu-tcg` here): an action may
//!   require it, and one requiring another fails fast naming `vmm`;
//! - an image that cannot become a disk fails naming it;
//! - with `--vm-hash-outputs-from`, an output the CAS already holds is
//!   hashed in the guest and stays there, and Bazel still gets its bytes;
//! - nothing of a VM is left once the server has stopped.

mod common;

use std::fs;
use std::net::TcpListener;
use std::process::Command;

use common::vm::{value, VmServer};
use common::{combined, Bazel};

/// What an action reports of the machine it runs on.
const PROBE: &str = "{ echo kernel=$$(uname -r); \
    echo memtotal_kb=$$(awk '/MemTotal/ { print $$2 }' /proc/meminfo); \
    echo input=$$(cat $(location input.txt)); \
    echo busybox=$$(test -x /bin/busybox && echo yes || echo no); \
    echo debian=$$(test -e /etc/debian_version && echo yes || echo no); \
    echo interfaces=$$(ls /sys/class/net | tr '\\n' ' '); } > $(location probe.txt); \
    echo nested > $(location out/nested.txt)";

/// 256 KiB of `k`, without a newline.
const BIG: &str = "head -c 262144 /dev/zero | tr '\\\\0' k";

fn build_file(host_ports: &str, vmm: &str) -> String {
    format!(
        r#"
VM = {{
    "workload-isolation-type": "firecracker",
    "container-image": "docker://127.0.0.1:5000/kiln-test/base:latest",
}}

genrule(
    name = "probe",
    srcs = ["input.txt"],
    outs = ["probe.txt", "out/nested.txt"],
    cmd = "{PROBE}",
    exec_properties = dict(VM, EstimatedMemory = "512MB", dockerNetwork = "off"),
)

# Under the default bridge network: every address of the host, and slirp's
# alias of its loopback, with a listener on each port tried.
genrule(
    name = "reach_host",
    outs = ["reach_host.txt"],
    cmd = "for target in {host_ports}; do " +
          "if nc -z -w 3 $${{target%:*}} $${{target#*:}} 2>/dev/null; " +
          "then echo reached=$$target; else echo unreachable=$$target; fi; done > $@; " +
          "echo interfaces=$$(ls /sys/class/net | tr '\\n' ' ') >> $@",
    exec_properties = VM,
)

genrule(
    name = "times_out",
    outs = ["times_out.txt"],
    cmd = "echo partial-output-before-the-timeout >&2; sleep 120; touch $@",
    exec_properties = {{
        "workload-isolation-type": "firecracker",
        "container-image": "docker://127.0.0.1:5000/kiln-test/base:latest",
        "dockerNetwork": "off",
        "default-timeout": "8s",
    }},
)

# The executor advertises what runs its VMs: an action may require it.
genrule(
    name = "on_this_vmm",
    outs = ["on_this_vmm.txt"],
    cmd = "uname -r > $@",
    exec_properties = {{
        "workload-isolation-type": "firecracker",
        "container-image": "docker://127.0.0.1:5000/kiln-test/base:latest",
        "dockerNetwork": "off",
        "vmm": "{vmm}",
    }},
)

genrule(
    name = "on_another_vmm",
    outs = ["on_another_vmm.txt"],
    cmd = "uname -r > $@",
    exec_properties = {{
        "workload-isolation-type": "firecracker",
        "container-image": "docker://127.0.0.1:5000/kiln-test/base:latest",
        "dockerNetwork": "off",
        "vmm": "firecracker-proper",
    }},
)

# The same 256 KiB twice, from two actions: the second's is in the CAS
# when its VM collects it.
genrule(
    name = "big_first",
    outs = ["big_first.bin"],
    cmd = "{BIG} > $@",
    exec_properties = dict(VM, dockerNetwork = "off"),
)

genrule(
    name = "big_again",
    outs = ["big_again.bin", "small.txt"],
    cmd = "{BIG} > $(location big_again.bin); echo small > $(location small.txt)",
    exec_properties = dict(VM, dockerNetwork = "off"),
)

genrule(
    name = "no_such_image",
    outs = ["no_such_image.txt"],
    cmd = "touch $@",
    exec_properties = {{
        "workload-isolation-type": "firecracker",
        "container-image": "docker://127.0.0.1:5000/kiln-test/no-such-image:latest",
        "dockerNetwork": "off",
    }},
)
"#
    )
}

/// The host's own addresses (not loopback), as `hostname -I` lists them.
fn host_addresses() -> Vec<String> {
    let output = Command::new("hostname")
        .arg("-I")
        .output()
        .expect("hostname -I");
    String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .filter(|address| !address.contains(':'))
        .map(str::to_string)
        .collect()
}

#[test]
fn bazel_runs_actions_in_microvms_booted_from_their_image() {
    if !common::bazel_available() {
        return;
    }
    if let Err(error) = common::test_images() {
        panic!("building the test images: {error}");
    }
    let scratch = tempfile::Builder::new()
        .prefix("kiln-bazel-vm-")
        .tempdir()
        .expect("create scratch directory");
    let vms = VmServer::start(scratch.path(), &["--vm-hash-outputs-from", "64KiB"]);
    let log = || vms.log_text();

    // Listeners the bridged VM must not reach: on the host's loopback (as
    // slirp's 10.0.2.2) and on each of its addresses.
    let listener = TcpListener::bind("0.0.0.0:0").expect("listen on the host");
    let port = listener.local_addr().unwrap().port();
    let mut targets = vec![format!("10.0.2.2:{port}")];
    targets.extend(host_addresses().iter().map(|a| format!("{a}:{port}")));
    let bazel = Bazel::new(scratch.path(), common::remote_only_flags(vms.server.port));
    let package = bazel.workspace.join("vm");
    fs::create_dir_all(&package).unwrap();
    // `qemu-kvm` or `qemu-tcg`, as the probe logged it.
    let vmm = value(&log().replace(' ', "\n").replace('"', ""), "vmm");
    assert!(vmm == "qemu-kvm" || vmm == "qemu-tcg", "vmm={vmm}");
    fs::write(package.join("BUILD"), build_file(&targets.join(" "), &vmm)).unwrap();
    fs::write(package.join("input.txt"), "input-from-the-workspace\n").unwrap();

    bazel.run_ok(&["build", "//vm:probe", "//vm:reach_host"]);
    let read = |name: &str| {
        fs::read_to_string(bazel.workspace.join("bazel-bin/vm").join(name))
            .unwrap_or_else(|e| panic!("{name}: {e}"))
    };
    let probe = read("probe.txt");
    eprintln!("---- probe ----\n{probe}");
    let host_kernel = String::from_utf8(Command::new("uname").arg("-r").output().unwrap().stdout)
        .unwrap()
        .trim()
        .to_string();
    let guest_kernel = value(&probe, "kernel");
    assert_ne!(
        guest_kernel, host_kernel,
        "the action saw the host's kernel"
    );
    assert!(
        guest_kernel.contains("cloud-amd64"),
        "not the guest kernel: {guest_kernel}"
    );
    assert_eq!(value(&probe, "busybox"), "yes", "not the image's files");
    assert_eq!(value(&probe, "debian"), "no", "the host's files: {probe}");
    assert_eq!(value(&probe, "input"), "input-from-the-workspace");
    assert_eq!(read("out/nested.txt"), "nested\n");
    // 512 MB asked; the guest gets it plus at most the documented
    // overhead (kiln_vm::microvm::MEMORY_OVERHEAD_BYTES, 96 MiB), less
    // what its kernel keeps for itself.
    let asked_kb = 512_000_000 / 1024;
    let memtotal_kb: u64 = value(&probe, "memtotal_kb").parse().unwrap();
    assert!(
        memtotal_kb >= asked_kb && memtotal_kb <= asked_kb + 96 * 1024,
        "MemTotal {memtotal_kb} kB for EstimatedMemory=512MB ({asked_kb} kB)"
    );
    assert_eq!(
        value(&probe, "interfaces"),
        "lo",
        "dockerNetwork=off left a network device"
    );

    let reach = read("reach_host.txt");
    eprintln!("---- reach_host ----\n{reach}");
    assert!(
        value(&reach, "interfaces").split(' ').any(|i| i == "eth0"),
        "the bridged VM has no network device: {reach}"
    );
    for target in &targets {
        assert!(
            reach.contains(&format!("unreachable={target}")),
            "the VM reached the host at {target}: {reach}"
        );
    }
    drop(listener);

    // A timed-out action: it fails, and what it wrote before reaches Bazel.
    let output = bazel.run(&["build", "//vm:times_out"]);
    let text = combined(&output);
    eprintln!("---- times_out ----\n{text}");
    assert!(!output.status.success(), "a timed-out action succeeded");
    assert!(
        text.contains("partial-output-before-the-timeout"),
        "the partial output is lost:\n{text}"
    );

    // Requiring this executor's VMM runs; another VMM fails fast, naming it.
    bazel.run_ok(&["build", "//vm:on_this_vmm"]);
    let output = bazel.run(&["build", "//vm:on_another_vmm"]);
    let text = combined(&output);
    eprintln!("---- on_another_vmm ----\n{text}");
    assert!(!output.status.success(), "an action for another VMM ran");
    assert!(
        text.contains("vmm"),
        "the failure does not name vmm:\n{text}"
    );

    // An image that cannot become a disk: the error names it.
    let output = bazel.run(&["build", "//vm:no_such_image"]);
    let text = combined(&output);
    eprintln!("---- no_such_image ----\n{text}");
    assert!(!output.status.success());
    assert!(
        text.contains("kiln-test/no-such-image"),
        "the failure does not name the image:\n{text}"
    );

    // An output the CAS holds stays in the VM; Bazel gets it all the same.
    let held = "outputs the CAS holds stayed in the VM";
    bazel.run_ok(&["build", "//vm:big_first"]);
    assert!(
        !log().contains(held),
        "nothing was in the CAS yet:\n{}",
        log()
    );
    bazel.run_ok(&["build", "//vm:big_again"]);
    let line = log()
        .lines()
        .find(|line| line.contains(held))
        .map(str::to_string)
        .unwrap_or_else(|| panic!("the second output crossed again:\n{}", log()));
    assert!(
        line.contains("files=1") && line.contains("bytes=262144"),
        "{line}"
    );
    for name in ["big_first.bin", "big_again.bin"] {
        let bytes = fs::read(bazel.workspace.join("bazel-bin/vm").join(name)).unwrap();
        assert!(
            bytes.len() == 262144 && bytes.iter().all(|&b| b == b'k'),
            "{name}: {} bytes",
            bytes.len()
        );
    }
    assert_eq!(read("small.txt"), "small\n");

    bazel.run_ok(&["shutdown"]);
    vms.stop_and_check_nothing_left();
}
