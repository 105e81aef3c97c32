//! Kiln's agent: PID 1 of a warm container runner. It starts each action's
//! process inside the container when the executor asks, so a warm action
//! never goes through the container engine. See `src/warm.rs` for the
//! executor's side and the protocol.
//!
//! Built by `build.rs` with `rustc` alone (the standard library and nothing
//! else) as a static executable, so it runs in any image, whatever its C
//! library. It is single-threaded: `fork` is safe, and SIGCHLD arrives
//! through a signalfd polled beside the executor's socket, so it reaps
//! every process the container's actions leave (it is PID 1) without a
//! thread racing the one waiting for the action.
//!
//! Usage: `agent SOCKET`. It listens on SOCKET, takes exactly one
//! connection (the executor's), removes SOCKET, and serves that connection
//! until it closes; then it exits, and the container with it.
//!
//! Frames, both ways: a little-endian u32 length, then that many bytes of
//! fields, each a little-endian u32 length and its bytes. The first field
//! names the frame.
//! - `run CWD ARGC ARG… ENV…` with two descriptors (stdout, stderr) passed
//!   alongside (SCM_RIGHTS): start ARG… in CWD with the agent's own
//!   environment (the image's) overridden by ENV (`NAME=VALUE`), in a
//!   process group of its own. The answer comes when it ends:
//!   `exited CODE`, `signaled SIGNAL`, or `failed MESSAGE` when it could
//!   not be started (after writing the reason to its stderr).
//! - `signal SIGNAL`: sends SIGNAL to the running action's process group.
//! - `start CWD ARGC ARG… ENV…` with three descriptors (stdin, stdout,
//!   stderr): starts a long-running process (a persistent worker) the same
//!   way, but does not wait for it: the answer is `started PID`, or
//!   `exited CODE` / `failed MESSAGE` as for `run`.
//! - `kill PID`: SIGKILL to the process group of a process `start`ed.

#[path = "sys.rs"]
mod sys;

use std::ffi::{c_char, c_int, c_void, CString};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::net::{UnixListener, UnixStream};

use sys::*;

#[repr(C)]
struct IoVec {
    base: *mut c_void,
    len: usize,
}

#[repr(C)]
struct MsgHdr {
    name: *mut c_void,
    namelen: u32,
    iov: *mut IoVec,
    iovlen: usize,
    control: *mut c_void,
    controllen: usize,
    flags: c_int,
}

#[repr(C)]
struct CmsgHdr {
    len: usize,
    level: c_int,
    kind: c_int,
}

extern "C" {
    fn recvmsg(fd: c_int, msg: *mut MsgHdr, flags: c_int) -> isize;
}

const SOL_SOCKET: c_int = 1;
const SCM_RIGHTS: c_int = 1;
const MSG_CMSG_CLOEXEC: c_int = 0x4000_0000;

/// A frame is never larger than this (an action's command line and
/// environment, with room to spare).
const MAX_FRAME: usize = 64 << 20;

fn main() {
    let socket = match std::env::args_os().nth(1) {
        Some(path) => path,
        None => die("usage: agent SOCKET"),
    };
    // SIGCHLD and SIGTERM are read from a descriptor, never delivered;
    // children get an empty mask back before they exec. SIGTERM (`docker
    // stop`) ends the agent, and the container with it: as PID 1 it would
    // otherwise be ignored.
    let signals = signal_fd(&[SIGCHLD, SIGTERM])
        .unwrap_or_else(|call| die(&format!("blocking SIGCHLD and SIGTERM: {call}")));
    let listener = UnixListener::bind(&socket).unwrap_or_else(|e| die(&format!("bind: {e}")));
    // The executor may be another user than the container's (`--run-as`);
    // the socket's directory is reachable by the executor alone.
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666))
            .unwrap_or_else(|e| die(&format!("chmod: {e}")));
    }
    // SIGTERM ends the agent while it waits for the executor too.
    while !readable(&listener, &signals) {}
    let (stream, _) = listener
        .accept()
        .unwrap_or_else(|e| die(&format!("accept: {e}")));
    drop(listener);
    let _ = std::fs::remove_file(&socket);
    Agent {
        stream,
        signals,
        received: Vec::new(),
        fds: Vec::new(),
        action: None,
    }
    .serve();
}

