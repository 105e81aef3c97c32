//! Boots a real VM under QEMU (TCG on hosts whose KVM cannot run guests)
//! from a root disk built here from a static busybox, and checks what an
//! action in it sees: the guest kernel, its output streams and exit
//! status, timeouts, OOM kills, cancellation, a user from /etc/passwd, the
//! requested memory, and the workspace disk read on the host afterwards.
//! Nothing of the VM may outlive it.
//!
//! Needs `qemu-system-x86_64`, `qemu-img`, e2fsprogs (`mke2fs`,
//! `debugfs`), a static `busybox` (Debian's `busybox-static`) and the
//! guest kernel at /usr/local/lib/kiln-vm; fails, naming what is missing,
//! without them.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use kiln_vm::tree_stream::DecodeLimits;
use kiln_vm::vmm::{DEFAULT_KERNEL, DEFAULT_MODULES_DIR};
use kiln_vm::{
    Ask, GuestOutcome, GuestStatus, GuestUser, Holder, Machine, Network, QemuConfig, QemuVmm,
    ReusePlan, RunRequest, Vm, VmSpec, Vmm, WorkspaceDisk,
};
use tokio::io::AsyncReadExt;
use tokio_util::sync::CancellationToken;

const APPLETS: &[&str] = &[
    "sh",
    "uname",
    "cat",
    "echo",
    "sleep",
    "id",
    "dd",
    "head",
    "grep",
    "ls",
    "mkdir",
    "sync",
    "date",
    "find",
    "stat",
    "readlink",
    "true",
    "sort",
    "kill",
    "sha256sum",
];

fn tool(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| panic!("{name} is needed for this test and is not installed"))
}

fn run_tool(command: &mut Command) -> String {
    let output = command.output().expect("running a tool");
    assert!(
        output.status.success(),
        "{command:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Whether an x86-64 ELF executable has no program interpreter (no
/// dynamic loader): it runs in a root with nothing else.
fn is_static(elf: &[u8]) -> bool {
    let u16_at = |at: usize| u16::from_le_bytes(elf[at..at + 2].try_into().unwrap()) as usize;
    let header_offset = u64::from_le_bytes(elf[0x20..0x28].try_into().unwrap()) as usize;
    let (entry_size, entries) = (u16_at(0x36), u16_at(0x38));
    assert!(elf.starts_with(b"\x7fELF"), "not an ELF executable");
    const PT_INTERP: u32 = 3;
    (0..entries).all(|i| {
        let at = header_offset + i * entry_size;
        u32::from_le_bytes(elf[at..at + 4].try_into().unwrap()) != PT_INTERP
    })
}

/// A root disk: busybox with its applets, /etc/passwd with a user.
fn root_disk(dir: &Path) -> PathBuf {
    let busybox = tool("busybox");
    assert!(
        is_static(&std::fs::read(&busybox).unwrap()),
        "{} is not static (install busybox-static)",
        busybox.display()
    );
    let tree = dir.join("root-tree");
    for sub in ["bin", "etc", "proc", "sys", "dev", "tmp", "work"] {
        std::fs::create_dir_all(tree.join(sub)).unwrap();
    }
    std::fs::copy(&busybox, tree.join("bin/busybox")).unwrap();
    for applet in APPLETS {
        std::os::unix::fs::symlink("busybox", tree.join("bin").join(applet)).unwrap();
    }
    std::fs::write(
        tree.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nbuilder:x:1000:1001:builder:/tmp:/bin/sh\n",
    )
    .unwrap();
    let image = dir.join("root.img");
    run_tool(
        Command::new(tool("mke2fs"))
            .args(["-q", "-t", "ext4", "-d"])
            .arg(&tree)
            .arg(&image)
            .arg("64M"),
    );
    image
}

fn workspace_disk(dir: &Path) -> PathBuf {
    let image = dir.join("work.img");
    run_tool(
        Command::new(tool("mke2fs"))
            .args(["-q", "-t", "ext4", "-E", "root_owner=1000:1001"])
            .arg(&image)
            .arg("32M"),
    );
    image
}

fn vm_console(vm_dir: &Path) -> String {
    std::fs::read_to_string(vm_dir.join("console.log")).unwrap()
}

/// Processes whose command line mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if cmdline.contains(needle) && !cmdline.contains("cargo") {
                found.push(cmdline);
            }
        }
    }
    found
}

#[derive(Debug)]
struct Output {
    stdout: String,
    stderr: String,
    outcome: GuestOutcome,
}

async fn run(vm: &dyn Vm, request: RunRequest) -> Output {
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    let outcome = vm
        .guest()
        .run(&request, &mut stdout, &mut stderr, CancellationToken::new())
        .await
        .unwrap_or_else(|e| panic!("running {:?}: {e}", request.arguments));
    Output {
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
        outcome,
    }
}

/// The QEMU config, with the machine type from `KILN_TEST_VM_MACHINE`
/// (`q35`, `pc`) to compare boot times.
/// The VMM every test boots with: [`qemu_config`] and the guest kernel
/// install-deps puts in place.
async fn test_vmm(dir: &Path) -> QemuVmm {
    QemuVmm::new(qemu_config(dir), Path::new(DEFAULT_KERNEL))
        .await
        .expect("QEMU is needed for this test")
}

