//! Direct-I/O writes of packed batches that finish after the batch is
//! acknowledged, on one writer thread per store.
//!
//! Why: a direct write waits for the device, and on a host whose disk is
//! slower than the network the upload would wait with it, where a buffered
//! write returns once the page cache has the data. Acknowledging first is
//! what group commit allows anyway (a blob reaches the disk with the next
//! commit). What keeps it safe:
//! - the batch's range is allocated (`fallocate`, the rest of its segment
//!   at once where there is room) before it is acknowledged, so a full
//!   disk fails the upload that hit it;
//! - only batches whose every blob is kept in memory go behind, and a kept
//!   blob whose write has not landed is never given up by the recent tier
//!   ([`Landing`]), so no read reaches the file before its data does;
//! - [`WriteBehind::wait`] runs before every sync of the segments, so a
//!   commit never checkpoints a record whose data is still in flight; a
//!   write that failed fails that wait, which stops the store.

use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;

use bytes::Bytes;
use parking_lot::{Condvar, Mutex};

use super::write_buffers_at;

/// Whether a batch written behind has landed on the file. Shared by the
/// batch's kept blobs.
#[derive(Clone, Debug, Default)]
pub(super) struct Landing(Arc<AtomicBool>);

impl Landing {
    /// A landing for a write that has already happened.
    pub(super) fn landed() -> Self {
        let landing = Landing::default();
        landing.land();
        landing
    }

    pub(super) fn has_landed(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }

    pub(super) fn land(&self) {
        self.0.store(true, Ordering::Release);
    }
}

struct Job {
    file: Arc<File>,
    offset: u64,
    /// Aligned, each a whole number of blocks.
    buffers: Vec<Bytes>,
    landing: Landing,
}

#[derive(Default)]
struct Progress {
    submitted: u64,
    /// Jobs done, landed or failed, in submission order.
    done: u64,
    /// The first failure; every later wait fails with it.
    failed: Option<(io::ErrorKind, String)>,
}

#[derive(Default)]
struct Shared {
    progress: Mutex<Progress>,
    changed: Condvar,
    /// Held by tests to keep jobs from starting.
    #[cfg(test)]
    hold: Mutex<()>,
}

pub(super) struct WriteBehind {
    /// `None` once dropping, which ends the thread.
    jobs: Option<mpsc::Sender<Job>>,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl WriteBehind {
    pub(super) fn start() -> io::Result<Self> {
        let (sender, receiver) = mpsc::channel();
        let shared = Arc::<Shared>::default();
        let thread = std::thread::Builder::new()
            .name("kiln-store-behind".into())
            .spawn({
                let shared = shared.clone();
                move || write_jobs(receiver, &shared)
            })?;
        Ok(WriteBehind {
            jobs: Some(sender),
            shared,
            thread: Some(thread),
        })
    }

    /// Queues `buffers` to be written at `offset` of `file` (opened for
    /// direct I/O); `landing` is set once they are. Counted before it is
    /// sent, so a [`WriteBehind::wait`] that follows the batch's journal
    /// record waits for it.
    pub(super) fn submit(
        &self,
        file: Arc<File>,
        offset: u64,
        buffers: Vec<Bytes>,
        landing: Landing,
    ) -> io::Result<()> {
        self.shared.progress.lock().submitted += 1;
        let job = Job {
            file,
            offset,
            buffers,
            landing,
        };
        let sent = self.jobs.as_ref().map(|jobs| jobs.send(job));
        if matches!(sent, Some(Ok(()))) {
            return Ok(());
        }
        let stopped = "the store's writer thread stopped";
        let mut progress = self.shared.progress.lock();
        progress.done += 1;
        progress
            .failed
            .get_or_insert((io::ErrorKind::Other, stopped.into()));
        Err(io::Error::other(stopped))
    }

    /// Waits until every write submitted so far is done; the first that
    /// failed fails it.
    pub(super) fn wait(&self) -> io::Result<()> {
        let mut progress = self.shared.progress.lock();
        let target = progress.submitted;
        while progress.done < target {
            self.shared.changed.wait(&mut progress);
        }
        match &progress.failed {
            Some((kind, message)) => Err(io::Error::new(
                *kind,
                format!("a batch written after its acknowledgement failed: {message}"),
            )),
            None => Ok(()),
        }
    }

    #[cfg(test)]
    pub(super) fn hold(&self) -> parking_lot::MutexGuard<'_, ()> {
        self.shared.hold.lock()
    }
}

impl Drop for WriteBehind {
    fn drop(&mut self) {
        self.jobs.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn write_jobs(receiver: mpsc::Receiver<Job>, shared: &Shared) {
    for job in receiver {
        #[cfg(test)]
        drop(shared.hold.lock());
        let written = write_buffers_at(&job.file, &job.buffers, job.offset);
        let mut progress = shared.progress.lock();
        match written {
            Ok(()) => job.landing.land(),
            Err(e) => {
                tracing::error!(error = %e, offset = job.offset, "writing a packed batch failed");
                progress.failed.get_or_insert((e.kind(), e.to_string()));
            }
        }
        progress.done += 1;
        shared.changed.notify_all();
    }
}
