//! The QEMU driver of the VMM seam: `-M q35` (or `pc`) with virtio-pci
//! devices, KVM where /dev/kvm really runs a guest kernel and TCG
//! otherwise. The agent's ports are virtio-serial ports on Unix sockets
//! (they survive migrate-to-file, unlike vsock, which this host lacks);
//! QMP drives pause, resume, snapshot and quit. A VM owns a runtime
//! directory (sockets, console log, its root disk's qcow2 overlay) that
//! goes with it, as does its QEMU process, whatever way the VM ends.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::guest::{console_tail, Guest};
use crate::initramfs;
use crate::vmm::{Accelerator, Network, Vm, VmSpec, Vmm};
use crate::VmError;

/// Which accelerator to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AcceleratorChoice {
    /// KVM when a guest kernel really runs under it, TCG otherwise.
    Auto,
    Kvm,
    Tcg,
}

/// QEMU's machine type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Machine {
    /// Measured fastest to the agent's `ready` under TCG here.
    Q35,
    Pc,
}

impl Machine {
    fn as_str(self) -> &'static str {
        match self {
            Machine::Q35 => "q35",
            Machine::Pc => "pc",
        }
    }
}

#[derive(Clone, Debug)]
pub struct QemuConfig {
    /// `qemu-system-x86_64`, looked up in PATH without a `/`.
    pub qemu: PathBuf,
    /// `qemu-img`, for the root disk's overlay.
    pub qemu_img: PathBuf,
    /// Where initramfs archives are cached (one per kernel and agent).
    pub initramfs_cache: PathBuf,
    pub accelerator: AcceleratorChoice,
    pub machine: Machine,
}

impl QemuConfig {
    pub fn new(initramfs_cache: impl Into<PathBuf>) -> Self {
        QemuConfig {
            qemu: "qemu-system-x86_64".into(),
            qemu_img: "qemu-img".into(),
            initramfs_cache: initramfs_cache.into(),
            accelerator: AcceleratorChoice::Auto,
            machine: Machine::Q35,
        }
    }
}

/// The QEMU VMM.
pub struct QemuVmm {
    config: QemuConfig,
    accelerator: Accelerator,
}

/// How long the KVM probe waits for the kernel to reach its root mount:
/// under real KVM it takes well under a second.
const KVM_PROBE_TIME: Duration = Duration::from_secs(10);

impl QemuVmm {
    /// Checks QEMU runs and picks the accelerator. `Auto` probes KVM by
    /// booting `probe_kernel` with no root: under working KVM it panics
    /// for want of one within a second; under a paravirtualised /dev/kvm
    /// (PVM), which runs real-mode code but no 64-bit guest kernel, it
    /// hangs and TCG is chosen.
    pub async fn new(config: QemuConfig, probe_kernel: &Path) -> Result<QemuVmm, VmError> {
        let version = tokio::process::Command::new(&config.qemu)
            .arg("--version")
            .output()
            .await
            .map_err(|e| VmError::Setup(format!("running {}: {e}", config.qemu.display())))?;
        if !version.status.success() {
            return Err(VmError::Setup(format!(
                "{} --version failed: {}",
                config.qemu.display(),
                String::from_utf8_lossy(&version.stderr)
            )));
        }
        if !probe_kernel.is_file() {
            return Err(VmError::Setup(format!(
                "no guest kernel at {}",
                probe_kernel.display()
            )));
        }
        let accelerator = match config.accelerator {
            AcceleratorChoice::Kvm => Accelerator::QemuKvm,
            AcceleratorChoice::Tcg => Accelerator::QemuTcg,
            AcceleratorChoice::Auto => {
                let config = config.clone();
                let kernel = probe_kernel.to_path_buf();
                let works = tokio::task::spawn_blocking(move || kvm_runs_kernel(&config, &kernel))
                    .await
                    .unwrap_or(false);
                if works {
                    Accelerator::QemuKvm
                } else {
                    tracing::info!("KVM does not run a guest kernel here; QEMU uses TCG");
                    Accelerator::QemuTcg
                }
            }
        };
        Ok(QemuVmm {
            config,
            accelerator,
        })
    }