fn qemu_config(dir: &Path) -> QemuConfig {
    let mut config = QemuConfig::new(dir.join("initramfs"));
    if let Ok(machine) = std::env::var("KILN_TEST_VM_MACHINE") {
        config.machine = match machine.as_str() {
            "pc" => Machine::Pc,
            "q35" => Machine::Q35,
            other => panic!("unknown machine {other}"),
        };
    }
    config
}

/// A VM of 256 MiB from [`root_disk`], its workspace disk at /work, its
/// files in `runtime`.
async fn boot_with_workspace(dir: &Path, name: &str, runtime: &Path) -> Box<dyn Vm> {
    let root = root_disk(dir);
    let work = workspace_disk(dir);
    let vmm = test_vmm(dir).await;
    let mut spec = VmSpec::new(name, &root, runtime);
    spec.memory_mib = 256;
    spec.workspace = Some(WorkspaceDisk {
        image: work,
        mount_at: "/work".into(),
    });
    vmm.boot(&spec).await.unwrap_or_else(|e| panic!("{e}"))
}

/// Runs `script` in `vm`'s shell, which must exit 0.
async fn run_ok(vm: &dyn Vm, script: &str) -> Output {
    let output = run(vm, shell(script)).await;
    assert_eq!(
        output.outcome.status,
        GuestStatus::Exited(0),
        "{script}: {}",
        output.stderr
    );
    output
}

