//! The host's side of the agent protocol (`agent/main.rs` describes it):
//! the boot handshake, running an action with its output streamed back,
//! signals and cancellation on the control port while output flows on the
//! data port, and the clean shutdown that flushes the workspace disk.

use std::ffi::OsString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use crate::VmError;

mod collect;
pub use collect::{Ask, Confirmed, Holder, MAX_ASKS};
mod dockerd;
pub use dockerd::DockerdStart;
#[path = "../agent/frame.rs"]
mod frame;
mod put;
pub use put::{Put, ReusePlan};

/// How many of the console's last lines an error quotes.
const CONSOLE_LINES: usize = 30;

/// Who runs the action in the guest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GuestUser {
    /// A uid and gid (root: 0, 0).
    Id { uid: u32, gid: u32 },
    /// A name, looked up in the root disk's /etc/passwd.
    Name(String),
}

/// An action to run in the guest.
#[derive(Clone, Debug)]
pub struct RunRequest {
    /// The program (looked up in the environment's PATH without a `/`)
    /// and its arguments.
    pub arguments: Vec<OsString>,
    /// The whole environment: nothing else is inherited.
    pub environment: Vec<(OsString, OsString)>,
    pub working_directory: PathBuf,
    pub user: GuestUser,
    /// SIGTERM to the action's process group when it runs this long...
    pub timeout: Option<Duration>,
    /// ...and SIGKILL this long after.
    pub grace: Duration,
    /// The action's cgroup's `memory.max` in the guest.
    pub memory_limit_bytes: Option<u64>,
}

impl RunRequest {
    /// `arguments` as root in `/`, with a default PATH, no timeout, no
    /// memory limit.
    pub fn new<I, S>(arguments: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        RunRequest {
            arguments: arguments.into_iter().map(Into::into).collect(),
            environment: vec![(
                "PATH".into(),
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
            )],
            working_directory: "/".into(),
            user: GuestUser::Id { uid: 0, gid: 0 },
            timeout: None,
            grace: Duration::from_secs(5),
            memory_limit_bytes: None,
        }
    }
}

/// How the action's process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestStatus {
    Exited(i32),
    Signaled(i32),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestOutcome {
    pub status: GuestStatus,
    /// The timeout ended it (SIGTERM, then SIGKILL after the grace).
    pub timed_out: bool,
    /// The OOM killer killed a process of the action's cgroup.
    pub oom_killed: bool,
    /// `cancel` fired and the action was killed for it.
    pub cancelled: bool,
}

/// Frames from one port, read into a buffer that survives a cancelled
/// read (so `next` may be raced in `select!`).
struct FrameReader {
    stream: OwnedReadHalf,
    buffer: Vec<u8>,
}

impl FrameReader {
    /// The next frame; None at end of stream.
    async fn next(&mut self) -> Result<Option<Vec<Vec<u8>>>, String> {
        loop {
            if let Some(frame) = frame::take(&mut self.buffer)? {
                return Ok(Some(frame));
            }
            self.buffer.reserve(64 * 1024);
            let read = self
                .stream
                .read_buf(&mut self.buffer)
                .await
                .map_err(|e| e.to_string())?;
            if read == 0 {
                return Ok(None);
            }
        }
    }
}

struct Readers {
    control: FrameReader,
    data: FrameReader,
}

/// The channel to a VM's agent.
pub struct Guest {
    vm_name: String,
    console: PathBuf,
    writer: Mutex<OwnedWriteHalf>,
    /// Never shut (QEMU closes the port on that); written by `put` alone.
    data_writer: Mutex<OwnedWriteHalf>,
    /// Held by whoever waits for answers: one request at a time.
    readers: Mutex<Readers>,
}

impl Guest {
    /// The agent's ports, connected to QEMU's sockets.
    pub(crate) fn new(
        vm_name: &str,
        console: &Path,
        control: UnixStream,
        data: UnixStream,
    ) -> Self {
        let (control_read, control_write) = control.into_split();
        // The data port's write half is kept: dropping it would shut the
        // socket's sending side, and QEMU closes the port on that.
        let (data_read, data_write) = data.into_split();
        Guest {
            vm_name: vm_name.to_string(),
            console: console.to_path_buf(),
            writer: Mutex::new(control_write),
            data_writer: Mutex::new(data_write),
            readers: Mutex::new(Readers {
                control: FrameReader {
                    stream: control_read,
                    buffer: Vec::new(),
                },
                data: FrameReader {
                    stream: data_read,
                    buffer: Vec::new(),
                },
            }),
        }
    }

    /// An error naming the VM, with its console's last lines.
    pub(crate) fn error(&self, message: impl Into<String>) -> VmError {
        VmError::Guest {
            vm: self.vm_name.clone(),
            message: message.into(),
            console: console_tail(&self.console),
        }
    }

