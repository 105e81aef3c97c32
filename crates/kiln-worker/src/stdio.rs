//! Where an action's stdout and stderr go.
//!
//! The command writes into two pipes; the executor drains each into its
//! file (`CommandSpec::stdout_path` / `stderr_path`), creating the file
//! only when the stream carries data. Most build actions print nothing,
//! and two files created and deleted per action are two inode allocations
//! on the hot path (see [`crate::scratch`]). Output streams through one
//! read buffer to disk and is never held in memory, whatever its size.
//!
//! A pipe is drained until the command is gone, not until end of file: a
//! process that escaped the action's process group may hold a write end
//! forever. What it writes after the action has ended reaches no file.

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::error::RunError;

/// Bytes read per pipe read.
const READ_BUFFER: usize = 64 * 1024;
/// Most bytes taken from a pipe once the command has ended (a pipe holds
/// 64 KiB by default), so a writer that outlived the action cannot keep
/// the drain going.
const DRAIN_LIMIT: usize = 1024 * 1024;

/// The write ends of a capture's stdout and stderr pipes.
#[derive(Debug, Clone)]
pub struct OutputPipes {
    stdout: Arc<OwnedFd>,
    stderr: Arc<OwnedFd>,
}

impl OutputPipes {
    /// Descriptors for a command's stdout and stderr (duplicates; close-on-
    /// exec, so only the command they are given to inherits them).
    pub fn fds(&self) -> std::io::Result<(OwnedFd, OwnedFd)> {
        Ok((self.stdout.try_clone()?, self.stderr.try_clone()?))
    }
}

/// Drains the pipes into the files until [`OutputCapture::finish`].
pub struct OutputCapture {
    stop: CancellationToken,
    pumps: Vec<JoinHandle<Result<(), RunError>>>,
}

/// Starts capturing into `stdout_path` and `stderr_path`. Must be called
/// within the runtime.
pub fn capture(
    stdout_path: &Path,
    stderr_path: &Path,
) -> Result<(OutputPipes, OutputCapture), RunError> {
    let stop = CancellationToken::new();
    let (stdout_pipe, stdout) = pipe_pair()?;
    let (stderr_pipe, stderr) = pipe_pair()?;
    let pumps = vec![
        tokio::spawn(pump(stdout_pipe, stdout_path.to_path_buf(), stop.clone())),
        tokio::spawn(pump(stderr_pipe, stderr_path.to_path_buf(), stop.clone())),
    ];
    let pipes = OutputPipes {
        stdout: Arc::new(stdout),
        stderr: Arc::new(stderr),
    };
    Ok((pipes, OutputCapture { stop, pumps }))
}

impl OutputCapture {
    /// Call when the command and its process group are gone: takes what
    /// they left in the pipes and closes the files.
    pub async fn finish(mut self) -> Result<(), RunError> {
        self.stop.cancel();
        for pump in std::mem::take(&mut self.pumps) {
            pump.await
                .map_err(|e| RunError::Internal(format!("capturing the action's output: {e}")))??;
        }
        Ok(())
    }
}

impl Drop for OutputCapture {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A pipe: its read end for the executor, its write end for the command.
fn pipe_pair() -> Result<(pipe::Receiver, OwnedFd), RunError> {
    let (read, write) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
        .map_err(|e| RunError::io("creating an output pipe", e.into()))?;
    let receiver = pipe::Receiver::from_owned_fd(read)
        .map_err(|e| RunError::io("watching an output pipe", e))?;
    Ok((receiver, write))
}

/// Copies the pipe into `path` until stopped, then what is left in it. A
/// failed write (a full disk) is reported at the end; the pipe is drained
/// regardless, so the command never blocks on it.
async fn pump(
    mut pipe: pipe::Receiver,
    path: PathBuf,
    stop: CancellationToken,
) -> Result<(), RunError> {
    let mut buffer = vec![0u8; READ_BUFFER];
    let mut sink = Sink::new(path);
    loop {
        let read = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            read = pipe.read(&mut buffer) => read,
        };
        match read.map_err(|e| RunError::io("reading the action's output", e))? {
            0 => return sink.close().await,
            n => sink.write(&buffer[..n]).await,
        }
    }
    // Read the pipe itself (it is non-blocking) rather than ask tokio,
    // whose readiness may not have caught up with the last writes.
    let mut drained = 0;
    while drained < DRAIN_LIMIT {
        match rustix::io::read(pipe.as_fd(), &mut buffer[..]) {
            Ok(0) | Err(rustix::io::Errno::AGAIN) => break,
            Ok(n) => {
                drained += n;
                sink.write(&buffer[..n]).await;
            }
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(RunError::io("reading the action's output", e.into())),
        }
    }
    sink.close().await
}

/// A file created on the first write; the first error is kept.
struct Sink {
    path: PathBuf,
    file: Option<tokio::fs::File>,
    error: Option<RunError>,
}

impl Sink {
    fn new(path: PathBuf) -> Sink {
        Sink {
            path,
            file: None,
            error: None,
        }
    }

    async fn write(&mut self, data: &[u8]) {
        if self.error.is_some() {
            return;
        }
        if let Err(e) = self.try_write(data).await {
            self.error = Some(RunError::io(format!("writing {}", self.path.display()), e));
        }
    }

    async fn try_write(&mut self, data: &[u8]) -> std::io::Result<()> {
        if self.file.is_none() {
            let file = tokio::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)
                .await?;
            self.file = Some(file);
        }
        self.file
            .as_mut()
            .expect("opened above")
            .write_all(data)
            .await
    }

    async fn close(mut self) -> Result<(), RunError> {
        if let (Some(file), None) = (self.file.as_mut(), &self.error) {
            if let Err(e) = file.flush().await {
                self.error = Some(RunError::io(format!("writing {}", self.path.display()), e));
            }
        }
        match self.error {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn silent_streams_create_no_file_and_output_arrives_whole() {
        let dir = tempfile::tempdir().unwrap();
        let (stdout, stderr) = (dir.path().join("stdout"), dir.path().join("stderr"));
        let (pipes, capture) = capture(&stdout, &stderr).unwrap();
        let (out, _err) = pipes.fds().unwrap();
        let mut out = std::fs::File::from(out);
        // More than a pipe holds, written while the pump runs.
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let written = data.clone();
        tokio::task::spawn_blocking(move || out.write_all(&written).unwrap())
            .await
            .unwrap();
        capture.finish().await.unwrap();
        assert_eq!(std::fs::read(&stdout).unwrap(), data);
        assert!(!stderr.exists(), "nothing was written to stderr");
    }

    #[tokio::test]
    async fn a_writer_holding_the_pipe_open_does_not_hold_up_finish() {
        let dir = tempfile::tempdir().unwrap();
        let (stdout, stderr) = (dir.path().join("stdout"), dir.path().join("stderr"));
        let (pipes, capture) = capture(&stdout, &stderr).unwrap();
        // `pipes` keeps every write end open: no end of file will come.
        let (_out, err) = pipes.fds().unwrap();
        std::fs::File::from(err)
            .write_all(b"left in the pipe")
            .unwrap();
        capture.finish().await.unwrap();
        assert_eq!(std::fs::read(&stderr).unwrap(), b"left in the pipe");
        drop(pipes);
    }
}