fn shell(script: &str) -> RunRequest {
    RunRequest::new(["sh", "-c", script])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_action_runs_in_a_booted_vm() {
    assert!(
        Path::new(DEFAULT_KERNEL).is_file(),
        "no guest kernel at {DEFAULT_KERNEL} (install-deps unpacks it)"
    );
    let dir = tempfile::tempdir().unwrap();
    let root = root_disk(dir.path());
    let root_before = std::fs::read(&root).unwrap();
    let work = workspace_disk(dir.path());
    let runtime = dir.path().join("run");
    let vmm = test_vmm(dir.path()).await;
    let mut spec = VmSpec::new("test-vm", &root, &runtime);
    spec.modules_dir = DEFAULT_MODULES_DIR.into();
    spec.memory_mib = 384;
    spec.vcpus = 1;
    spec.network = Network::Off;
    spec.workspace = Some(WorkspaceDisk {
        image: work.clone(),
        mount_at: "/work".into(),
    });
    let vm = vmm.boot(&spec).await.unwrap_or_else(|e| panic!("{e}"));
    println!(
        "boot to ready: {:?} with {}",
        vm.boot_duration(),
        vm.accelerator()
    );

    // The guest's own kernel.
    let host_release = run_tool(Command::new("uname").arg("-r"));
    let uname = run(&*vm, RunRequest::new(["uname", "-r"])).await;
    assert_eq!(uname.outcome.status, GuestStatus::Exited(0));
    // The release install-deps unpacked (it records it beside the kernel).
    let installed = std::fs::read_to_string(
        std::path::Path::new(DEFAULT_KERNEL).with_file_name("kernel.version"),
    )
    .expect("kernel.version beside the guest kernel (scripts/install-deps.sh writes it)");
    assert_eq!(uname.stdout.trim(), installed.trim());
    assert_ne!(uname.stdout.trim(), host_release.trim());

    // Both streams, and a non-zero exit.
    let streams = run(&*vm, shell("echo to-out; echo to-err >&2; exit 3")).await;
    assert_eq!(streams.stdout, "to-out\n");
    assert_eq!(streams.stderr, "to-err\n");
    assert_eq!(streams.outcome.status, GuestStatus::Exited(3));
    assert!(!streams.outcome.timed_out && !streams.outcome.oom_killed);

    // A missing program is the shell's 127.
    let missing = run(&*vm, RunRequest::new(["no-such-program"])).await;
    assert_eq!(missing.outcome.status, GuestStatus::Exited(127));
    assert!(
        missing.stderr.contains("command not found"),
        "{}",
        missing.stderr
    );

    // A timeout: SIGTERM to the group, the output so far kept.
    let mut slow = shell("echo before-timeout; sleep 100; echo after");
    slow.timeout = Some(Duration::from_secs(2));
    slow.grace = Duration::from_secs(1);
    let timed_out = run(&*vm, slow).await;
    assert!(timed_out.outcome.timed_out, "{:?}", timed_out.outcome);
    assert_eq!(timed_out.stdout, "before-timeout\n");
    assert_eq!(timed_out.outcome.status, GuestStatus::Signaled(15));

    // A process ignoring SIGTERM is killed after the grace.
    let mut stubborn = shell("trap '' TERM; echo trapped; sleep 100 & wait; sleep 100");
    stubborn.timeout = Some(Duration::from_secs(1));
    stubborn.grace = Duration::from_secs(1);
    let killed = run(&*vm, stubborn).await;
    assert!(killed.outcome.timed_out);
    assert_eq!(killed.outcome.status, GuestStatus::Signaled(9));

    // Bulk output arrives whole (and how fast, for the record).
    let started = std::time::Instant::now();
    let bulk = run(
        &*vm,
        RunRequest::new(["dd", "if=/dev/zero", "bs=1M", "count=16"]),
    )
    .await;
    println!("16 MiB of stdout in {:?}", started.elapsed());
    assert_eq!(bulk.stdout.len(), 16 << 20);
    assert_eq!(bulk.outcome.status, GuestStatus::Exited(0));

    // A flood read slowly on the host still times out on time: the agent
    // queues output rather than blocking on its port.
    let (mut slow_reader, mut flood_writer) = tokio::io::duplex(64 << 10);
    let drained = tokio::spawn(async move {
        let mut total = 0usize;
        let mut buffer = vec![0u8; 64 << 10];
        loop {
            match slow_reader.read(&mut buffer).await.unwrap() {
                0 => return total,
                n => total += n,
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    let mut flood = shell("while true; do cat /bin/busybox; done");
    flood.timeout = Some(Duration::from_secs(2));
    flood.grace = Duration::from_secs(1);
    let flooded = vm
        .guest()
        .run(
            &flood,
            &mut flood_writer,
            tokio::io::sink(),
            CancellationToken::new(),
        )
        .await
        .unwrap();
    drop(flood_writer);
    assert!(flooded.timed_out, "{flooded:?}");
    println!(
        "flood read slowly: {} bytes before the timeout",
        drained.await.unwrap()
    );

    // The memory the guest sees is what was asked for, less the kernel's
    // own reservations.
    let meminfo = run(&*vm, RunRequest::new(["cat", "/proc/meminfo"])).await;
    let total_kib: u64 = meminfo
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("MemTotal in /proc/meminfo");
    println!("guest MemTotal: {total_kib} kB for {} MiB", spec.memory_mib);
    assert!(total_kib <= spec.memory_mib * 1024);
    assert!(
        total_kib >= spec.memory_mib * 1024 * 8 / 10,
        "{total_kib} kB"
    );

    // A memory limit: the action's cgroup is OOM-killed, and says so.
    let mut hungry = RunRequest::new(["dd", "if=/dev/zero", "of=/dev/null", "bs=128M", "count=1"]);
    hungry.memory_limit_bytes = Some(32 << 20);
    let oom = run(&*vm, hungry).await;
    assert!(oom.outcome.oom_killed, "{:?} {}", oom.outcome, oom.stderr);
    assert_eq!(oom.outcome.status, GuestStatus::Signaled(9));
    // The next action (in the cgroup the last one left empty) has neither
    // its limit nor its OOM kill.
    let fed = run(
        &*vm,
        RunRequest::new(["dd", "if=/dev/zero", "of=/dev/null", "bs=128M", "count=1"]),
    )
    .await;
    assert!(!fed.outcome.oom_killed, "{:?} {}", fed.outcome, fed.stderr);
    assert_eq!(fed.outcome.status, GuestStatus::Exited(0), "{}", fed.stderr);

    // A user named in the root disk's /etc/passwd.
    let mut as_builder = shell("id -u; id -g; echo from-builder > /work/by-builder.txt");
    as_builder.user = GuestUser::Name("builder".into());
    let builder = run(&*vm, as_builder).await;
    assert_eq!(builder.stdout, "1000\n1001\n", "{}", builder.stderr);
    assert_eq!(builder.outcome.status, GuestStatus::Exited(0));

    // Cancel while output streams: the control port is not behind the
    // data port.
    let cancel = CancellationToken::new();
    let (mut reader, mut writer) = tokio::io::duplex(1 << 20);
    let watcher = {
        let cancel = cancel.clone();
        tokio::spawn(async move {
            let mut seen = Vec::new();
            let mut buffer = [0u8; 4096];
            loop {
                let n = reader.read(&mut buffer).await.unwrap();
                if n == 0 {
                    return seen;
                }
                seen.extend_from_slice(&buffer[..n]);
                if seen.windows(7).any(|w| w == b"running") {
                    cancel.cancel();
                }
            }
        })
    };
    let endless = shell("while true; do echo running; sleep 0.05; done");
    let cancelled = vm
        .guest()
        .run(&endless, &mut writer, tokio::io::sink(), cancel)
        .await
        .unwrap();
    drop(writer);
    assert!(cancelled.cancelled);
    assert_eq!(cancelled.status, GuestStatus::Signaled(9));
    assert!(String::from_utf8(watcher.await.unwrap())
        .unwrap()
        .starts_with("running\n"));

    // A file written in the workspace, read on the host once the VM is
    // down; a file written outside it does not reach the cached root.
    run_ok(
        &*vm,
        "echo workspace-file > /work/out.txt && echo elsewhere > /etc/changed",
    )
    .await;
    // A process left running in the workspace does not keep it mounted.
    let linger = run(&*vm, shell("cd /work && sleep 1000 &")).await;
    assert_eq!(linger.outcome.status, GuestStatus::Exited(0));
    // Synced (journal checkpointed), the disk reads whole while mounted.
    vm.guest().sync().await.unwrap();
    let debugfs_cat = |path: &str| {
        run_tool(
            Command::new(tool("debugfs"))
                .args(["-R", &format!("cat {path}")])
                .arg(&work),
        )
    };
    assert_eq!(debugfs_cat("/out.txt"), "workspace-file\n");
    let console = vm_console(&runtime.join("test-vm"));
    assert!(!console.contains("kiln vm agent"), "{console}");
    let vm_dir = runtime.join("test-vm");
    assert!(vm_dir.is_dir());
    vm.shutdown().await.unwrap_or_else(|e| panic!("{e}"));
    let debugfs = |path: &str| {
        run_tool(
            Command::new(tool("debugfs"))
                .args(["-R", &format!("cat {path}")])
                .arg(&work),
        )
    };
    assert_eq!(debugfs("/out.txt"), "workspace-file\n");
    assert_eq!(debugfs("/by-builder.txt"), "from-builder\n");
    assert!(
        std::fs::read(&root).unwrap() == root_before,
        "the base root disk changed"
    );

    // Nothing left behind.
    assert!(!vm_dir.exists(), "{} is left", vm_dir.display());
    let left = processes_mentioning(&vm_dir.display().to_string());
    assert!(left.is_empty(), "processes left: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_vm_leaves_nothing_and_a_bad_kernel_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let root = root_disk(dir.path());
    let runtime = dir.path().join("run");
    let vmm = test_vmm(dir.path()).await;
    let mut spec = VmSpec::new("dropped-vm", &root, &runtime);
    spec.memory_mib = 256;
    spec.network = Network::User { netns: None };
    let vm = vmm.boot(&spec).await.unwrap_or_else(|e| panic!("{e}"));
    println!("boot to ready with a NIC: {:?}", vm.boot_duration());
    let network = run(&*vm, RunRequest::new(["cat", "/proc/net/route"])).await;
    assert!(
        network.stdout.contains("eth0\t00000000\t0202000A"),
        "no default route via 10.0.2.2: {}",
        network.stdout
    );
    // In the caller's own network namespace, slirp's 10.0.2.2 is the
    // host's loopback: what `Network::User { netns }` exists to prevent
    // (see the next test).
    let (port, answered) = loopback_listener();
    let reach = run(&*vm, shell(&format!("echo hi | nc 10.0.2.2 {port}"))).await;
    assert_eq!(reach.stdout, "pong\n", "{}", reach.stderr);
    answered.join().unwrap();

    let vm_dir = runtime.join("dropped-vm");
    assert!(vm_dir.is_dir());

    // QEMU dying mid-action: an error naming the VM, not a hang.
    let qemu_pids: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|entry| {
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline);
            cmdline.starts_with("qemu-system") && cmdline.contains(&*vm_dir.to_string_lossy())
        })
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(qemu_pids.len(), 1, "{qemu_pids:?}");
    let mut stdout = Vec::new();
    let sleeping = shell("echo sleeping; sleep 100");
    let action = vm.guest().run(
        &sleeping,
        &mut stdout,
        tokio::io::sink(),
        CancellationToken::new(),
    );
    let killer = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        run_tool(Command::new(tool("kill")).args(["-9", &qemu_pids[0]]));
    };
    let (result, ()) = tokio::join!(action, killer);
    let error = result.expect_err("QEMU was killed").to_string();
    println!("QEMU killed mid-action: {error}");
    assert!(error.contains("dropped-vm"), "{error}");
    drop(vm);
    assert!(!vm_dir.exists(), "{} is left", vm_dir.display());
    let left = processes_mentioning(&vm_dir.display().to_string());
    assert!(left.is_empty(), "processes left: {left:?}");

    // A kernel that is not one: the error names the VM and quotes QEMU
    // or the console.
    let bogus = dir.path().join("not-a-kernel");
    std::fs::write(&bogus, b"garbage").unwrap();
    let mut broken = VmSpec::new("broken-vm", &root, &runtime);
    broken.kernel = bogus;
    broken.boot_timeout = Duration::from_secs(30);
    let error = vmm
        .boot(&broken)
        .await
        .err()
        .expect("a bogus kernel fails")
        .to_string();
    println!("a bogus kernel: {error}");
    assert!(error.contains("broken-vm"), "{error}");
    assert!(error.contains("QEMU exited"), "{error}");
    assert!(!runtime.join("broken-vm").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_restores_files_and_processes() {
    let dir = tempfile::tempdir().unwrap();
    let root = root_disk(dir.path());
    let runtime = dir.path().join("run");
    let vmm = test_vmm(dir.path()).await;
    let mut spec = VmSpec::new("warm-vm", &root, &runtime);
    spec.memory_mib = 256;
    spec.boot_timeout = Duration::from_secs(60);
    let vm = vmm.boot(&spec).await.unwrap_or_else(|e| panic!("{e}"));
    let cold_boot = vm.boot_duration();
    run_ok(&*vm, "echo kept > /etc/marker; sleep 1000 & echo started").await;

    vm.pause().await.unwrap();
    vm.resume().await.unwrap();
    assert_eq!(
        run(&*vm, RunRequest::new(["echo", "resumed"])).await.stdout,
        "resumed\n"
    );

    let snapshot = dir.path().join("snapshot");
    vm.snapshot(&snapshot)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    drop(vm);

    let restored_spec = VmSpec {
        name: "restored-vm".into(),
        ..spec.clone()
    };
    let restored = vmm
        .restore(&restored_spec, &snapshot)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    println!(
        "cold boot {cold_boot:?}, restore to the agent's answer {:?}",
        restored.boot_duration()
    );
    // The guest's clock is the host's again (it stood still while saved).
    let clock = run(&*restored, RunRequest::new(["date", "+%s"])).await;
    let guest_seconds: i64 = clock.stdout.trim().parse().expect("date +%s");
    let host_seconds = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(
        (guest_seconds - host_seconds).abs() <= 5,
        "guest {guest_seconds} host {host_seconds}"
    );
    let marker = run(&*restored, RunRequest::new(["cat", "/etc/marker"])).await;
    assert_eq!(marker.stdout, "kept\n", "{}", marker.stderr);
    // The process the first action left in the background lives on.
    let processes = run(
        &*restored,
        shell("for p in /proc/[0-9]*; do cat $p/comm; done"),
    )
    .await;
    assert!(
        processes.stdout.lines().any(|name| name == "sleep"),
        "no sleep process: {}",
        processes.stdout
    );
    let restored_dir = runtime.join("restored-vm");
    // The agent logs to the console only what failed (the clock, the
    // reseed).
    let console = std::fs::read_to_string(restored_dir.join("console.log")).unwrap();
    assert!(!console.contains("kiln vm agent"), "{console}");
    drop(restored);
    assert!(!restored_dir.exists());
    assert!(processes_mentioning(&runtime.display().to_string()).is_empty());
}

/// A listener on the host's 127.0.0.1 answering one connection with
/// `pong`; its port.
fn loopback_listener() -> (u16, std::thread::JoinHandle<()>) {
    use std::io::Write;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let thread = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        stream.write_all(b"pong\n").unwrap();
    });
    (port, thread)
}

/// A network namespace made for a test, deleted after.
struct NetworkNamespace(String);

impl NetworkNamespace {
    fn new() -> Self {
        let name = format!("kiln-vm-test-{}", std::process::id());
        run_tool(Command::new(tool("ip")).args(["netns", "add", &name]));
        NetworkNamespace(name)
    }

    fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.0)
    }
}

impl Drop for NetworkNamespace {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.0])
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_in_its_own_network_namespace_cannot_reach_the_host_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let root = root_disk(dir.path());
    let runtime = dir.path().join("run");
    let vmm = test_vmm(dir.path()).await;
    let namespace = NetworkNamespace::new();
    let mut spec = VmSpec::new("netns-vm", &root, &runtime);
    spec.memory_mib = 256;
    spec.network = Network::User {
        netns: Some(namespace.path()),
    };
    let vm = vmm.boot(&spec).await.unwrap_or_else(|e| panic!("{e}"));
    let (port, _listener) = loopback_listener();
    let reach = run(&*vm, shell(&format!("echo hi | nc 10.0.2.2 {port}"))).await;
    assert_eq!(reach.stdout, "", "the host's loopback answered");
    assert_ne!(
        reach.outcome.status,
        GuestStatus::Exited(0),
        "{}",
        reach.stderr
    );
    drop(vm);
}