    async fn send(&self, fields: &[&[u8]]) -> Result<(), VmError> {
        let frame = frame::encode(fields);
        self.writer
            .lock()
            .await
            .write_all(&frame)
            .await
            .map_err(|e| self.error(format!("writing to the agent: {e}")))
    }

    /// The next answer on the control port.
    async fn answer(&self, readers: &mut Readers) -> Result<Vec<Vec<u8>>, VmError> {
        match readers.control.next().await {
            Ok(Some(frame)) if !frame.is_empty() => Ok(frame),
            Ok(Some(_)) => Err(self.error("an empty frame from the agent")),
            Ok(None) => Err(self.error("the agent stopped answering (its port closed)")),
            Err(e) => Err(self.error(format!("reading from the agent: {e}"))),
        }
    }

    /// Waits for the agent's `hello` (its kernel release), sends the boot
    /// parameters and waits for `ready`.
    pub(crate) async fn handshake(
        &self,
        workspace: Option<&Path>,
        network: bool,
        hostname: &str,
    ) -> Result<String, VmError> {
        let mut readers = self.readers.lock().await;
        let hello = self.answer(&mut readers).await?;
        if hello[0] != b"hello" {
            return Err(self.error(format!("expected hello, got {}", describe(&hello))));
        }
        let release = String::from_utf8_lossy(hello.get(1).map(Vec::as_slice).unwrap_or_default())
            .into_owned();
        let workspace = workspace
            .map(|p| p.as_os_str().as_bytes())
            .unwrap_or_default();
        let network: &[u8] = if network { b"1" } else { b"0" };
        self.send(&[b"boot", workspace, network, hostname.as_bytes()])
            .await?;
        let ready = self.answer(&mut readers).await?;
        match ready[0].as_slice() {
            b"ready" => Ok(release),
            b"failed" => Err(self.error(format!(
                "the agent could not boot the VM: {}",
                field_text(&ready, 1)
            ))),
            _ => Err(self.error(format!("expected ready, got {}", describe(&ready)))),
        }
    }

    /// Sends `ping` and waits for `pong`. The agent sets its clock to the
    /// host's and reseeds its RNG with fresh host randomness: what a
    /// restored VM needs before it runs anything.
    pub async fn ping(&self) -> Result<(), VmError> {
        let mut readers = self.readers.lock().await;
        self.send_ping().await?;
        self.expect(&mut readers, b"pong").await
    }

    /// Sends `ping` (the host's clock, 64 bytes of its randomness) without
    /// waiting for the answer, which comes in order with the next ones.
    async fn send_ping(&self) -> Result<(), VmError> {
        use std::io::Read as _;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos()
            .to_string();
        let mut seed = [0u8; 64];
        // 64 bytes of the kernel's pool: never blocks once the host booted.
        std::fs::File::open("/dev/urandom")
            .and_then(|mut random| random.read_exact(&mut seed))
            .map_err(|e| VmError::Setup(format!("reading /dev/urandom: {e}")))?;
        self.send(&[b"ping", now.as_bytes(), &seed]).await
    }

    async fn expect(&self, readers: &mut Readers, word: &[u8]) -> Result<(), VmError> {
        let answer = self.answer(readers).await?;
        if answer[0] != word {
            return Err(self.error(format!(
                "expected {}, got {}",
                String::from_utf8_lossy(word),
                describe(&answer)
            )));
        }
        Ok(())
    }

    /// Flushes the guest's page cache to its disks.
    pub async fn sync(&self) -> Result<(), VmError> {
        let mut readers = self.readers.lock().await;
        self.send(&[b"sync"]).await?;
        self.expect(&mut readers, b"synced").await
    }

    /// Syncs and unmounts the workspace: afterwards the VM may be stopped
    /// and its workspace disk read.
    pub(crate) async fn halt(&self) -> Result<(), VmError> {
        let mut readers = self.readers.lock().await;
        self.send(&[b"shutdown"]).await?;
        self.expect(&mut readers, b"halted").await
    }

    /// Sends `signal` to the running action's process group (nothing when
    /// none runs). Usable while `run` streams output.
    pub async fn signal(&self, signal: i32) -> Result<(), VmError> {
        self.send(&[b"signal", signal.to_string().as_bytes()]).await
    }