    fn command(&self, spec: &VmSpec, dir: &Path, initramfs: &Path) -> Command {
        let mut command = Command::new(&self.config.qemu);
        let (accel, cpu) = match self.accelerator {
            Accelerator::QemuKvm => ("kvm", "host"),
            Accelerator::QemuTcg => ("tcg", "max"),
        };
        let path = |name: &str| dir.join(name).display().to_string();
        command
            .args(["-name", &spec.name])
            .args(["-machine", self.config.machine.as_str()])
            .args(["-accel", accel, "-cpu", cpu])
            .args(["-smp", &spec.vcpus.max(1).to_string()])
            .args(["-m", &format!("{}M", spec.memory_mib)])
            .args(["-nodefaults", "-no-user-config", "-display", "none"])
            .args(["-no-reboot"])
            .arg("-kernel")
            .arg(&spec.kernel)
            .arg("-initrd")
            .arg(initramfs)
            .args(["-append", "console=ttyS0 panic=-1 rdinit=/init"])
            .args([
                "-chardev",
                &format!("file,id=console,path={}", path("console.log")),
            ])
            .args(["-serial", "chardev:console"])
            .args([
                "-qmp",
                &format!("unix:{},server=on,wait=off", path("qmp.sock")),
            ])
            .args(["-device", "virtio-serial-pci,id=ports"]);
        for (id, name) in [("control", "kiln.control"), ("data", "kiln.data")] {
            command
                .args([
                    "-chardev",
                    &format!(
                        "socket,id={id},path={},server=on,wait=off",
                        path(&format!("{id}.sock"))
                    ),
                ])
                .args([
                    "-device",
                    &format!("virtserialport,bus=ports.0,chardev={id},name={name}"),
                ]);
        }
        command
            .args([
                "-drive",
                &format!(
                    "file={},format=qcow2,if=none,id=root,cache=unsafe",
                    path("root.qcow2")
                ),
            ])
            .args(["-device", "virtio-blk-pci,drive=root,serial=kiln-root"]);
        if let Some(workspace) = &spec.workspace {
            command
                .args([
                    "-drive",
                    &format!(
                        "file={},format=raw,if=none,id=work,cache=writeback",
                        workspace.image.display()
                    ),
                ])
                .args(["-device", "virtio-blk-pci,drive=work,serial=kiln-work"]);
        }
        if let Network::User { .. } = spec.network {
            command
                .args(["-netdev", "user,id=net"])
                .args(["-device", "virtio-net-pci,netdev=net,romfile="]);
        }
        command
    }