/// Waits until `listener` has a connection (true), or a signal arrived
/// (false); exits on SIGTERM.
fn readable(listener: &UnixListener, mut signals: &std::fs::File) -> bool {
    let mut fds = [
        PollFd {
            fd: listener.as_raw_fd(),
            events: POLLIN,
            revents: 0,
        },
        PollFd {
            fd: signals.as_raw_fd(),
            events: POLLIN,
            revents: 0,
        },
    ];
    if unsafe { poll(fds.as_mut_ptr(), 2, -1) } < 0 {
        return false;
    }
    if fds[1].revents != 0 {
        let mut info = [0u8; 128];
        if signals.read(&mut info).is_ok() && signal_number(&info) == SIGTERM as u32 {
            std::process::exit(0);
        }
    }
    fds[0].revents != 0
}

/// The signal a `signalfd_siginfo` reports (its first field).
fn signal_number(info: &[u8; 128]) -> u32 {
    u32::from_ne_bytes([info[0], info[1], info[2], info[3]])
}

fn die(message: &str) -> ! {
    let _ = writeln!(std::io::stderr(), "kiln agent: {message}");
    std::process::exit(2)
}

struct Agent {
    stream: UnixStream,
    signals: std::fs::File,
    /// Bytes read but not yet parsed into frames.
    received: Vec<u8>,
    /// Descriptors received but not yet claimed by a `run` frame.
    fds: Vec<OwnedFd>,
    /// The running action's pid (and process group).
    action: Option<c_int>,
}

impl Agent {
    fn serve(mut self) {
        loop {
            let mut fds = [
                PollFd {
                    fd: self.stream.as_raw_fd(),
                    events: POLLIN,
                    revents: 0,
                },
                PollFd {
                    fd: self.signals.as_raw_fd(),
                    events: POLLIN,
                    revents: 0,
                },
            ];
            if unsafe { poll(fds.as_mut_ptr(), 2, -1) } < 0 {
                if errno() == EINTR {
                    continue;
                }
                die("poll");
            }
            if fds[1].revents != 0 {
                self.on_signal();
            }
            if fds[0].revents != 0 && !self.receive() {
                // The executor is gone: so is the runner.
                return;
            }
        }
    }

    /// Reaps every child that ended, answering for the action's; exits on
    /// SIGTERM.
    fn on_signal(&mut self) {
        // One signalfd_siginfo (its first field, the signal's number); how
        // many children ended is found below.
        let mut info = [0u8; 128];
        if self.signals.read(&mut info).is_ok() && signal_number(&info) == SIGTERM as u32 {
            std::process::exit(0);
        }
        loop {
            let mut status: c_int = 0;
            let pid = unsafe { waitpid(-1, &mut status, WNOHANG) };
            if pid <= 0 {
                return;
            }
            if self.action == Some(pid) {
                self.action = None;
                let answer = if status & 0x7f == 0 {
                    ("exited", (status >> 8) & 0xff)
                } else {
                    ("signaled", status & 0x7f)
                };
                self.answer(&[answer.0.as_bytes(), answer.1.to_string().as_bytes()]);
            }
        }
    }

    /// Reads what the executor sent; false once it has closed.
    fn receive(&mut self) -> bool {
        let mut buffer = vec![0u8; 64 * 1024];
        // Room for a handful of descriptors' control messages.
        let mut control = [0u64; 16];
        let mut iov = IoVec {
            base: buffer.as_mut_ptr().cast(),
            len: buffer.len(),
        };
        let mut message = MsgHdr {
            name: std::ptr::null_mut(),
            namelen: 0,
            iov: &mut iov,
            iovlen: 1,
            control: control.as_mut_ptr().cast(),
            controllen: std::mem::size_of_val(&control),
            flags: 0,
        };
        let read = unsafe { recvmsg(self.stream.as_raw_fd(), &mut message, MSG_CMSG_CLOEXEC) };
        if read < 0 {
            return errno() == EINTR;
        }
        if read == 0 {
            return false;
        }
        self.take_descriptors(&control, message.controllen);
        self.received.extend_from_slice(&buffer[..read as usize]);
        while let Some(frame) = self.next_frame() {
            self.handle(frame);
        }
        true
    }

    /// Keeps the descriptors of every SCM_RIGHTS message in `control`.
    fn take_descriptors(&mut self, control: &[u64; 16], length: usize) {
        let bytes = unsafe {
            std::slice::from_raw_parts(control.as_ptr().cast::<u8>(), length.min(8 * 16))
        };
        let header = std::mem::size_of::<CmsgHdr>();
        let mut at = 0;
        while at + header <= bytes.len() {
            let cmsg = unsafe { &*(bytes.as_ptr().add(at).cast::<CmsgHdr>()) };
            if cmsg.len < header || at + cmsg.len > bytes.len() {
                break;
            }
            if cmsg.level == SOL_SOCKET && cmsg.kind == SCM_RIGHTS {
                let data = &bytes[at + header..at + cmsg.len];
                for chunk in data.chunks_exact(4) {
                    let fd = i32::from_ne_bytes(chunk.try_into().expect("four bytes"));
                    self.fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                }
            }
            at += (cmsg.len + 7) & !7;
        }
    }

