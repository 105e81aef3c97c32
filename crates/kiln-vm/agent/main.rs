//! Kiln's VM agent: PID 1 of a microVM, from its initramfs. It loads the
//! kernel modules the VM's devices need, mounts the root disk and switches
//! into it, then runs actions for the host over two virtio-serial ports:
//! `kiln.control` (requests and answers) and `kiln.data` (the action's
//! output, guest to host), so output never delays a cancel. See
//! `src/guest.rs` for the host's side.
//!
//! Built by `build.rs` with `rustc` alone (standard library and libc
//! declarations only) as a static executable. It is single-threaded: `fork`
//! is safe, and SIGCHLD arrives through a signalfd polled beside the ports
//! and the action's pipes, so it reaps every orphan (it is PID 1).
//!
//! Frames (`frame.rs`). Guest to host on control:
//! - `hello KERNEL_RELEASE` once its ports are open; the host answers
//!   `boot WORKSPACE_PATH NETWORK HOSTNAME` (WORKSPACE_PATH empty: no
//!   workspace disk; NETWORK `1`: configure eth0 for QEMU's user network),
//!   and the agent answers `ready` or `failed MESSAGE`.
//! - `run CWD USER UID GID TIMEOUT_MS GRACE_MS MEMORY_MAX ARGC ARG… ENV…`
//!   (USER a name looked up in the root's /etc/passwd, or empty to use
//!   UID/GID; TIMEOUT_MS 0 for none; MEMORY_MAX empty for none): its output
//!   goes to the data port as `out BYTES` / `err BYTES`, then `end`; the
//!   answer on control is `exited CODE TIMED_OUT OOM` or
//!   `signaled SIGNAL TIMED_OUT OOM` (flags `0`/`1`), or `failed MESSAGE`.
//! - `signal SIGNAL`: to the running action's process group.
//! - `sync` → `synced` (the page cache written, the workspace's journal
//!   checkpointed: its disk reads whole on the host while mounted);
//!   `shutdown` → `halted` (every process killed, synced, the workspace
//!   unmounted: the host may stop the VM and read the disk);
//!   `collect ROOT ASK_FROM PATH…` → the outputs at each PATH beneath
//!   ROOT as a tree stream (`src/tree_stream.rs`) in `tree BYTES` frames
//!   on the data port, then `end`; before each file of ASK_FROM bytes or
//!   more (0: none) it hashes, an `ask SIZE SHA256` frame there, which the
//!   host answers on control with `verdict 1` (the CAS holds it: not sent)
//!   or `verdict 0` (`collect.rs`); the answer is `collected` or `failed
//!   MESSAGE` (the agent remembers each file it sent, which the next `put`
//!   may keep);
//!   `put ROOT` → ROOT emptied (but its `lost+found`, and the files of
//!   the last inputs the stream says to keep, if unchanged), then the
//!   tree stream the host sends in `tree BYTES` frames on the data port,
//!   up to `end`, written into it (a warm VM's next inputs, `store.rs`);
//!   the answer is `stored`, `stale PATH` (a file to keep was changed:
//!   send all again) or `failed MESSAGE`;
//!   `ping UNIX_NANOS SEED` → `pong` (after a restore: the clock is set to
//!   the host's, and SEED is mixed into the kernel's RNG and reseeds it,
//!   so two VMs restored from one snapshot do not share random numbers);
//!   `dockerd TCP WAIT_MS PATH` → `dockerd-ready MILLIS` or
//!   `dockerd-failed MESSAGE` (`dockerd.rs`).

#[path = "collect.rs"]
mod collect;
#[path = "dockerd.rs"]
mod dockerd;
#[path = "frame.rs"]
mod frame;
#[path = "sha256.rs"]
mod sha256;
#[path = "store.rs"]
mod store;
#[path = "../../kiln-container/agent/sys.rs"]
mod sys;
#[path = "../src/tree_stream.rs"]
mod tree_stream;

use std::ffi::{c_char, c_int, c_long, c_void, CString};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sys::*;

#[repr(C)]
struct SockAddrIn {
    family: u16,
    port: u16,
    address: [u8; 4],
    zero: [u8; 8],
}

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    /// `ifr_addr` (a sockaddr_in) or `ifr_flags` (its first two bytes).
    data: SockAddrIn,
    _rest: [u8; 8],
}

/// `struct rtentry` (net/route.h), for the default route.
#[repr(C)]
struct RtEntry {
    pad1: u64,
    destination: SockAddrIn,
    gateway: SockAddrIn,
    mask: SockAddrIn,
    flags: u16,
    pad2: i16,
    pad3: u64,
    pad4: *mut c_void,
    metric: i16,
    device: *mut c_char,
    window: u64,
    irtt: u16,
}

extern "C" {
    fn mount(
        source: *const c_char,
        target: *const c_char,
        kind: *const c_char,
        flags: u64,
        data: *const c_void,
    ) -> c_int;
    fn umount2(target: *const c_char, flags: c_int) -> c_int;
    fn chroot(path: *const c_char) -> c_int;
    fn syscall(number: c_long, ...) -> c_long;
    fn setsid() -> c_int;
    fn setgroups(size: usize, list: *const u32) -> c_int;
    fn setgid(gid: u32) -> c_int;
    fn setuid(uid: u32) -> c_int;
    fn socket(domain: c_int, kind: c_int, protocol: c_int) -> c_int;
    fn ioctl(fd: c_int, request: u64, ...) -> c_int;
    fn sync();
    fn sethostname(name: *const c_char, length: usize) -> c_int;
}

const SIGKILL: c_int = 9;
const O_NONBLOCK: c_int = 0o4000;
const POLLOUT: i16 = 4;
const POLLHUP: i16 = 0x10;
const EEXIST: i32 = 17;
const MS_MOVE: u64 = 8192;
const MNT_DETACH: c_int = 2;
const SYS_FINIT_MODULE: c_long = 313;
const AF_INET: c_int = 2;
const SOCK_DGRAM: c_int = 2;
const SIOCGIFFLAGS: u64 = 0x8913;
const SIOCSIFFLAGS: u64 = 0x8914;
const SIOCSIFADDR: u64 = 0x8916;
const SIOCSIFNETMASK: u64 = 0x891c;
const SIOCADDRT: u64 = 0x890b;
const IFF_UP: u16 = 1;
const RTF_UP: u16 = 1;
const RTF_GATEWAY: u16 = 2;