/// A warm VM's next inputs: `put` empties the mounted workspace (but its
/// `lost+found`) and writes the host's tree into it, modes and symlinks
/// included, while what the last action left outside the workspace (a
/// file, a process) stays; a paused VM resumes (and `cont` on a running
/// one is harmless).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_replaces_the_workspace_of_a_running_vm() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = dir.path().join("run");
    let vm = boot_with_workspace(dir.path(), "put-vm", &runtime).await;
    run_ok(
        &*vm,
        "mkdir -p /work/old/deep && echo old > /work/old/deep/file && echo old > /work/top \\
             && echo outside > /tmp/outside && (sleep 300 & echo $! > /tmp/sleep.pid)",
    )
    .await;

    let inputs = dir.path().join("inputs");
    std::fs::create_dir_all(inputs.join("pkg/sub")).unwrap();
    std::fs::write(inputs.join("pkg/sub/data.txt"), "new-input\n").unwrap();
    std::fs::write(inputs.join("tool.sh"), "#!/bin/sh\necho tool-ran\n").unwrap();
    std::fs::write(inputs.join("empty"), "").unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            inputs.join("tool.sh"),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        std::fs::set_permissions(
            inputs.join("pkg/sub"),
            std::fs::Permissions::from_mode(0o555),
        )
        .unwrap();
    }
    std::os::unix::fs::symlink("pkg/sub/data.txt", inputs.join("link")).unwrap();
    std::fs::write(inputs.join("big"), vec![7u8; 3 << 20]).unwrap();

    vm.pause().await.unwrap();
    vm.resume().await.unwrap();
    vm.resume().await.expect("cont on a running VM");
    vm.guest().ping().await.unwrap();
    let started = std::time::Instant::now();
    vm.guest()
        .put(Path::new("/work"), &inputs, ReusePlan::default())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    println!("put of 3 MiB and 5 entries: {:?}", started.elapsed());

    let listing = run(&*vm, shell("cd /work && find . | sort")).await;
    assert_eq!(
        listing.stdout,
        ".\n./big\n./empty\n./link\n./lost+found\n./pkg\n./pkg/sub\n./pkg/sub/data.txt\n./tool.sh\n",
        "{}",
        listing.stderr
    );
    let checks = run(
        &*vm,
        shell(
            "cd /work && cat link && ./tool.sh && stat -c %a pkg/sub && stat -c '%a %s' tool.sh big empty \\
             && readlink link && cat /tmp/outside && kill -0 $(cat /tmp/sleep.pid) && echo alive",
        ),
    )
    .await;
    assert_eq!(
        checks.stdout,
        "new-input\ntool-ran\n555\n755 24\n644 3145728\n644 0\npkg/sub/data.txt\noutside\nalive\n",
        "{}",
        checks.stderr
    );

    // The next inputs share files with these: those the last action left
    // as they were are kept in the guest, wherever they move, not sent.
    let big_inode = run(&*vm, shell("stat -c %i /work/big")).await.stdout;
    let next = dir.path().join("next-inputs");
    std::fs::create_dir_all(next.join("moved")).unwrap();
    std::fs::create_dir_all(next.join("pkg/sub")).unwrap();
    std::fs::copy(inputs.join("big"), next.join("moved/big")).unwrap();
    std::fs::copy(inputs.join("tool.sh"), next.join("tool.sh")).unwrap();
    std::fs::write(next.join("pkg/sub/data.txt"), "changed-input\n").unwrap();
    let plan = ReusePlan::new(&digests(&inputs), &digests(&next));
    let started = std::time::Instant::now();
    let put = vm.guest().put(Path::new("/work"), &next, plan).await;
    let put = put.unwrap_or_else(|e| panic!("{e}"));
    println!(
        "put of 3 MiB kept in the guest: {:?}, {put:?}",
        started.elapsed()
    );
    assert_eq!(put.stale, None);
    assert_eq!((put.reused_files, put.reused_bytes), (2, (3 << 20) + 24));
    assert!(put.stream_bytes < 4096, "{put:?}: the kept files were sent");
    let kept = run(
        &*vm,
        shell(
            "cd /work && find . | sort && stat -c '%i %a' moved/big && stat -c %a tool.sh \
             && sha256sum moved/big tool.sh pkg/sub/data.txt && ls -A lost+found",
        ),
    )
    .await;
    assert_eq!(
        kept.stdout,
        format!(
            ".\n./lost+found\n./moved\n./moved/big\n./pkg\n./pkg/sub\n./pkg/sub/data.txt\n\
             ./tool.sh\n{} 644\n755\n{}",
            big_inode.trim(),
            sha256sums(&next, &["moved/big", "tool.sh", "pkg/sub/data.txt"]),
        ),
        "{}",
        kept.stderr
    );

    // A kept file the last action changed (in place: same inode) makes
    // the agent answer stale, and sent whole it holds its own bytes again.
    let tamper = run(&*vm, shell("echo tampered >> /work/moved/big")).await;
    assert_eq!(tamper.outcome.status, GuestStatus::Exited(0));
    let plan = ReusePlan::new(&digests(&next), &digests(&inputs));
    let put = vm.guest().put(Path::new("/work"), &inputs, plan).await;
    let put = put.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(put.stale.as_deref(), Some("big"), "{put:?}");
    let whole = vm
        .guest()
        .put(Path::new("/work"), &inputs, ReusePlan::default());
    whole.await.unwrap_or_else(|e| panic!("{e}"));
    let resent = run(&*vm, shell("cd /work && sha256sum big tool.sh")).await;
    assert_eq!(resent.stdout, sha256sums(&inputs, &["big", "tool.sh"]));
    // What that put wrote, and the one action since only read, is kept:
    // the action started after the put's last file time.
    let plan = ReusePlan::new(&digests(&inputs), &digests(&inputs));
    let put = vm.guest().put(Path::new("/work"), &inputs, plan).await;
    let put = put.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((&put.stale, put.reused_files), (&None, 3), "{put:?}");

    // An output the last action wrote, as `collect` sent it, is kept too:
    // the next inputs take it by digest without it crossing again.
    run_ok(
        &*vm,
        "mkdir -p /work/out && dd if=/dev/urandom of=/work/out/result.bin bs=1k count=512",
    )
    .await;
    let limits = DecodeLimits {
        entries: 100,
        bytes: 1 << 30,
    };
    held_outputs_are_not_sent(&*vm, dir.path(), limits).await;

    let stream = dir.path().join("outputs.stream");
    let collected = dir.path().join("collected");
    // The output's parent, as the worker makes it before an action.
    std::fs::create_dir_all(collected.join("out")).unwrap();
    let output = [PathBuf::from("out/result.bin")];
    vm.guest()
        .collect(Path::new("/work"), &output, &stream, 1 << 30, None)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut stream = std::fs::File::open(&stream).unwrap();
    kiln_vm::tree_stream::decode(&mut stream, &collected, limits).unwrap();
    let mut held = digests(&inputs);
    held.extend(digests(&collected));
    let chained = dir.path().join("chained-inputs");
    std::fs::create_dir_all(chained.join("in")).unwrap();
    std::fs::copy(
        collected.join("out/result.bin"),
        chained.join("in/from-output.bin"),
    )
    .unwrap();
    let plan = ReusePlan::new(&held, &digests(&chained));
    let put = vm.guest().put(Path::new("/work"), &chained, plan).await;
    let put = put.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((&put.stale, put.reused_files), (&None, 1), "{put:?}");
    assert!(put.stream_bytes < 4096, "{put:?}: the output was sent back");
    let took = run(
        &*vm,
        shell("cd /work && find . | sort && sha256sum in/from-output.bin"),
    )
    .await;
    assert_eq!(
        took.stdout,
        format!(
            ".\n./in\n./in/from-output.bin\n./lost+found\n{}",
            sha256sums(&chained, &["in/from-output.bin"])
        ),
        "{}",
        took.stderr
    );

    // A trivial action with its inputs, as a warm runner's: how long.
    let empty = dir.path().join("empty-inputs");
    std::fs::create_dir_all(&empty).unwrap();
    let mut rounds = Vec::new();
    for _ in 0..20 {
        let started = std::time::Instant::now();
        vm.resume().await.unwrap();
        vm.guest().ping().await.unwrap();
        let put = vm
            .guest()
            .put(Path::new("/work"), &empty, ReusePlan::default());
        put.await.unwrap();
        let done = run(&*vm, RunRequest::new(["true"])).await;
        assert_eq!(done.outcome.status, GuestStatus::Exited(0));
        vm.pause().await.unwrap();
        rounds.push(started.elapsed());
    }
    rounds.sort();
    println!(
        "resume, ping, put, run `true`, pause: median {:?}",
        rounds[rounds.len() / 2]
    );
    vm.resume().await.unwrap();
    let left = run(&*vm, shell("ls -A /work")).await;
    assert_eq!(left.stdout, "lost+found\n");
    drop(vm);
    assert!(processes_mentioning(&runtime.display().to_string()).is_empty());
}