    /// Runs an action, copying its output to `stdout` and `stderr` as it
    /// comes, until it ends. When `cancel` fires, the action's process
    /// group is killed and the outcome says `cancelled`.
    pub async fn run<O, E>(
        &self,
        request: &RunRequest,
        mut stdout: O,
        mut stderr: E,
        cancel: CancellationToken,
    ) -> Result<GuestOutcome, VmError>
    where
        O: AsyncWrite + Unpin + Send,
        E: AsyncWrite + Unpin + Send,
    {
        if request.arguments.is_empty() {
            return Err(self.error("an action with no arguments"));
        }
        let mut readers = self.readers.lock().await;
        let (user, uid, gid) = match &request.user {
            GuestUser::Id { uid, gid } => (String::new(), *uid, *gid),
            GuestUser::Name(name) => (name.clone(), 0, 0),
        };
        let numbers = [
            uid.to_string(),
            gid.to_string(),
            request
                .timeout
                .map_or(0, |t| t.as_millis().max(1) as u64)
                .to_string(),
            (request.grace.as_millis() as u64).to_string(),
            request
                .memory_limit_bytes
                .map(|b| b.to_string())
                .unwrap_or_default(),
            request.arguments.len().to_string(),
        ];
        let environment: Vec<Vec<u8>> = request
            .environment
            .iter()
            .map(|(name, value)| [name.as_bytes(), b"=", value.as_bytes()].concat())
            .collect();
        let mut fields: Vec<&[u8]> = vec![
            b"run",
            request.working_directory.as_os_str().as_bytes(),
            user.as_bytes(),
        ];
        fields.extend(numbers.iter().map(|n| n.as_bytes()));
        fields.extend(request.arguments.iter().map(|a| a.as_bytes()));
        fields.extend(environment.iter().map(Vec::as_slice));
        self.send(&fields).await?;

        let mut outcome = None;
        let mut output_ended = false;
        let mut cancelled = false;
        while outcome.is_none() || !output_ended {
            let Readers { control, data } = &mut *readers;
            tokio::select! {
                frame = control.next(), if outcome.is_none() => {
                    let frame = match frame {
                        Ok(Some(frame)) if !frame.is_empty() => frame,
                        Ok(_) => return Err(self.error("the agent stopped answering during the action")),
                        Err(e) => return Err(self.error(format!("reading from the agent: {e}"))),
                    };
                    outcome = Some(self.parse_outcome(&frame)?);
                    if frame[0] == b"failed" {
                        // Nothing ran: no output will come.
                        output_ended = true;
                    }
                }
                frame = data.next(), if !output_ended => {
                    let frame = match frame {
                        Ok(Some(frame)) if !frame.is_empty() => frame,
                        Ok(_) => return Err(self.error("the agent's data port closed during the action")),
                        Err(e) => return Err(self.error(format!("reading the action's output: {e}"))),
                    };
                    let bytes = frame.get(1).map(Vec::as_slice).unwrap_or_default();
                    let writer: &mut (dyn AsyncWrite + Unpin + Send) = match frame[0].as_slice() {
                        b"out" => &mut stdout,
                        b"err" => &mut stderr,
                        b"end" => {
                            output_ended = true;
                            continue;
                        }
                        _ => return Err(self.error(format!("unexpected data frame {}", describe(&frame)))),
                    };
                    // A slow writer must not hold up a cancel.
                    let write = writer.write_all(bytes);
                    tokio::pin!(write);
                    loop {
                        tokio::select! {
                            written = &mut write => {
                                written.map_err(|e| VmError::Output(e.to_string()))?;
                                break;
                            }
                            () = cancel.cancelled(), if !cancelled && outcome.is_none() => {
                                cancelled = true;
                                self.signal(9).await?;
                            }
                        }
                    }
                }
                () = cancel.cancelled(), if !cancelled && outcome.is_none() => {
                    cancelled = true;
                    self.signal(9).await?;
                }
            }
        }
        let _ = stdout.flush().await;
        let _ = stderr.flush().await;
        let mut outcome = outcome.expect("the loop ends with one")?;
        outcome.cancelled = cancelled;
        Ok(outcome)
    }

    /// The action's outcome, or the agent's reason it could not run it
    /// (the inner error).
    fn parse_outcome(&self, frame: &[Vec<u8>]) -> Result<Result<GuestOutcome, VmError>, VmError> {
        let number = |i: usize| -> Result<i32, VmError> {
            field_text(frame, i)
                .parse()
                .map_err(|_| self.error(format!("a malformed answer {}", describe(frame))))
        };
        let status = match frame[0].as_slice() {
            b"exited" => GuestStatus::Exited(number(1)?),
            b"signaled" => GuestStatus::Signaled(number(1)?),
            b"failed" => {
                return Ok(Err(self.error(format!(
                    "the agent could not run the action: {}",
                    field_text(frame, 1)
                ))))
            }
            _ => return Err(self.error(format!("an unexpected answer {}", describe(frame)))),
        };
        Ok(Ok(GuestOutcome {
            status,
            timed_out: number(2)? == 1,
            oom_killed: number(3)? == 1,
            cancelled: false,
        }))
    }
}

fn field_text(frame: &[Vec<u8>], index: usize) -> String {
    String::from_utf8_lossy(frame.get(index).map(Vec::as_slice).unwrap_or_default()).into_owned()
}

/// A frame for an error message: its name and how many fields.
fn describe(frame: &[Vec<u8>]) -> String {
    format!("`{}` ({} fields)", field_text(frame, 0), frame.len())
}

/// The console log's last lines.
pub(crate) fn console_tail(console: &Path) -> String {
    let text = std::fs::read(console).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(CONSOLE_LINES)..].join("\n")
}