/// Where the root disk is mounted before the agent switches into it.
const NEW_ROOT: &str = "/newroot";
/// How long devices may take to appear after their modules load.
const DEVICE_WAIT: Duration = Duration::from_secs(20);
const CGROUP: &str = "/sys/fs/cgroup";

fn main() {
    // Anywhere but as PID 1 it only says what it is: the executor's probe
    // runs it as a trial action in a VM whose root disk holds nothing else.
    if std::process::id() != 1 {
        println!("kiln-vm-agent");
        return;
    }
    // SIGCHLD is read from a descriptor, never delivered; children get an
    // empty mask back before they exec.
    let signals = signal_fd(&[SIGCHLD])
        .unwrap_or_else(|call| halt(&format!("blocking SIGCHLD: {call}")));
    for (kind, target) in [("proc", "/proc"), ("sysfs", "/sys"), ("devtmpfs", "/dev")] {
        let _ = std::fs::create_dir_all(target);
        if let Err(e) = mount_fs(kind, target, kind, "") {
            halt(&format!("mounting {target}: {e}"));
        }
    }
    if let Err(e) = load_modules() {
        halt(&e);
    }
    dockerd::keep_modules_dir();
    let (control, data) = match open_ports() {
        Ok(ports) => ports,
        Err(e) => halt(&e),
    };
    let mut agent = Agent {
        control: Port::new(control),
        data: DataPort::new(data),
        signals,
        action: None,
        workspace: None,
        last_start: None,
        last_put_end: None,
        collected: Default::default(),
        actions_started: 0,
        spare_cgroup: None,
    };
    agent.serve();
}

/// Prints why the VM cannot go on to its console, then powers it off
/// (QEMU runs with `-no-reboot`, and `panic=-1` makes the panic a reset).
fn halt(message: &str) -> ! {
    let _ = writeln!(std::io::stderr(), "kiln vm agent: {message}");
    std::process::exit(1)
}

fn log(message: &str) {
    let _ = writeln!(std::io::stderr(), "kiln vm agent: {message}");
}

fn c_string(text: &str) -> CString {
    CString::new(text).expect("no NUL in a constant")
}

fn c_path(path: &Path) -> Result<CString, String> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| format!("NUL in {}", path.display()))
}

fn mount_fs(source: &str, target: &str, kind: &str, options: &str) -> Result<(), String> {
    let (source, target_c, kind, options) = (
        c_string(source),
        c_string(target),
        c_string(kind),
        c_string(options),
    );
    // SAFETY: NUL-terminated strings that outlive the call.
    let result = unsafe {
        mount(
            source.as_ptr(),
            target_c.as_ptr(),
            kind.as_ptr(),
            0,
            options.as_ptr().cast(),
        )
    };
    if result != 0 {
        return Err(std::io::Error::last_os_error().to_string());
    }
    Ok(())
}