    /// Makes the VM's runtime directory, its root overlay (from `base`,
    /// a qcow2 overlay of the raw root disk when None) and starts QEMU;
    /// the VM is connected to its sockets, not yet booted.
    async fn start(
        &self,
        spec: &VmSpec,
        overlay_from: Option<&Path>,
        incoming: Option<&Path>,
    ) -> Result<QemuVm, VmError> {
        let setup = |what: &str, e: &dyn std::fmt::Display| {
            VmError::Setup(format!("VM {}: {what}: {e}", spec.name))
        };
        if spec.name.is_empty() || spec.name.contains(['/', ',']) {
            return Err(VmError::Setup(format!("bad VM name {:?}", spec.name)));
        }
        if !spec.root_disk.is_file() {
            return Err(VmError::Setup(format!(
                "VM {}: no root disk at {}",
                spec.name,
                spec.root_disk.display()
            )));
        }
        let initramfs = {
            let (kernel, modules, cache) = (
                spec.kernel.clone(),
                spec.modules_dir.clone(),
                self.config.initramfs_cache.clone(),
            );
            tokio::task::spawn_blocking(move || initramfs::build_cached(&kernel, &modules, &cache))
                .await
                .map_err(|e| setup("building the initramfs", &e))??
        };
        let dir = spec.runtime_dir.join(&spec.name);
        // sun_path holds 107 bytes and a NUL.
        let longest = dir.join("control.sock").as_os_str().len();
        if longest > 107 {
            return Err(VmError::Setup(format!(
                "VM {}: its runtime dir {} is too long for socket paths ({longest} > 107 bytes)",
                spec.name,
                dir.display()
            )));
        }
        if dir.exists() {
            // A VM of that name that did not clean up (a crash): its QEMU
            // died with it (`-no-reboot`, parent-death is not assumed).
            let _ = std::fs::remove_dir_all(&dir);
        }
        std::fs::create_dir_all(&dir).map_err(|e| setup("creating its runtime dir", &e))?;
        // From here on the directory is removed when `cleanup` drops.
        let mut cleanup = Cleanup {
            dir: Some(dir.clone()),
            child: None,
        };
        let overlay = dir.join("root.qcow2");
        match overlay_from {
            Some(saved) => {
                std::fs::copy(saved, &overlay)
                    .map_err(|e| setup("copying the saved overlay", &e))?;
            }
            None => {
                let output = tokio::process::Command::new(&self.config.qemu_img)
                    .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
                    .arg(std::path::absolute(&spec.root_disk).unwrap_or(spec.root_disk.clone()))
                    .arg(&overlay)
                    .output()
                    .await
                    .map_err(|e| setup("running qemu-img", &e))?;
                if !output.status.success() {
                    return Err(setup(
                        "creating the root disk's overlay",
                        &String::from_utf8_lossy(&output.stderr),
                    ));
                }
            }
        }
        let mut command = self.command(spec, &dir, &initramfs);
        if let Some(snapshot) = incoming {
            command.args([
                "-incoming",
                &format!("exec:cat {}", shell_quote(&snapshot.display().to_string())),
            ]);
        }
        let qemu_log = File::create(dir.join("qemu.log")).map_err(|e| setup("qemu.log", &e))?;
        command
            .stdin(Stdio::null())
            .stdout(qemu_log.try_clone().map_err(|e| setup("qemu.log", &e))?)
            .stderr(qemu_log);
        let netns = match &spec.network {
            Network::User { netns: Some(path) } => {
                Some(File::open(path).map_err(|e| setup("opening its network namespace", &e))?)
            }
            _ => None,
        };
        if let Some(netns) = &netns {
            let fd = netns.as_raw_fd();
            // SAFETY: between fork and exec the closure only calls setns,
            // which is async-signal-safe, on a descriptor that outlives
            // the spawn.
            unsafe {
                command.pre_exec(move || {
                    if setns(fd, CLONE_NEWNET) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let started = Instant::now();
        let child = command
            .spawn()
            .map_err(|e| setup(&format!("starting {}", self.config.qemu.display()), &e))?;
        drop(netns);
        cleanup.child = Some(child);
        let sockets = async {
            let control = connect(&dir.join("control.sock"), &mut cleanup).await?;
            let data = connect(&dir.join("data.sock"), &mut cleanup).await?;
            let qmp = connect(&dir.join("qmp.sock"), &mut cleanup).await?;
            Ok::<_, String>((control, data, qmp))
        }
        .await;
        let (control, data, qmp) = match sockets {
            Ok(sockets) => sockets,
            Err(e) => {
                return Err(VmError::Guest {
                    vm: spec.name.clone(),
                    message: format!("QEMU did not start: {e}: {}", qemu_log_text(&dir)),
                    console: console_tail(&dir.join("console.log")),
                });
            }
        };
        let guest = Guest::new(&spec.name, &dir.join("console.log"), control, data);
        let qmp = match Qmp::connect(qmp).await {
            Ok(qmp) => qmp,
            Err(e) => {
                // The directory goes when `cleanup` drops, after its log
                // is read.
                let cleanup = parking_lot::Mutex::new(cleanup);
                let exited = qemu_exit(&cleanup).await;
                let log = exited
                    .map(|status| format!("; QEMU exited ({status}): {}", qemu_log_text(&dir)))
                    .unwrap_or_default();
                return Err(guest.error(format!("QMP: {e}{log}")));
            }
        };
        Ok(QemuVm {
            name: spec.name.clone(),
            accelerator: self.accelerator,
            started,
            boot_duration: Duration::ZERO,
            guest,
            qmp: tokio::sync::Mutex::new(qmp),
            cleanup: parking_lot::Mutex::new(cleanup),
            overlay,
        })
    }
}

#[async_trait]
impl Vmm for QemuVmm {
    fn accelerator(&self) -> Accelerator {
        self.accelerator
    }

    async fn boot(&self, spec: &VmSpec) -> Result<Box<dyn Vm>, VmError> {
        let mut vm = self.start(spec, None, None).await?;
        let network = matches!(spec.network, Network::User { .. });
        let workspace = spec.workspace.as_ref().map(|w| w.mount_at.as_path());
        let handshake = vm.guest.handshake(workspace, network, &spec.hostname);
        match tokio::time::timeout(spec.boot_timeout, handshake).await {
            Ok(Ok(_release)) => {}
            Ok(Err(e)) => return Err(vm.with_qemu_log(e).await),
            Err(_) => {
                return Err(vm.guest.error(format!(
                    "the guest did not boot within {:?}",
                    spec.boot_timeout
                )))
            }
        }
        vm.boot_duration = vm.started.elapsed();
        Ok(Box::new(vm))
    }

    async fn restore(&self, spec: &VmSpec, snapshot_dir: &Path) -> Result<Box<dyn Vm>, VmError> {
        let memory = snapshot_dir.join("memory");
        let overlay = snapshot_dir.join("root.qcow2");
        if !memory.is_file() || !overlay.is_file() {
            return Err(VmError::Setup(format!(
                "VM {}: {} holds no snapshot",
                spec.name,
                snapshot_dir.display()
            )));
        }
        let mut vm = self.start(spec, Some(&overlay), Some(&memory)).await?;
        // The VM was paused when saved, so it stays paused once loaded:
        // wait for the load, then resume it. The agent answers a ping
        // as soon as it runs.
        let resumed = async {
            let deadline = Instant::now() + spec.boot_timeout;
            loop {
                let status = vm.qmp(r#"{"execute":"query-status"}"#).await?;
                if !status.contains("inmigrate") {
                    break;
                }
                if Instant::now() > deadline {
                    return Err(vm.guest.error("loading the snapshot did not finish"));
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            vm.resume().await?;
            vm.guest.ping().await
        };
        match tokio::time::timeout(spec.boot_timeout, resumed).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(vm.with_qemu_log(e).await),
            Err(_) => {
                return Err(vm.guest.error(format!(
                    "the restored guest did not answer within {:?}",
                    spec.boot_timeout
                )))
            }
        }
        vm.boot_duration = vm.started.elapsed();
        Ok(Box::new(vm))
    }
}

/// A VM's QEMU process and runtime directory, killed and removed on drop.
struct Cleanup {
    dir: Option<PathBuf>,
    child: Option<Child>,
}

impl Cleanup {
    fn qemu_exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut()?.try_wait().ok().flatten()
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            // SIGKILL ends it at once: this wait is short.
            let _ = child.wait();
        }
        if let Some(dir) = self.dir.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// QEMU's exit status if it exits within half a second: sockets close as
/// QEMU exits, so whoever saw one close gives it a moment.
async fn qemu_exit(cleanup: &parking_lot::Mutex<Cleanup>) -> Option<std::process::ExitStatus> {
    for _ in 0..50 {
        if let Some(status) = cleanup.lock().qemu_exited() {
            return Some(status);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    None
}

/// Connects to a socket QEMU makes, once it exists (bounded; fails early
/// when QEMU exits).
async fn connect(path: &Path, cleanup: &mut Cleanup) -> Result<UnixStream, String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match UnixStream::connect(path).await {
            Ok(stream) => return Ok(stream),
            Err(e) => {
                if let Some(status) = cleanup.qemu_exited() {
                    return Err(format!("QEMU exited ({status})"));
                }
                if Instant::now() > deadline {
                    return Err(format!("connecting to {}: {e}", path.display()));
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn qemu_log_text(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("qemu.log"))
        .unwrap_or_default()
        .trim()
        .to_string()
}

fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

const CLONE_NEWNET: std::ffi::c_int = 0x4000_0000;

extern "C" {
    fn setns(fd: std::ffi::c_int, kind: std::ffi::c_int) -> std::ffi::c_int;
}

/// Whether QEMU with KVM gets `kernel` to its root mount (a panic for
/// want of a root) in [`KVM_PROBE_TIME`].
fn kvm_runs_kernel(config: &QemuConfig, kernel: &Path) -> bool {
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        return false;
    }
    let Ok(dir) = tempfile::tempdir() else {
        return false;
    };
    let console = dir.path().join("console.log");
    let child = Command::new(&config.qemu)
        .args(["-machine", config.machine.as_str(), "-accel", "kvm"])
        .args([
            "-cpu",
            "host",
            "-m",
            "128M",
            "-nodefaults",
            "-no-user-config",
        ])
        .args(["-display", "none", "-no-reboot"])
        .arg("-kernel")
        .arg(kernel)
        .args(["-append", "console=ttyS0 panic=-1"])
        .args(["-serial", &format!("file:{}", console.display())])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let Ok(mut child) = child else {
        return false;
    };
    let deadline = Instant::now() + KVM_PROBE_TIME;
    let mut reached_root = false;
    while Instant::now() < deadline {
        let log = std::fs::read_to_string(&console).unwrap_or_default();
        if log.contains("VFS: Unable to mount root") || log.contains("Kernel panic") {
            reached_root = true;
            break;
        }
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    reached_root
}

/// A QMP connection: one command at a time, events skipped.
struct Qmp {
    reader: BufReader<tokio::net::unix::OwnedReadHalf>,
    writer: tokio::net::unix::OwnedWriteHalf,
}

const QMP_TIMEOUT: Duration = Duration::from_secs(60);

impl Qmp {
    async fn connect(stream: UnixStream) -> Result<Qmp, String> {
        let (read, write) = stream.into_split();
        let mut qmp = Qmp {
            reader: BufReader::new(read),
            writer: write,
        };
        let greeting = qmp.line().await?;
        if !greeting.contains("\"QMP\"") {
            return Err(format!("unexpected greeting {greeting}"));
        }
        qmp.execute(r#"{"execute":"qmp_capabilities"}"#).await?;
        Ok(qmp)
    }

    async fn line(&mut self) -> Result<String, String> {
        let mut line = String::new();
        let read = tokio::time::timeout(QMP_TIMEOUT, self.reader.read_line(&mut line))
            .await
            .map_err(|_| "QMP did not answer".to_string())?
            .map_err(|e| e.to_string())?;
        if read == 0 {
            return Err("QMP closed (QEMU exited)".into());
        }
        Ok(line)
    }

    /// Runs `command` (a JSON object); its answer's line.
    async fn execute(&mut self, command: &str) -> Result<String, String> {
        self.writer
            .write_all(format!("{command}\n").as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        loop {
            let line = self.line().await?;
            if line.starts_with("{\"return\"") {
                return Ok(line);
            }
            if line.starts_with("{\"error\"") {
                return Err(line.trim().to_string());
            }
            // An event: not the answer.
        }
    }
}

/// A VM run by QEMU.
pub struct QemuVm {
    name: String,
    accelerator: Accelerator,
    started: Instant,
    boot_duration: Duration,
    guest: Guest,
    qmp: tokio::sync::Mutex<Qmp>,
    cleanup: parking_lot::Mutex<Cleanup>,
    overlay: PathBuf,
}

impl QemuVm {
    /// `error`, with QEMU's own messages when QEMU has exited (a kernel
    /// it cannot load, say).
    async fn with_qemu_log(&self, error: VmError) -> VmError {
        let Some(status) = qemu_exit(&self.cleanup).await else {
            return error;
        };
        let cleanup = self.cleanup.lock();
        let log = cleanup
            .dir
            .as_deref()
            .map(qemu_log_text)
            .unwrap_or_default();
        match error {
            VmError::Guest {
                vm,
                message,
                console,
            } => VmError::Guest {
                vm,
                message: format!("{message}; QEMU exited ({status}): {log}"),
                console,
            },
            other => other,
        }
    }

    async fn qmp(&self, command: &str) -> Result<String, VmError> {
        self.qmp
            .lock()
            .await
            .execute(command)
            .await
            .map_err(|e| self.guest.error(format!("QMP {command}: {e}")))
    }
}

#[async_trait]
impl Vm for QemuVm {
    fn name(&self) -> &str {
        &self.name
    }

    fn accelerator(&self) -> Accelerator {
        self.accelerator
    }

    fn boot_duration(&self) -> Duration {
        self.boot_duration
    }

    fn guest(&self) -> &Guest {
        &self.guest
    }

    async fn pause(&self) -> Result<(), VmError> {
        self.qmp(r#"{"execute":"stop"}"#).await.map(drop)
    }

    async fn resume(&self) -> Result<(), VmError> {
        self.qmp(r#"{"execute":"cont"}"#).await.map(drop)
    }

    async fn snapshot(&self, snapshot_dir: &Path) -> Result<(), VmError> {
        std::fs::create_dir_all(snapshot_dir)
            .map_err(|e| VmError::Setup(format!("creating {}: {e}", snapshot_dir.display())))?;
        let memory = snapshot_dir.join("memory");
        self.pause().await?;
        let target = format!("exec:cat > {}", shell_quote(&memory.display().to_string()));
        let command = format!(
            r#"{{"execute":"migrate","arguments":{{"uri":{}}}}}"#,
            json_string(&target)
        );
        self.qmp(&command).await?;
        // Bounded: a migration to a local file of a few GiB takes seconds.
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            let status = self.qmp(r#"{"execute":"query-migrate"}"#).await?;
            if status.contains("\"status\": \"completed\"") {
                break;
            }
            if status.contains("\"status\": \"failed\"") || Instant::now() > deadline {
                return Err(self
                    .guest
                    .error(format!("the snapshot failed: {}", status.trim())));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The migration flushed the disks: the overlay is consistent.
        std::fs::copy(&self.overlay, snapshot_dir.join("root.qcow2"))
            .map_err(|e| VmError::Setup(format!("copying the root overlay: {e}")))?;
        Ok(())
    }

    async fn shutdown(self: Box<Self>) -> Result<(), VmError> {
        self.guest.halt().await?;
        // `quit` ends QEMU, which closes its disk files; the answer may
        // race the socket closing.
        let _ = self.qmp(r#"{"execute":"quit"}"#).await;
        let exited = tokio::task::spawn_blocking(move || {
            let mut cleanup = self.cleanup.lock();
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                if cleanup.qemu_exited().is_some() {
                    return true;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            false
        })
        .await
        .unwrap_or(false);
        if !exited {
            return Err(VmError::Setup("QEMU did not quit within 30 s".into()));
        }
        Ok(())
    }

    fn kill(self: Box<Self>) {
        drop(self);
    }

    fn memory_in_use(&self) -> Option<u64> {
        let pid = self.cleanup.lock().child.as_ref()?.id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let kib: u64 = status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(kib << 10)
    }
}

/// `text` as a JSON string.
fn json_string(text: &str) -> String {
    let mut out = String::from("\"");
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}