/// A holder that says it holds the blobs of one size, and notes every
/// question.
struct HoldsSize {
    size: u64,
    asked: std::sync::Mutex<Vec<(u64, [u8; 32])>>,
}

#[async_trait::async_trait]
impl Holder for HoldsSize {
    async fn holds(&self, size: u64, sha256: [u8; 32]) -> bool {
        self.asked.lock().unwrap().push((size, sha256));
        size == self.size
    }
}

/// With `out/result.bin` (512 KiB) in the guest's workspace: a collect
/// that asks about files of 64 KiB or more hashes them in the guest (the
/// SHA-256 the guest's own sha256sum prints), does not send the one the
/// holder holds (an empty placeholder, reported), sends the others whole,
/// and never asks about a small file.
async fn held_outputs_are_not_sent(vm: &dyn Vm, dir: &Path, limits: DecodeLimits) {
    let wrote = run_ok(
        vm,
        "cd /work/out && dd if=/dev/urandom of=other.bin bs=1k count=100 2>/dev/null \
             && echo note > note && sha256sum result.bin other.bin",
    )
    .await;
    let holder = HoldsSize {
        size: 512 << 10,
        asked: Default::default(),
    };
    let ask = Ask {
        from_bytes: 64 << 10,
        holder: &holder,
    };
    let stream = dir.join("asked.stream");
    let collected = dir.join("collected-asked");
    std::fs::create_dir_all(&collected).unwrap();
    let confirmed = vm
        .guest()
        .collect(
            Path::new("/work"),
            &[PathBuf::from("out")],
            &stream,
            1 << 30,
            Some(ask),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let stream_bytes = std::fs::metadata(&stream).unwrap().len();
    assert!(
        (100 << 10..200 << 10).contains(&stream_bytes),
        "{stream_bytes} bytes of stream: only other.bin's content should cross"
    );
    let decoded = kiln_vm::tree_stream::decode(
        &mut std::fs::File::open(&stream).unwrap(),
        &collected,
        limits,
    )
    .unwrap();

    let guest_sums: Vec<(String, String)> = wrote
        .stdout
        .lines()
        .map(|line| {
            let (sum, name) = line.split_once("  ").unwrap();
            (name.to_string(), sum.to_string())
        })
        .collect();
    let asked = holder.asked.lock().unwrap().clone();
    let asked: Vec<(u64, String)> = asked
        .iter()
        .map(|(size, sha)| (*size, hex::encode(sha)))
        .collect();
    assert_eq!(
        asked,
        [
            (100 << 10, guest_sums[1].1.clone()),
            (512 << 10, guest_sums[0].1.clone())
        ],
        "the asks, in the stream's order (sorted names; note is too small)"
    );
    let result_sha: [u8; 32] = hex::decode(&guest_sums[0].1).unwrap().try_into().unwrap();
    assert_eq!(confirmed, [(512 << 10, result_sha)].into_iter().collect());
    assert_eq!(
        decoded.stored,
        [("out/result.bin".to_string(), 512 << 10, result_sha)]
    );
    assert_eq!(
        std::fs::metadata(collected.join("out/result.bin"))
            .unwrap()
            .len(),
        0
    );
    assert_eq!(
        sha256sums(&collected, &["out/other.bin"]),
        format!("{}  out/other.bin\n", guest_sums[1].1)
    );
    assert_eq!(
        std::fs::read(collected.join("out/note")).unwrap(),
        b"note\n"
    );
    let cleaned = run(vm, shell("rm /work/out/other.bin /work/out/note")).await;
    assert_eq!(cleaned.outcome.status, GuestStatus::Exited(0));
}

/// The digest of each regular file beneath `root`, by relative path.
fn digests(root: &Path) -> kiln_worker::isolation::InputDigests {
    use sha2::Digest as _;
    let mut out = kiln_worker::isolation::InputDigests::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let metadata = std::fs::symlink_metadata(&path).unwrap();
            if metadata.is_dir() {
                pending.push(path);
            } else if metadata.is_file() {
                let bytes = std::fs::read(&path).unwrap();
                let relative = path.strip_prefix(root).unwrap().to_str().unwrap();
                out.insert(
                    relative.to_owned(),
                    kiln_proto::reapi::Digest {
                        hash: hex::encode(sha2::Sha256::digest(&bytes)),
                        size_bytes: bytes.len() as i64,
                    },
                );
            }
        }
    }
    out
}

