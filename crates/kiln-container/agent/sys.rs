//! What both of Kiln's agents need of the C library and of a shell: the
//! declarations, types and constants (x86_64 Linux, glibc), and how a
//! command's program is found. Standard library only: the container agent
//! (`main.rs` here) and the VM agent (`kiln-vm/agent/main.rs`, which
//! includes this file) are each built by `rustc` alone.

use std::ffi::{c_char, c_int, c_void, CString};
use std::os::unix::ffi::OsStrExt;

#[repr(C)]
pub struct PollFd {
    pub fd: c_int,
    pub events: i16,
    pub revents: i16,
}

/// glibc's `sigset_t`: 1024 bits.
#[repr(C)]
pub struct SigSet(pub [u64; 16]);

extern "C" {
    pub fn sigemptyset(set: *mut SigSet) -> c_int;
    pub fn sigaddset(set: *mut SigSet, signal: c_int) -> c_int;
    pub fn sigprocmask(how: c_int, set: *const SigSet, old: *mut SigSet) -> c_int;
    pub fn signalfd(fd: c_int, mask: *const SigSet, flags: c_int) -> c_int;
    pub fn poll(fds: *mut PollFd, nfds: u64, timeout: c_int) -> c_int;
    pub fn waitpid(pid: c_int, status: *mut c_int, options: c_int) -> c_int;
    pub fn fork() -> c_int;
    pub fn execve(
        path: *const c_char,
        argv: *const *const c_char,
        envp: *const *const c_char,
    ) -> c_int;
    pub fn setpgid(pid: c_int, pgid: c_int) -> c_int;
    pub fn dup2(old: c_int, new: c_int) -> c_int;
    pub fn chdir(path: *const c_char) -> c_int;
    pub fn kill(pid: c_int, signal: c_int) -> c_int;
    pub fn pipe2(fds: *mut c_int, flags: c_int) -> c_int;
    pub fn write(fd: c_int, buf: *const c_void, count: usize) -> isize;
    pub fn access(path: *const c_char, mode: c_int) -> c_int;
    pub fn __errno_location() -> *mut c_int;
    pub fn _exit(code: c_int) -> !;
}

pub const SIG_BLOCK: c_int = 0;
pub const SIG_SETMASK: c_int = 2;
pub const SIGTERM: c_int = 15;
pub const SIGCHLD: c_int = 17;
pub const O_CLOEXEC: c_int = 0o2000000;
pub const WNOHANG: c_int = 1;
pub const POLLIN: i16 = 1;
pub const X_OK: c_int = 1;
pub const EINTR: i32 = 4;

/// Blocks `signals` and returns a descriptor they are read from instead of
/// being delivered (children must set their mask back before they exec);
/// on failure, which call failed.
pub fn signal_fd(signals: &[c_int]) -> Result<std::fs::File, &'static str> {
    use std::os::fd::FromRawFd;
    // SAFETY: the set is a local glibc sigset_t; the new descriptor is
    // owned by the File alone.
    unsafe {
        let mut set = SigSet([0; 16]);
        sigemptyset(&mut set);
        for signal in signals {
            sigaddset(&mut set, *signal);
        }
        if sigprocmask(SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            return Err("sigprocmask");
        }
        let fd = signalfd(-1, &set, O_CLOEXEC);
        if fd < 0 {
            return Err("signalfd");
        }
        Ok(std::fs::File::from_raw_fd(fd))
    }
}

pub fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// Where `name` resolves: a name with a `/` as it is (relative to the
/// working directory), else the first executable match in the action's
/// `PATH`. On failure, the shell's exit code and why.
pub fn find_program(
    name: &[u8],
    cwd: &[u8],
    environment: &[Vec<u8>],
) -> Result<CString, (i32, &'static str)> {
    let executable = |path: &[u8]| -> Option<CString> {
        let full = if path.starts_with(b"/") {
            path.to_vec()
        } else {
            [cwd, b"/", path].concat()
        };
        let c = CString::new(full).ok()?;
        let is_file = std::fs::metadata(std::ffi::OsStr::from_bytes(c.as_bytes()))
            .map(|m| m.is_file())
            .unwrap_or(false);
        // SAFETY: a NUL-terminated path.
        (is_file && unsafe { access(c.as_ptr(), X_OK) } == 0).then_some(c)
    };
    if name.contains(&b'/') {
        let full = if name.starts_with(b"/") {
            name.to_vec()
        } else {
            [cwd, b"/", name].concat()
        };
        let exists = std::fs::metadata(std::ffi::OsStr::from_bytes(&full)).is_ok();
        return match executable(&full) {
            Some(found) => Ok(found),
            None if exists => Err((126, "permission denied")),
            None => Err((127, "command not found")),
        };
    }
    let path = environment
        .iter()
        .find_map(|e| e.strip_prefix(b"PATH="))
        .unwrap_or(b"/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
    for dir in path.split(|b| *b == b':') {
        let dir: &[u8] = if dir.is_empty() { b"." } else { dir };
        let candidate = [dir, b"/", name].concat();
        if let Some(found) = executable(&candidate) {
            return Ok(found);
        }
    }
    Err((127, "command not found"))
}