/// Loads `/modules/order` (one `.ko` path a line, dependencies first, as
/// the host wrote it from `modules.dep`), each with the options the kernel
/// command line gives its name (`NAME.OPTION=VALUE`): the kernel keeps
/// those for loadable modules and leaves them to whoever loads them.
fn load_modules() -> Result<(), String> {
    let order = match std::fs::read_to_string("/modules/order") {
        Ok(order) => order,
        Err(_) => return Ok(()),
    };
    let command_line = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    for path in order.lines().filter(|l| !l.is_empty()) {
        let name = Path::new(path)
            .file_stem()
            .map(|s| s.to_string_lossy().replace('-', "_"))
            .unwrap_or_default();
        let prefix = format!("{name}.");
        let options: Vec<&str> = command_line
            .split_whitespace()
            .filter_map(|word| word.strip_prefix(prefix.as_str()))
            .collect();
        let options = c_string(&options.join(" "));
        let file = std::fs::File::open(path).map_err(|e| format!("opening {path}: {e}"))?;
        let result =
            // SAFETY: an open descriptor and a NUL-terminated option string that outlive the call.
            unsafe { syscall(SYS_FINIT_MODULE, file.as_raw_fd(), options.as_ptr(), 0 as c_int) };
        if result != 0 && errno() != EEXIST {
            return Err(format!(
                "loading module {path}: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    Ok(())
}

/// Waits (bounded) until `find` finds what it looks for in sysfs.
fn wait_for<T>(what: &str, mut find: impl FnMut() -> Option<T>) -> Result<T, String> {
    let start = Instant::now();
    loop {
        if let Some(found) = find() {
            return Ok(found);
        }
        if start.elapsed() > DEVICE_WAIT {
            return Err(format!("{what} did not appear within {DEVICE_WAIT:?}"));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The `/dev` node of the virtio-serial port named `name`.
fn find_port(name: &str) -> Option<PathBuf> {
    for entry in std::fs::read_dir("/sys/class/virtio-ports").ok()?.flatten() {
        let port_name = std::fs::read_to_string(entry.path().join("name")).unwrap_or_default();
        if port_name.trim() == name {
            let node = Path::new("/dev").join(entry.file_name());
            if node.exists() {
                return Some(node);
            }
        }
    }
    None
}

/// The `/dev` node of the virtio disk whose serial is `serial`.
fn find_disk(serial: &str) -> Option<PathBuf> {
    for entry in std::fs::read_dir("/sys/block").ok()?.flatten() {
        let disk_serial = std::fs::read_to_string(entry.path().join("serial")).unwrap_or_default();
        if disk_serial.trim() == serial {
            let node = Path::new("/dev").join(entry.file_name());
            if node.exists() {
                return Some(node);
            }
        }
    }
    None
}

fn open_ports() -> Result<(std::fs::File, std::fs::File), String> {
    let open = |name: &str| -> Result<std::fs::File, String> {
        let node = wait_for(&format!("virtio-serial port {name}"), || find_port(name))?;
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&node)
            .map_err(|e| format!("opening {}: {e}", node.display()))
    };
    Ok((open("kiln.control")?, open("kiln.data")?))
}

/// One end of a virtio-serial port: frames out, bytes in.
struct Port {
    file: std::fs::File,
    received: Vec<u8>,
}

impl Port {
    fn new(file: std::fs::File) -> Port {
        Port {
            file,
            received: Vec::new(),
        }
    }

    /// Writes a frame. It blocks while the host is not connected (the
    /// port's buffers full), which is what a restore needs.
    fn send(&mut self, fields: &[&[u8]]) {
        let frame = frame::encode(fields);
        let mut written = 0;
        while written < frame.len() {
            match self.file.write(&frame[written..]) {
                Ok(n) => written += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => {
                    // The host is away (between a snapshot and its
                    // restore): try again shortly.
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
    }

    /// Reads what arrived; returns the whole frames.
    fn receive(&mut self) -> Vec<Vec<Vec<u8>>> {
        let mut buffer = vec![0u8; 64 * 1024];
        match self.file.read(&mut buffer) {
            Ok(0) | Err(_) => {
                // No host on the other end: wait for one (bounded per call;
                // the loop around polls again).
                std::thread::sleep(Duration::from_millis(10));
                return Vec::new();
            }
            Ok(n) => self.received.extend_from_slice(&buffer[..n]),
        }
        let mut frames = Vec::new();
        loop {
            match frame::take(&mut self.received) {
                Ok(Some(frame)) => frames.push(frame),
                Ok(None) => break,
                Err(why) => {
                    log(why);
                    self.received.clear();
                    break;
                }
            }
        }
        frames
    }
}

/// The data port, written without blocking: frames wait in `pending`
/// while the host reads slowly (or is away, between a snapshot and its
/// restore), so a slow reader never stops the agent from serving control
/// requests or enforcing a timeout. The action's pipes are not read while
/// [`MAX_PENDING`] bytes wait: the action is what slows down.
struct DataPort {
    file: std::fs::File,
    /// Frames not yet written, from `written` on: the port takes at most
    /// 32 KiB a write, so the front is skipped rather than moved.
    pending: Vec<u8>,
    written: usize,
    /// What a `put` reads the port into, kept between puts (`store.rs`).
    inbox: Vec<u8>,
}

const MAX_PENDING: usize = 1 << 20;

impl DataPort {
    fn new(file: std::fs::File) -> DataPort {
        set_nonblocking(file.as_raw_fd());
        DataPort {
            file,
            pending: Vec::new(),
            written: 0,
            inbox: Vec::new(),
        }
    }

    fn send(&mut self, fields: &[&[u8]]) {
        self.drop_written();
        frame::encode_into(&mut self.pending, fields);
        self.flush();
    }

    /// Drops the bytes already written from the front of `pending`.
    fn drop_written(&mut self) {
        self.pending.drain(..self.written);
        self.written = 0;
    }

    /// Sends the frame encoded in `frame`, taking its bytes (and leaving
    /// `frame` an empty buffer) without a copy when nothing else waits.
    fn send_frame(&mut self, frame: &mut Vec<u8>) {
        self.drop_written();
        if self.pending.is_empty() {
            std::mem::swap(&mut self.pending, frame);
        } else {
            self.pending.append(frame);
        }
        self.flush();
    }

    /// Writes what the port takes now.
    fn flush(&mut self) {
        while self.has_pending() {
            match self.file.write(&self.pending[self.written..]) {
                Ok(0) => break,
                Ok(n) => self.written += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        if !self.has_pending() {
            self.drop_written();
        }
    }

    fn has_pending(&self) -> bool {
        self.written < self.pending.len()
    }

    fn unsent(&self) -> usize {
        self.pending.len() - self.written
    }

    fn full(&self) -> bool {
        self.unsent() >= MAX_PENDING
    }

    /// Waits until the host took everything pending, at most
    /// [`DRAIN_TIMEOUT`] without progress: the host reads while it waits
    /// for an answer, so this is bounded only against a host that left.
    fn drain(&mut self) -> Result<(), String> {
        let mut last_progress = Instant::now();
        loop {
            let before = self.unsent();
            self.flush();
            if !self.has_pending() {
                return Ok(());
            }
            if self.unsent() < before {
                last_progress = Instant::now();
            } else if last_progress.elapsed() > DRAIN_TIMEOUT {
                return Err(format!(
                    "the host took nothing of the data port for {DRAIN_TIMEOUT:?}"
                ));
            }
            poll_one(self.file.as_raw_fd(), POLLOUT, 100);
        }
    }
}

/// How long [`DataPort::drain`] waits for the host to read anything.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);

/// The running action.
struct Action {
    pid: c_int,
    /// Its stdout and stderr pipes, until they reach end of file.
    stdout: Option<std::fs::File>,
    stderr: Option<std::fs::File>,
    /// When to send SIGTERM, then SIGKILL.
    terminate_at: Option<Instant>,
    kill_at: Option<Instant>,
    timed_out: bool,
    /// The wait status, once reaped.
    status: Option<c_int>,
    cgroup: Option<PathBuf>,
    /// The cgroup's `oom_kill` count before the action (it is cumulative,
    /// and a cgroup may serve several actions).
    oom_kills_before: u64,
}

/// An action's cgroup left empty by it, with its `oom_kill` count: the
/// next action's, which saves the mkdir and rmdir (several milliseconds
/// under emulation).
struct SpareCgroup {
    path: PathBuf,
    oom_kills: u64,
}

struct Agent {
    control: Port,
    data: DataPort,
    signals: std::fs::File,
    action: Option<Action>,
    /// Where the workspace disk is mounted.
    workspace: Option<PathBuf>,
    actions_started: u64,
    /// When the last action started, by the coarse real-time clock (the
    /// one file times are stamped with): what `put` keeps files by.
    last_start: Option<(i64, i64)>,
    /// When the last `put` ended, if no action started since.
    last_put_end: Option<(i64, i64)>,
    /// The files the last `collect` sent whole: what `put` may keep of
    /// the last action's outputs.
    collected: store::SentFiles,
    spare_cgroup: Option<SpareCgroup>,
}

impl Agent {
    fn serve(&mut self) {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        self.control.send(&[b"hello", release.trim().as_bytes()]);
        loop {
            let mut fds = vec![
                PollFd {
                    fd: self.control.file.as_raw_fd(),
                    events: POLLIN,
                    revents: 0,
                },
                PollFd {
                    fd: self.signals.as_raw_fd(),
                    events: POLLIN,
                    revents: 0,
                },
                PollFd {
                    fd: self.data.file.as_raw_fd(),
                    events: if !self.data.has_pending() {
                        0
                    } else {
                        POLLOUT
                    },
                    revents: 0,
                },
            ];
            let mut pipes = Vec::new();
            if let Some(action) = self.action.as_ref().filter(|_| !self.data.full()) {
                for (index, pipe) in [&action.stdout, &action.stderr].into_iter().enumerate() {
                    if let Some(pipe) = pipe {
                        fds.push(PollFd {
                            fd: pipe.as_raw_fd(),
                            events: POLLIN,
                            revents: 0,
                        });
                        pipes.push(index);
                    }
                }
            }
            let timeout = self.next_deadline().map(|deadline| {
                deadline
                    .saturating_duration_since(Instant::now())
                    .as_millis()
                    .min(60_000) as c_int
                    + 1
            });
            // SAFETY: `fds` is a live array of `fds.len()` pollfds.
            let ready = unsafe { poll(fds.as_mut_ptr(), fds.len() as u64, timeout.unwrap_or(-1)) };
            if ready < 0 {
                if errno() == EINTR {
                    continue;
                }
                halt("poll");
            }
            if fds[2].revents & POLLOUT != 0 {
                self.data.flush();
            } else if fds[2].revents & POLLHUP != 0 && self.data.has_pending() {
                // Output waits for a host to connect again.
                std::thread::sleep(Duration::from_millis(10));
            }
            for (slot, index) in pipes.iter().enumerate() {
                if fds[3 + slot].revents != 0 {
                    self.forward_output(*index);
                }
            }
            if fds[1].revents != 0 {
                self.reap();
            }
            if fds[0].revents & POLLIN != 0 {
                for request in self.control.receive() {
                    self.handle(request);
                }
            } else if fds[0].revents & POLLHUP != 0 {
                // The host is not connected (yet, or again after a restore).
                std::thread::sleep(Duration::from_millis(10));
            }
            self.enforce_timeout();
            self.finish_if_done();
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        let action = self.action.as_ref()?;
        if action.status.is_some() {
            return None;
        }
        if action.timed_out {
            action.kill_at
        } else {
            action.terminate_at
        }
    }

    fn enforce_timeout(&mut self) {
        let Some(action) = self.action.as_mut() else {
            return;
        };
        if action.status.is_some() {
            return;
        }
        let now = Instant::now();
        if !action.timed_out && action.terminate_at.is_some_and(|at| now >= at) {
            action.timed_out = true;
            // SAFETY: kill takes plain integers.
            unsafe { kill(-action.pid, SIGTERM) };
        }
        if action.timed_out && action.kill_at.is_some_and(|at| now >= at) {
            action.kill_at = None;
            // SAFETY: kill takes plain integers.
            unsafe { kill(-action.pid, SIGKILL) };
        }
    }

    /// Sends what the action wrote to pipe `index` (0 stdout, 1 stderr) to
    /// the host; closes the pipe at its end.
    fn forward_output(&mut self, index: usize) {
        let Some(action) = self.action.as_mut() else {
            return;
        };
        let pipe = if index == 0 {
            &mut action.stdout
        } else {
            &mut action.stderr
        };
        let Some(file) = pipe.as_mut() else {
            return;
        };
        let mut buffer = vec![0u8; 64 * 1024];
        match file.read(&mut buffer) {
            Ok(0) => *pipe = None,
            Ok(n) => {
                let kind: &[u8] = if index == 0 { b"out" } else { b"err" };
                self.data.send(&[kind, &buffer[..n]]);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => *pipe = None,
        }
    }

    /// Reaps every child that ended, noting the action's status.
    fn reap(&mut self) {
        let mut info = [0u8; 128];
        let _ = self.signals.read(&mut info);
        loop {
            let mut status: c_int = 0;
            // SAFETY: `status` is a live local.
            let pid = unsafe { waitpid(-1, &mut status, WNOHANG) };
            if pid <= 0 {
                return;
            }
            if let Some(action) = self.action.as_mut() {
                if action.pid == pid {
                    action.status = Some(status);
                }
            }
        }
    }

    /// Once the action has ended: sends the rest of its output (what its
    /// pipes hold; a background process it left may keep them open, so
    /// end of file is not awaited), then `end`, then the answer.
    fn finish_if_done(&mut self) {
        let done = self.action.as_ref().is_some_and(|a| a.status.is_some());
        if !done {
            return;
        }
        for index in 0..2 {
            for _ in 0..4096 {
                let before = self.action.as_ref().map(|a| {
                    let pipe = if index == 0 { &a.stdout } else { &a.stderr };
                    pipe.is_some()
                });
                if before != Some(true) || self.data.full() || !self.pipe_has_data(index) {
                    break;
                }
                self.forward_output(index);
            }
        }
        let action = self.action.take().expect("checked above");
        self.data.send(&[b"end"]);
        let oom_kills = action.cgroup.as_deref().map(oom_kills).unwrap_or(0);
        let oom = oom_kills > action.oom_kills_before;
        if let Some(path) = action.cgroup.clone() {
            // A background process the action left lives on in it: the
            // group stays with it, and the next action gets its own.
            if is_empty_cgroup(&path) {
                self.spare_cgroup = Some(SpareCgroup { path, oom_kills });
            }
        }
        let status = action.status.expect("checked above");
        let flag = |b: bool| if b { b"1" as &[u8] } else { b"0" };
        let (kind, value): (&[u8], c_int) = if status & 0x7f == 0 {
            (b"exited", (status >> 8) & 0xff)
        } else {
            (b"signaled", status & 0x7f)
        };
        self.control.send(&[
            kind,
            value.to_string().as_bytes(),
            flag(action.timed_out),
            flag(oom),
        ]);
    }

    fn pipe_has_data(&self, index: usize) -> bool {
        let Some(action) = &self.action else {
            return false;
        };
        let pipe = if index == 0 {
            &action.stdout
        } else {
            &action.stderr
        };
        let Some(pipe) = pipe else {
            return false;
        };
        poll_one(pipe.as_raw_fd(), POLLIN, 0)
    }

    fn handle(&mut self, request: Vec<Vec<u8>>) {
        match request.first().map(Vec::as_slice) {
            Some(b"boot") => {
                let answer = self.boot(&request[1..]);
                match answer {
                    Ok(()) => self.control.send(&[b"ready"]),
                    Err(e) => self.control.send(&[b"failed", e.as_bytes()]),
                }
            }
            Some(b"run") => {
                if self.action.is_some() {
                    return self
                        .control
                        .send(&[b"failed", b"an action is running already"]);
                }
                match RunRequest::parse(&request[1..]) {
                    Some(run) => {
                        if let Err(e) = self.start(run) {
                            self.control.send(&[b"failed", e.as_bytes()]);
                        }
                    }
                    None => self.control.send(&[b"failed", b"malformed run request"]),
                }
            }
            Some(b"signal") => {
                let signal = request
                    .get(1)
                    .and_then(|s| std::str::from_utf8(s).ok())
                    .and_then(|s| s.parse::<c_int>().ok());
                if let (Some(action), Some(signal)) = (&self.action, signal) {
                    if action.status.is_none() {
                        // SAFETY: kill takes plain integers.
                        unsafe { kill(-action.pid, signal) };
                    }
                }
            }
            Some(b"sync") => {
                // SAFETY: sync takes nothing.
                unsafe { sync() };
                if let Some(workspace) = &self.workspace {
                    checkpoint(workspace);
                }
                self.control.send(&[b"synced"]);
            }
            Some(b"shutdown") => {
                self.stop_everything();
                // SAFETY: sync takes nothing.
                unsafe { sync() };
                if let Some(workspace) = self.workspace.take() {
                    if let Ok(path) = c_path(&workspace) {
                        // SAFETY: a NUL-terminated path that outlives the call.
                        if unsafe { umount2(path.as_ptr(), 0) } != 0 {
                            // Still busy (a process in uninterruptible
                            // sleep): its journal checkpointed, detached.
                            log(&format!(
                                "unmounting the workspace: {}",
                                std::io::Error::last_os_error()
                            ));
                            checkpoint(&workspace);
                            // SAFETY: as above.
                            unsafe { umount2(path.as_ptr(), MNT_DETACH) };
                        }
                    }
                }
                // SAFETY: sync takes nothing.
                unsafe { sync() };
                self.control.send(&[b"halted"]);
            }
            Some(b"collect") => {
                let collected = self.collect(&request[1..]);
                self.data.send(&[b"end"]);
                let drained = self.data.drain();
                match collected.and(drained) {
                    Ok(()) => self.control.send(&[b"collected"]),
                    Err(e) => self.control.send(&[b"failed", e.as_bytes()]),
                }
            }
            Some(b"dockerd") => {
                let answer = dockerd::handle(&request[1..]);
                let fields: Vec<&[u8]> = answer.iter().map(Vec::as_slice).collect();
                self.control.send(&fields);
            }
            Some(b"put") => {
                let stored = if self.action.is_some() {
                    Err("an action is running".to_string())
                } else {
                    let stored = store::put(
                        &mut self.data,
                        &request[1..],
                        self.last_start,
                        &self.collected,
                    );
                    // A failed put may have written files too.
                    if stored.as_ref().map_or(true, |stored| stored.touched_files) {
                        self.last_put_end = Some(coarse_now());
                    }
                    stored
                };
                match stored.map(|stored| stored.stale) {
                    Ok(None) => self.control.send(&[b"stored"]),
                    Ok(Some(path)) => self.control.send(&[b"stale", path.as_bytes()]),
                    Err(e) => self.control.send(&[b"failed", e.as_bytes()]),
                }
            }
            Some(b"ping") => {
                if let Some(nanos) = request
                    .get(1)
                    .and_then(|s| std::str::from_utf8(s).ok())
                    .and_then(|s| s.parse::<u128>().ok())
                {
                    set_clock(nanos);
                }
                if let Some(seed) = request.get(2).filter(|s| !s.is_empty()) {
                    reseed(seed);
                }
                self.control.send(&[b"pong"]);
            }
            _ => self.control.send(&[b"failed", b"unknown request"]),
        }
    }

    /// Sends the outputs the host asked for (`collect.rs`).
    fn collect(&mut self, fields: &[Vec<u8>]) -> Result<(), String> {
        if self.action.is_some() {
            return Err("an action is running".into());
        }
        collect::collect(
            &mut self.data,
            &mut self.control,
            &mut self.collected,
            fields,
        )
    }

    /// Kills every process but the agent and reaps them (bounded), so the
    /// workspace can be unmounted: the VM is going away.
    fn stop_everything(&mut self) {
        // SAFETY: kill takes plain integers; -1 is every process but
        // init.
        unsafe { kill(-1, SIGKILL) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            let mut status: c_int = 0;
            // SAFETY: `status` is a live local.
            let pid = unsafe { waitpid(-1, &mut status, WNOHANG) };
            if pid < 0 {
                break; // No children left.
            }
            if pid == 0 {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        self.action = None;
    }

    /// Mounts the root disk and switches into it, then the workspace disk
    /// and the network.
    fn boot(&mut self, fields: &[Vec<u8>]) -> Result<(), String> {
        let field = |i: usize| -> Result<String, String> {
            fields
                .get(i)
                .and_then(|f| String::from_utf8(f.clone()).ok())
                .ok_or_else(|| "malformed boot request".to_string())
        };
        let (workspace, network, hostname) = (field(0)?, field(1)?, field(2)?);
        let root = wait_for("the root disk (serial kiln-root)", || {
            find_disk("kiln-root")
        })?;
        std::fs::create_dir_all(NEW_ROOT).map_err(|e| e.to_string())?;
        mount_fs(&root.to_string_lossy(), NEW_ROOT, "ext4", "")
            .map_err(|e| format!("mounting the root disk {}: {e}", root.display()))?;
        // The workspace disk is found now, while /sys is where it was.
        let workspace_disk = if workspace.is_empty() {
            None
        } else {
            Some(wait_for("the workspace disk (serial kiln-work)", || {
                find_disk("kiln-work")
            })?)
        };
        if network == "1" {
            wait_for("eth0", || {
                Path::new("/sys/class/net/eth0").exists().then_some(())
            })?;
        }
        switch_root()?;
        for (kind, target, options) in [
            ("tmpfs", "/tmp", "mode=1777"),
            ("devpts", "/dev/pts", "mode=620,ptmxmode=666"),
            ("tmpfs", "/dev/shm", "mode=1777"),
            ("tmpfs", "/run", "mode=755"),
            // Moving the action into its cgroup waits for an RCU grace
            // period (milliseconds under emulation) unless favoured.
            ("cgroup2", CGROUP, "favordynmods"),
        ] {
            let _ = std::fs::create_dir_all(target);
            mount_fs(kind, target, kind, options).map_err(|e| format!("mounting {target}: {e}"))?;
        }
        let _ = std::fs::write(Path::new(CGROUP).join("cgroup.subtree_control"), "+memory");
        if let Some(disk) = workspace_disk {
            std::fs::create_dir_all(&workspace)
                .map_err(|e| format!("creating the workspace mount point {workspace}: {e}"))?;
            mount_fs(&disk.to_string_lossy(), &workspace, "ext4", "")
                .map_err(|e| format!("mounting the workspace disk at {workspace}: {e}"))?;
            self.workspace = Some(PathBuf::from(workspace));
        }
        if !hostname.is_empty() {
            // SAFETY: a pointer and length of a live string.
            unsafe { sethostname(hostname.as_ptr().cast(), hostname.len()) };
        }
        interface_up("lo", None)?;
        if network == "1" {
            interface_up("eth0", Some(([10, 0, 2, 15], [255, 255, 255, 0])))?;
            default_route([10, 0, 2, 2])?;
            let _ = std::fs::write("/etc/resolv.conf", "nameserver 10.0.2.3\n");
        }
        Ok(())
    }

    fn start(&mut self, run: RunRequest) -> Result<(), String> {
        let (uid, gid) = match &run.user {
            Some(name) => lookup_user(name)?,
            None => (run.uid, run.gid),
        };
        self.actions_started += 1;
        let (cgroup, oom_kills_before, made) = match self.spare_cgroup.take() {
            Some(spare) => (spare.path, spare.oom_kills, Ok(())),
            None => {
                let path = Path::new(CGROUP).join(format!("action-{}", self.actions_started));
                let made = std::fs::create_dir(&path);
                (path, 0, made)
            }
        };
        let cgroup_procs = match made {
            Ok(()) => {
                // "max" undoes the last action's limit in a reused group.
                let limit = run.memory_max.as_deref().unwrap_or("max");
                if let Err(e) = std::fs::write(cgroup.join("memory.max"), limit) {
                    if run.memory_max.is_some() {
                        return Err(format!("setting memory.max to {limit}: {e}"));
                    }
                }
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(cgroup.join("cgroup.procs"))
                    .ok()
            }
            Err(e) if run.memory_max.is_some() => {
                return Err(format!("creating the action's cgroup: {e}"))
            }
            Err(_) => None,
        };
        let program_name = run.arguments[0].clone();
        let program = match find_program(&program_name, &run.cwd, &run.environment) {
            Ok(program) => program,
            Err((code, why)) => {
                let line = format!("kiln: {}: {why}\n", String::from_utf8_lossy(&program_name));
                self.data.send(&[b"err", line.as_bytes()]);
                self.data.send(&[b"end"]);
                self.control
                    .send(&[b"exited", code.to_string().as_bytes(), b"0", b"0"]);
                if cgroup_procs.is_some() {
                    self.spare_cgroup = Some(SpareCgroup {
                        path: cgroup,
                        oom_kills: oom_kills_before,
                    });
                }
                return Ok(());
            }
        };
        let to_c = |bytes: &[u8]| CString::new(bytes).ok();
        let arguments: Option<Vec<CString>> = run.arguments.iter().map(|a| to_c(a)).collect();
        let environment: Option<Vec<CString>> = run.environment.iter().map(|e| to_c(e)).collect();
        let (Some(arguments), Some(environment), Some(cwd)) =
            (arguments, environment, to_c(&run.cwd))
        else {
            return Err("a NUL byte in the arguments or environment".into());
        };
        let argv: Vec<*const c_char> = arguments
            .iter()
            .map(|a| a.as_ptr())
            .chain(std::iter::once(std::ptr::null()))
            .collect();
        let envp: Vec<*const c_char> = environment
            .iter()
            .map(|e| e.as_ptr())
            .chain(std::iter::once(std::ptr::null()))
            .collect();
        let (stdout_read, stdout_write) = pipe(O_CLOEXEC)?;
        let (stderr_read, stderr_write) = pipe(O_CLOEXEC)?;
        let (report_read, report_write) = pipe(O_CLOEXEC)?;
        let null = std::fs::File::open("/dev/null").map_err(|e| format!("/dev/null: {e}"))?;
        self.last_start = store::action_start(self.last_put_end.take(), coarse_now);
        // SAFETY: the agent is single-threaded, so the child may run anything; it
        // still keeps to async-signal-safe calls (`child`).
        let pid = unsafe { fork() };
        if pid == 0 {
            // The child: only async-signal-safe calls from here on.
            let setup = ChildSetup {
                cwd: &cwd,
                program: &program,
                argv: &argv,
                envp: &envp,
                stdio: [
                    null.as_raw_fd(),
                    stdout_write.as_raw_fd(),
                    stderr_write.as_raw_fd(),
                ],
                cgroup_procs: cgroup_procs.as_ref().map(|f| f.as_raw_fd()),
                uid,
                gid,
                report: report_write.as_raw_fd(),
            };
            // SAFETY: in the forked child, with every pointer in `setup` valid (copied
            // address space).
            unsafe { child(&setup) }
        }
        drop((report_write, stdout_write, stderr_write, null, cgroup_procs));
        if pid < 0 {
            return Err("fork failed".into());
        }
        let mut code = [0u8; 4];
        let mut report = std::fs::File::from(report_read);
        let mut got = 0;
        while got < 4 {
            match report.read(&mut code[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        let now = Instant::now();
        let terminate_at = run.timeout.map(|t| now + t);
        let mut action = Action {
            pid,
            stdout: Some(nonblocking(stdout_read)),
            stderr: Some(nonblocking(stderr_read)),
            terminate_at,
            kill_at: terminate_at.map(|t| t + run.grace),
            timed_out: false,
            status: None,
            cgroup: Some(cgroup),
            oom_kills_before,
        };
        if got == 4 {
            // exec (or the setup before it) failed: the action's failure,
            // as a shell reports it. The child exits 127 and is reaped as
            // any other; its status is replaced by 126.
            let error = std::io::Error::from_raw_os_error(i32::from_ne_bytes(code));
            let line = format!(
                "kiln: {}: {error}\n",
                String::from_utf8_lossy(&program_name)
            );
            self.data.send(&[b"err", line.as_bytes()]);
            action.terminate_at = None;
            action.kill_at = None;
            let mut status = 0;
            // SAFETY: `status` is a live local.
            unsafe { waitpid(pid, &mut status, 0) };
            action.status = Some(126 << 8);
        }
        self.action = Some(action);
        Ok(())
    }
}

#[repr(C)]
struct TimeSpec {
    seconds: i64,
    nanoseconds: i64,
}

fn set_clock(unix_nanos: u128) {
    const CLOCK_REALTIME: c_int = 0;
    extern "C" {
        fn clock_settime(clock: c_int, time: *const TimeSpec) -> c_int;
    }
    let time = TimeSpec {
        seconds: (unix_nanos / 1_000_000_000) as i64,
        nanoseconds: (unix_nanos % 1_000_000_000) as i64,
    };
    // SAFETY: `time` is a live timespec.
    if unsafe { clock_settime(CLOCK_REALTIME, &time) } != 0 {
        log("setting the clock failed");
    }
}

/// The real-time clock as the kernel stamps file times with it (coarse):
/// seconds and nanoseconds.
fn coarse_now() -> (i64, i64) {
    const CLOCK_REALTIME_COARSE: c_int = 5;
    extern "C" {
        fn clock_gettime(clock: c_int, time: *mut TimeSpec) -> c_int;
    }
    let mut time = TimeSpec {
        seconds: 0,
        nanoseconds: 0,
    };
    // SAFETY: `time` is a live timespec to fill.
    unsafe { clock_gettime(CLOCK_REALTIME_COARSE, &mut time) };
    (time.seconds, time.nanoseconds)
}

/// Credits `seed` to the kernel's entropy pool (RNDADDENTROPY), then
/// reseeds its CRNG from it (RNDRESEEDCRNG).
fn reseed(seed: &[u8]) {
    const RNDADDENTROPY: u64 = 0x4008_5203;
    const RNDRESEEDCRNG: u64 = 0x5207;
    let Ok(random) = std::fs::OpenOptions::new().write(true).open("/dev/urandom") else {
        return log("opening /dev/urandom failed");
    };
    // struct rand_pool_info: entropy_count (bits), buf_size (bytes), buf.
    let mut info = Vec::with_capacity(8 + seed.len());
    info.extend_from_slice(&((seed.len() * 8) as i32).to_ne_bytes());
    info.extend_from_slice(&(seed.len() as i32).to_ne_bytes());
    info.extend_from_slice(seed);
    // SAFETY: `info` is a rand_pool_info laid out as the kernel expects, alive
    // across the call; RNDRESEEDCRNG takes no argument.
    unsafe {
        if ioctl(random.as_raw_fd(), RNDADDENTROPY, info.as_ptr()) != 0
            || ioctl(random.as_raw_fd(), RNDRESEEDCRNG) != 0
        {
            log("reseeding the RNG failed");
        }
    }
}

/// Commits the ext4 journal of the file system at `path` and writes its
/// blocks home (EXT4_IOC_CHECKPOINT), so the disk reads whole on the host
/// (`debugfs` does not replay a journal) while it is still mounted.
fn checkpoint(path: &Path) {
    const EXT4_IOC_CHECKPOINT: u64 = 0x4004_662b;
    let Ok(directory) = std::fs::File::open(path) else {
        return log(&format!("opening {} to checkpoint it", path.display()));
    };
    let flags: u32 = 0;
    // SAFETY: an open descriptor and a live u32 for the flags.
    if unsafe { ioctl(directory.as_raw_fd(), EXT4_IOC_CHECKPOINT, &flags) } != 0 {
        log(&format!(
            "checkpointing {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        ));
    }
}

fn nonblocking(fd: OwnedFd) -> std::fs::File {
    set_nonblocking(fd.as_raw_fd());
    std::fs::File::from(fd)
}

/// Waits at most `timeout_ms` for `events` on `fd`; whether they came.
fn poll_one(fd: c_int, events: i16, timeout_ms: c_int) -> bool {
    let mut fds = [PollFd {
        fd,
        events,
        revents: 0,
    }];
    // SAFETY: a one-element live pollfd array.
    unsafe { poll(fds.as_mut_ptr(), 1, timeout_ms) > 0 }
}

fn set_nonblocking(fd: c_int) {
    const F_GETFL: c_int = 3;
    const F_SETFL: c_int = 4;
    extern "C" {
        fn fcntl(fd: c_int, command: c_int, ...) -> c_int;
    }
    // SAFETY: fcntl on an open descriptor the caller owns.
    unsafe {
        let flags = fcntl(fd, F_GETFL);
        fcntl(fd, F_SETFL, flags.max(0) | O_NONBLOCK);
    }
}

fn pipe(flags: c_int) -> Result<(OwnedFd, OwnedFd), String> {
    let mut fds = [0 as c_int; 2];
    // SAFETY: `fds` has room for the two descriptors.
    if unsafe { pipe2(fds.as_mut_ptr(), flags) } != 0 {
        return Err(format!("pipe2: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: pipe2 just made both descriptors, owned by nothing else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Whether no process is left in `cgroup` (an unreadable one counts as
/// not empty).
fn is_empty_cgroup(cgroup: &Path) -> bool {
    std::fs::read(cgroup.join("cgroup.procs")).is_ok_and(|procs| procs.is_empty())
}

/// The `oom_kill` count of a cgroup's `memory.events`.
fn oom_kills(cgroup: &Path) -> u64 {
    std::fs::read_to_string(cgroup.join("memory.events"))
        .unwrap_or_default()
        .lines()
        .find_map(|line| line.strip_prefix("oom_kill "))
        .and_then(|count| count.trim().parse().ok())
        .unwrap_or(0)
}

/// Moves /dev, /proc and /sys into the new root, then makes it `/`
/// (switch_root: the initramfs cannot be pivoted away from).
fn switch_root() -> Result<(), String> {
    for target in ["/dev", "/proc", "/sys"] {
        let inside = format!("{NEW_ROOT}{target}");
        let _ = std::fs::create_dir_all(&inside);
        let (from, to) = (c_string(target), c_string(&inside));
        // SAFETY: NUL-terminated paths that outlive the call.
        let moved = unsafe {
            mount(
                from.as_ptr(),
                to.as_ptr(),
                std::ptr::null(),
                MS_MOVE,
                std::ptr::null(),
            )
        };
        if moved != 0 {
            return Err(format!(
                "moving {target} into the root disk: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    let (new_root, slash, dot) = (c_string(NEW_ROOT), c_string("/"), c_string("."));
    // SAFETY: NUL-terminated paths that outlive each call.
    unsafe {
        if chdir(new_root.as_ptr()) != 0
            || mount(
                dot.as_ptr(),
                slash.as_ptr(),
                std::ptr::null(),
                MS_MOVE,
                std::ptr::null(),
            ) != 0
            || chroot(dot.as_ptr()) != 0
            || chdir(slash.as_ptr()) != 0
        {
            return Err(format!(
                "switching to the root disk: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    Ok(())
}

fn sockaddr(address: [u8; 4]) -> SockAddrIn {
    SockAddrIn {
        family: AF_INET as u16,
        port: 0,
        address,
        zero: [0; 8],
    }
}

/// Brings `name` up, with an IPv4 address and netmask when given.
fn interface_up(name: &str, address: Option<([u8; 4], [u8; 4])>) -> Result<(), String> {
    // SAFETY: socket takes plain integers.
    let fd = unsafe { socket(AF_INET, SOCK_DGRAM | O_CLOEXEC, 0) };
    if fd < 0 {
        return Err(format!("socket: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: socket just made `fd`, owned by nothing else.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut request = IfReq {
        name: [0; 16],
        data: sockaddr([0; 4]),
        _rest: [0; 8],
    };
    request.name[..name.len()].copy_from_slice(name.as_bytes());
    let call = |request: &mut IfReq, code: u64, what: &str| -> Result<(), String> {
        // SAFETY: `request` is a live ifreq of the kernel's layout.
        if unsafe { ioctl(socket.as_raw_fd(), code, request as *mut IfReq) } != 0 {
            return Err(format!(
                "{what} of {name}: {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(())
    };
    if let Some((address, mask)) = address {
        request.data = sockaddr(address);
        call(&mut request, SIOCSIFADDR, "setting the address")?;
        request.data = sockaddr(mask);
        call(&mut request, SIOCSIFNETMASK, "setting the netmask")?;
    }
    request.data = sockaddr([0; 4]);
    call(&mut request, SIOCGIFFLAGS, "reading the flags")?;
    // ifr_flags is the union's first two bytes.
    request.data.family |= IFF_UP;
    call(&mut request, SIOCSIFFLAGS, "bringing up")
}

fn default_route(gateway: [u8; 4]) -> Result<(), String> {
    // SAFETY: socket takes plain integers.
    let fd = unsafe { socket(AF_INET, SOCK_DGRAM | O_CLOEXEC, 0) };
    if fd < 0 {
        return Err(format!("socket: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: socket just made `fd`, owned by nothing else.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut route = RtEntry {
        pad1: 0,
        destination: sockaddr([0; 4]),
        gateway: sockaddr(gateway),
        mask: sockaddr([0; 4]),
        flags: RTF_UP | RTF_GATEWAY,
        pad2: 0,
        pad3: 0,
        pad4: std::ptr::null_mut(),
        metric: 0,
        device: std::ptr::null_mut(),
        window: 0,
        irtt: 0,
    };
    // SAFETY: `route` is a live rtentry of the kernel's layout.
    if unsafe { ioctl(socket.as_raw_fd(), SIOCADDRT, &mut route as *mut RtEntry) } != 0 {
        return Err(format!(
            "adding the default route: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// A user's uid and gid from the root disk's /etc/passwd (no NSS in a
/// static executable).
fn lookup_user(name: &str) -> Result<(u32, u32), String> {
    let passwd = std::fs::read_to_string("/etc/passwd")
        .map_err(|e| format!("reading /etc/passwd for user {name}: {e}"))?;
    for line in passwd.lines() {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.len() >= 4 && fields[0] == name {
            let uid = fields[2]
                .parse()
                .map_err(|_| format!("bad uid for {name}"))?;
            let gid = fields[3]
                .parse()
                .map_err(|_| format!("bad gid for {name}"))?;
            return Ok((uid, gid));
        }
    }
    Err(format!("no user {name} in /etc/passwd"))
}

struct ChildSetup<'a> {
    cwd: &'a CString,
    program: &'a CString,
    argv: &'a [*const c_char],
    envp: &'a [*const c_char],
    stdio: [c_int; 3],
    cgroup_procs: Option<c_int>,
    uid: u32,
    gid: u32,
    report: c_int,
}

/// The forked child: its cgroup, an empty signal mask, a session and
/// process group of its own, stdio, user, working directory, then the
/// program. On failure, the errno goes to `report` and it exits 127.
unsafe fn child(setup: &ChildSetup) -> ! {
    let mut ok = true;
    if let Some(procs) = setup.cgroup_procs {
        // "0": the writing process itself.
        ok = write(procs, b"0".as_ptr().cast(), 1) == 1;
    }
    let mut empty = SigSet([0; 16]);
    sigemptyset(&mut empty);
    ok = ok && sigprocmask(SIG_SETMASK, &empty, std::ptr::null_mut()) == 0;
    ok = ok && (setsid() >= 0 || setpgid(0, 0) == 0);
    for (target, fd) in setup.stdio.iter().enumerate() {
        ok = ok && dup2(*fd, target as c_int) >= 0;
    }
    ok = ok && setgroups(1, &setup.gid) == 0 && setgid(setup.gid) == 0;
    ok = ok && setuid(setup.uid) == 0;
    ok = ok && chdir(setup.cwd.as_ptr()) == 0;
    if ok {
        execve(
            setup.program.as_ptr(),
            setup.argv.as_ptr(),
            setup.envp.as_ptr(),
        );
    }
    let code = *__errno_location();
    write(setup.report, (&code as *const c_int).cast(), 4);
    _exit(127)
}

struct RunRequest {
    cwd: Vec<u8>,
    user: Option<String>,
    uid: u32,
    gid: u32,
    timeout: Option<Duration>,
    grace: Duration,
    memory_max: Option<String>,
    arguments: Vec<Vec<u8>>,
    /// `NAME=VALUE`: the whole environment.
    environment: Vec<Vec<u8>>,
}

impl RunRequest {
    fn parse(fields: &[Vec<u8>]) -> Option<RunRequest> {
        let text = |i: usize| -> Option<&str> { std::str::from_utf8(fields.get(i)?).ok() };
        let cwd = fields.first()?.clone();
        let user = Some(text(1)?.to_string()).filter(|u| !u.is_empty());
        let uid = text(2)?.parse().ok()?;
        let gid = text(3)?.parse().ok()?;
        let timeout_ms: u64 = text(4)?.parse().ok()?;
        let grace_ms: u64 = text(5)?.parse().ok()?;
        let memory_max = Some(text(6)?.to_string()).filter(|m| !m.is_empty());
        let count: usize = text(7)?.parse().ok()?;
        let arguments = fields.get(8..8 + count)?.to_vec();
        if arguments.is_empty() {
            return None;
        }
        Some(RunRequest {
            cwd,
            user,
            uid,
            gid,
            timeout: (timeout_ms > 0).then(|| Duration::from_millis(timeout_ms)),
            grace: Duration::from_millis(grace_ms),
            memory_max,
            arguments,
            environment: fields[8 + count..].to_vec(),
        })
    }
}