    /// The next whole frame's fields, if one has arrived.
    fn next_frame(&mut self) -> Option<Vec<Vec<u8>>> {
        let length = u32::from_le_bytes(self.received.get(..4)?.try_into().ok()?) as usize;
        if length > MAX_FRAME {
            die("frame too large");
        }
        if self.received.len() < 4 + length {
            return None;
        }
        let body: Vec<u8> = self.received.drain(..4 + length).skip(4).collect();
        let mut fields = Vec::new();
        let mut at = 0;
        while at + 4 <= body.len() {
            let size = u32::from_le_bytes(body[at..at + 4].try_into().ok()?) as usize;
            let field = body.get(at + 4..at + 4 + size)?;
            fields.push(field.to_vec());
            at += 4 + size;
        }
        Some(fields)
    }

    fn handle(&mut self, frame: Vec<Vec<u8>>) {
        match frame.first().map(Vec::as_slice) {
            Some(b"run") => {
                if self.fds.len() < 2 {
                    return self.answer(&[b"failed", b"no output descriptors with the request"]);
                }
                let stderr = self.fds.remove(1);
                let stdout = self.fds.remove(0);
                if self.action.is_some() {
                    return self.answer(&[b"failed", b"an action is running already"]);
                }
                match Request::parse(&frame[1..]) {
                    Some(request) => {
                        if let Some(pid) = self.spawn(request, None, stdout, stderr) {
                            self.action = Some(pid);
                        }
                    }
                    None => self.answer(&[b"failed", b"malformed run request"]),
                }
            }
            Some(b"start") => {
                if self.fds.len() < 3 {
                    return self.answer(&[b"failed", b"no stdio descriptors with the request"]);
                }
                let stdio: Vec<OwnedFd> = self.fds.drain(..3).collect();
                let [stdin, stdout, stderr]: [OwnedFd; 3] = stdio.try_into().expect("three");
                match Request::parse(&frame[1..]) {
                    Some(request) => {
                        if let Some(pid) = self.spawn(request, Some(stdin), stdout, stderr) {
                            self.answer(&[b"started", pid.to_string().as_bytes()]);
                        }
                    }
                    None => self.answer(&[b"failed", b"malformed start request"]),
                }
            }
            Some(b"kill") => {
                let pid = frame
                    .get(1)
                    .and_then(|s| std::str::from_utf8(s).ok())
                    .and_then(|s| s.parse::<c_int>().ok())
                    .filter(|pid| *pid > 1);
                if let Some(pid) = pid {
                    unsafe { kill(-pid, 9) };
                }
            }
            Some(b"signal") => {
                let signal = frame
                    .get(1)
                    .and_then(|s| std::str::from_utf8(s).ok())
                    .and_then(|s| s.parse::<c_int>().ok());
                if let (Some(pid), Some(signal)) = (self.action, signal) {
                    unsafe { kill(-pid, signal) };
                }
            }
            _ => self.answer(&[b"failed", b"unknown request"]),
        }
    }