/// What busybox's `sha256sum PATH…` prints for `paths` beneath `root`.
fn sha256sums(root: &Path, paths: &[&str]) -> String {
    use sha2::Digest as _;
    paths
        .iter()
        .map(|path| {
            let bytes = std::fs::read(root.join(path)).unwrap();
            format!("{}  {path}\n", hex::encode(sha2::Sha256::digest(&bytes)))
        })
        .collect()
}

/// What hashing outputs in the guest costs and saves, against sending
/// them whole: 16 MiB of random output collected as it is today, asked
/// about and not held (a new output: hashed, then sent), and asked about
/// and held (hashed, not sent); and 16 MiB of inputs put into it. Prints
/// the median of 5 each; see benchmarks/microvm.md.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: cargo test --release -p kiln-vm --test boot measure -- --ignored --nocapture"]
async fn measure_output_hashing() {
    let dir = tempfile::tempdir().unwrap();
    let vm = boot_with_workspace(dir.path(), "hash-vm", &dir.path().join("run")).await;
    run_ok(
        &*vm,
        "dd if=/dev/urandom of=/work/out.bin bs=1M count=16 2>/dev/null",
    )
    .await;
    let outputs = [PathBuf::from("out.bin")];
    let (no, yes) = (
        HoldsSize {
            size: 0,
            asked: Default::default(),
        },
        HoldsSize {
            size: 16 << 20,
            asked: Default::default(),
        },
    );
    let ways: [(&str, Option<Ask>); 3] = [
        ("sent whole", None),
        (
            "hashed, not held, sent",
            Some(Ask {
                from_bytes: 1,
                holder: &no,
            }),
        ),
        (
            "hashed, held, not sent",
            Some(Ask {
                from_bytes: 1,
                holder: &yes,
            }),
        ),
    ];
    let stream = dir.path().join("measure.stream");
    for (name, ask) in ways {
        let mut times = Vec::new();
        for _ in 0..5 {
            let started = std::time::Instant::now();
            vm.guest()
                .collect(Path::new("/work"), &outputs, &stream, 1 << 30, ask)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            times.push(started.elapsed());
        }
        times.sort();
        println!(
            "16 MiB output, {name}: median {:?} (min {:?}, max {:?}), {} bytes of stream",
            times[2],
            times[0],
            times[4],
            std::fs::metadata(&stream).unwrap().len()
        );
    }
    // The other way: 16 MiB of new inputs put into the workspace.
    let inputs = dir.path().join("inputs");
    std::fs::create_dir_all(&inputs).unwrap();
    let random: Vec<u8> = (0..16u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    std::fs::write(inputs.join("in.bin"), random).unwrap();
    let mut times = Vec::new();
    for _ in 0..5 {
        let started = std::time::Instant::now();
        let put = vm
            .guest()
            .put(Path::new("/work"), &inputs, ReusePlan::default());
        put.await.unwrap_or_else(|e| panic!("{e}"));
        times.push(started.elapsed());
    }
    times.sort();
    println!(
        "16 MiB input, put: median {:?} (min {:?}, max {:?})",
        times[2], times[0], times[4]
    );
    drop(vm);
}