    /// Starts `request` with the given stdio (stdin: the agent's own,
    /// /dev/null, when None); its pid, or None once it has answered why
    /// not.
    fn spawn(
        &mut self,
        request: Request,
        stdin: Option<OwnedFd>,
        stdout: OwnedFd,
        stderr: OwnedFd,
    ) -> Option<c_int> {
        let environment = request.environment();
        let program_name = request.arguments[0].clone();
        let program = match find_program(&program_name, &request.cwd, &environment) {
            Ok(program) => program,
            Err((code, why)) => {
                let line = format!("kiln: {}: {why}\n", String::from_utf8_lossy(&program_name));
                let _ = std::fs::File::from(stderr).write_all(line.as_bytes());
                self.answer(&[b"exited", code.to_string().as_bytes()]);
                return None;
            }
        };
        let to_c = |bytes: &[u8]| CString::new(bytes).ok();
        let arguments: Option<Vec<CString>> = request.arguments.iter().map(|a| to_c(a)).collect();
        let environment: Option<Vec<CString>> = environment.iter().map(|e| to_c(e)).collect();
        let (Some(arguments), Some(environment), Some(cwd)) =
            (arguments, environment, to_c(&request.cwd))
        else {
            self.answer(&[b"failed", b"a NUL byte in the arguments or environment"]);
            return None;
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
        let mut report = [0 as c_int; 2];
        if unsafe { pipe2(report.as_mut_ptr(), O_CLOEXEC) } != 0 {
            self.answer(&[b"failed", b"pipe2 failed"]);
            return None;
        }
        let (report_read, report_write) =
            unsafe { (OwnedFd::from_raw_fd(report[0]), OwnedFd::from_raw_fd(report[1])) };
        let pid = unsafe { fork() };
        if pid == 0 {
            // The child: only async-signal-safe calls from here on.
            let stdio = [stdin.as_ref(), Some(&stdout), Some(&stderr)];
            unsafe { child(&cwd, &program, &argv, &envp, stdio, &report_write) }
        }
        drop(report_write);
        drop((stdin, stdout));
        if pid < 0 {
            self.answer(&[b"failed", b"fork failed"]);
            return None;
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
        if got == 4 {
            // exec failed (a script without `#!`, say): the action's
            // failure, as a shell reports it. The child exits 127 and is
            // reaped as any other.
            let error = std::io::Error::from_raw_os_error(i32::from_ne_bytes(code));
            let line = format!("kiln: {}: {error}\n", String::from_utf8_lossy(&program_name));
            let _ = std::fs::File::from(stderr).write_all(line.as_bytes());
            self.answer(&[b"exited", b"126"]);
            return None;
        }
        Some(pid)
    }

    fn answer(&mut self, fields: &[&[u8]]) {
        let mut body = Vec::new();
        for field in fields {
            body.extend_from_slice(&(field.len() as u32).to_le_bytes());
            body.extend_from_slice(field);
        }
        let mut frame = (body.len() as u32).to_le_bytes().to_vec();
        frame.extend_from_slice(&body);
        if self.stream.write_all(&frame).is_err() {
            std::process::exit(0);
        }
    }
}

/// The forked child: an empty signal mask, a process group of its own,
/// the stdio descriptors given (0, 1, 2; None keeps the agent's), the
/// working directory, then the program. On failure, the errno goes to
/// `report` and the child exits 127.
unsafe fn child(
    cwd: &CString,
    program: &CString,
    argv: &[*const c_char],
    envp: &[*const c_char],
    stdio: [Option<&OwnedFd>; 3],
    report: &OwnedFd,
) -> ! {
    let mut empty = SigSet([0; 16]);
    sigemptyset(&mut empty);
    let mut ok = sigprocmask(SIG_SETMASK, &empty, std::ptr::null_mut()) == 0 && setpgid(0, 0) == 0;
    for (target, fd) in stdio.iter().enumerate() {
        if let Some(fd) = fd {
            ok = ok && dup2(fd.as_raw_fd(), target as c_int) >= 0;
        }
    }
    ok = ok && chdir(cwd.as_ptr()) == 0;
    if ok {
        execve(program.as_ptr(), argv.as_ptr(), envp.as_ptr());
    }
    let code = *__errno_location();
    write(report.as_raw_fd(), (&code as *const c_int).cast(), 4);
    _exit(127)
}

struct Request {
    cwd: Vec<u8>,
    arguments: Vec<Vec<u8>>,
    /// `NAME=VALUE`, overriding the agent's own.
    overrides: Vec<Vec<u8>>,
}

impl Request {
    fn parse(fields: &[Vec<u8>]) -> Option<Request> {
        let cwd = fields.first()?.clone();
        let count: usize = std::str::from_utf8(fields.get(1)?).ok()?.parse().ok()?;
        let arguments = fields.get(2..2 + count)?.to_vec();
        if arguments.is_empty() {
            return None;
        }
        let overrides = fields[2 + count..].to_vec();
        Some(Request {
            cwd,
            arguments,
            overrides,
        })
    }

    /// The agent's environment (the image's), with the request's values
    /// in place of the same names and its other names added.
    fn environment(&self) -> Vec<Vec<u8>> {
        let name = |entry: &[u8]| -> Vec<u8> {
            entry.split(|b| *b == b'=').next().unwrap_or_default().to_vec()
        };
        let overridden: Vec<Vec<u8>> = self.overrides.iter().map(|e| name(e)).collect();
        let mut environment: Vec<Vec<u8>> = std::env::vars_os()
            .map(|(k, v)| {
                let mut entry = k.into_vec();
                entry.push(b'=');
                entry.extend(v.into_vec());
                entry
            })
            .filter(|entry| !overridden.contains(&name(entry)))
            .collect();
        environment.extend(self.overrides.iter().cloned());
        environment
    }
}
