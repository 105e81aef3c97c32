//! Writes large blob files with direct I/O (`O_DIRECT`) from aligned
//! buffers, on a writer thread of their own.
//!
//! Why: a buffered write of a new file makes the kernel allocate and copy
//! into fresh page-cache pages; on the VMs measured (BENCHMARKS.md,
//! "Machine") that cost 0.2–1.6 CPU-seconds per GiB, more than hashing the
//! data. Direct I/O costs about 0.13 s/GiB of CPU and the device time
//! overlaps with hashing, because the caller fills one buffer while the
//! writer thread writes the previous.
//! Where the file system refuses `O_DIRECT` (tmpfs, some FUSE), the same path
//! runs with buffered writes.
//!
//! A sink can also keep what it wrote in memory ([`DirectFileSink::keep`]):
//! each buffer, once written, is kept instead of being filled again, so the
//! blob can be read back without the disk and without a copy.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::aligned::AlignedBuf;

/// Bytes per write. Big enough to stream at device speed.
pub(super) const BUFFER_BYTES: usize = 1024 * 1024;
/// Buffers per file: one being filled, the rest being written.
const BUFFERS: usize = 3;

type Job = (AlignedBuf, u64);

/// Where a keeping sink takes each next buffer; `None` when there is no
/// room left, and the sink stops keeping.
pub type BufferSource = Box<dyn FnMut() -> Option<AlignedBuf> + Send>;

/// A file being written at increasing offsets through aligned buffers.
pub struct DirectFileSink {
    file: Arc<File>,
    filling: AlignedBuf,
    /// Where `filling` goes in the file.
    offset: u64,
    spare: Vec<AlignedBuf>,
    in_flight: usize,
    jobs: Option<mpsc::SyncSender<Job>>,
    done: Option<mpsc::Receiver<io::Result<AlignedBuf>>>,
    writer: Option<JoinHandle<()>>,
    /// While keeping: where buffers come from, and the written ones, in
    /// order.
    keep: Option<(BufferSource, Vec<AlignedBuf>)>,
}

impl DirectFileSink {
    /// Creates `path`, with direct I/O where the file system allows it.
    pub fn create(path: &Path) -> io::Result<Self> {
        let direct = rustix::fs::OFlags::DIRECT.bits() as i32;
        let open = |flags: i32| {
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(flags)
                .open(path)
        };
        let file = match open(direct) {
            Ok(file) => file,
            Err(e) if e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) => {
                let _ = std::fs::remove_file(path);
                open(0)?
            }
            Err(e) => return Err(e),
        };
        Ok(DirectFileSink {
            file: Arc::new(file),
            filling: AlignedBuf::new(BUFFER_BYTES),
            offset: 0,
            spare: Vec::new(),
            in_flight: 0,
            jobs: None,
            done: None,
            writer: None,
            keep: None,
        })
    }

    /// Keeps the data written from now on in memory, in buffers taken from
    /// `source`, until it has no more. Call before the first write.
    pub fn keep(&mut self, mut source: BufferSource) {
        debug_assert!(self.offset == 0 && self.filling.len == 0);
        if let Some(buffer) = source() {
            self.filling = buffer;
            self.keep = Some((source, Vec::new()));
        }
    }

    pub fn write(&mut self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            // A full buffer goes out only once more data comes: the last one
            // is written by `finish`, so no buffer is taken that stays empty.
            if self.filling.len == self.filling.capacity() {
                self.submit()?;
            }
            let n = self.filling.fill_from(data);
            data = &data[n..];
        }
        Ok(())
    }

    /// Hands the full buffer to the writer thread and takes a free one.
    fn submit(&mut self) -> io::Result<()> {
        if self.jobs.is_none() {
            self.start_writer()?;
        }
        let next = self.next_buffer()?;
        let full = std::mem::replace(&mut self.filling, next);
        let offset = self.offset;
        self.offset += full.len as u64;
        self.jobs
            .as_ref()
            .expect("writer started")
            .send((full, offset))
            .map_err(|_| io::Error::other("the blob writer thread stopped"))?;
        self.in_flight += 1;
        Ok(())
    }

    /// The buffer to fill next: a new one to keep while keeping, else one
    /// written before.
    fn next_buffer(&mut self) -> io::Result<AlignedBuf> {
        if self.keep.is_some() {
            while self.in_flight + 1 >= BUFFERS {
                let written = self.reap()?;
                self.keep.as_mut().expect("keeping").1.push(written);
            }
            if let Some(buffer) = (self.keep.as_mut().expect("keeping").0)() {
                return Ok(buffer);
            }
            // No room: what was kept goes back to its pool.
            self.keep = None;
        }
        let mut buffer = match self.spare.pop() {
            Some(buffer) => buffer,
            None if self.in_flight + 1 < BUFFERS => AlignedBuf::new(BUFFER_BYTES),
            None => self.reap()?,
        };
        buffer.len = 0;
        Ok(buffer)
    }

    /// Waits for one write to finish; returns its buffer.
    fn reap(&mut self) -> io::Result<AlignedBuf> {
        let done = self.done.as_ref().expect("writer started");
        let buffer = done
            .recv()
            .map_err(|_| io::Error::other("the blob writer thread stopped"))??;
        self.in_flight -= 1;
        Ok(buffer)
    }

    fn start_writer(&mut self) -> io::Result<()> {
        let (jobs, job_queue) = mpsc::sync_channel::<Job>(BUFFERS);
        let (done_sender, done) = mpsc::sync_channel(BUFFERS);
        let file = self.file.clone();
        let writer = std::thread::Builder::new()
            .name("kiln-blob-writer".into())
            .spawn(move || {
                while let Ok((mut buffer, offset)) = job_queue.recv() {
                    let result = file.write_all_at(buffer.padded(), offset).map(|()| buffer);
                    if done_sender.send(result).is_err() {
                        return;
                    }
                }
            })?;
        self.jobs = Some(jobs);
        self.done = Some(done);
        self.writer = Some(writer);
        Ok(())
    }

    /// Writes what is left, trims the block padding, and returns the file,
    /// with the data in memory when the sink kept all of it.
    pub fn finish(mut self, size: u64) -> io::Result<(Arc<File>, Option<Vec<bytes::Bytes>>)> {
        while self.in_flight > 0 {
            let buffer = self.reap()?;
            match &mut self.keep {
                Some((_, kept)) => kept.push(buffer),
                None => self.spare.push(buffer),
            }
        }
        self.jobs = None; // the writer thread ends
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
        if self.filling.len > 0 {
            self.file.write_all_at(self.filling.padded(), self.offset)?;
        }
        self.file.set_len(size)?;
        let kept = self.keep.take().map(|(_, mut kept)| {
            let last = std::mem::replace(&mut self.filling, AlignedBuf::new(0));
            kept.extend((last.len > 0).then_some(last));
            kept.into_iter()
                .map(|buffer| {
                    let len = buffer.len;
                    buffer.into_bytes(0, len)
                })
                .collect()
        });
        Ok((self.file.clone(), kept))
    }
}

/// A sink dropped unfinished (an abandoned upload) waits for the writes
/// under way, so its buffers are back in their pools when the drop returns.
impl Drop for DirectFileSink {
    fn drop(&mut self) {
        self.jobs = None;
        self.done = None;
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_of_awkward_sizes_come_out_exact() {
        let dir = tempfile::tempdir().unwrap();
        for size in [1usize, 4095, 4097, BUFFER_BYTES, BUFFER_BYTES * 5 + 123] {
            let data: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
            let path = dir.path().join(format!("f{size}"));
            let mut sink = DirectFileSink::create(&path).unwrap();
            for chunk in data.chunks(70_001) {
                sink.write(chunk).unwrap();
            }
            sink.finish(size as u64).unwrap();
            assert_eq!(std::fs::read(&path).unwrap(), data, "size {size}");
        }
    }

    #[test]
    fn a_keeping_sink_hands_back_what_it_wrote_until_its_source_runs_dry() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..BUFFER_BYTES * 6).map(|i| (i * 7 % 251) as u8).collect();
        // (buffers the source has, blob size, whether the sink keeps it)
        for (buffers, size, kept) in [
            (6, BUFFER_BYTES * 5 + 123, true),
            (5, BUFFER_BYTES * 5 + 123, false),
            (5, BUFFER_BYTES * 5, true),
            (1, BUFFER_BYTES * 2, false),
        ] {
            let data = &data[..size];
            let pool = crate::aligned::BufferPool::new(BUFFER_BYTES, buffers * BUFFER_BYTES);
            let path = dir.path().join(format!("k{buffers}-{size}"));
            let mut sink = DirectFileSink::create(&path).unwrap();
            sink.keep(Box::new(move || pool.take()));
            for chunk in data.chunks(70_001) {
                sink.write(chunk).unwrap();
            }
            let (_, pieces) = sink.finish(size as u64).unwrap();
            assert_eq!(
                std::fs::read(&path).unwrap(),
                data,
                "{buffers} buffers, {size}"
            );
            match pieces {
                Some(pieces) => {
                    assert!(kept, "{buffers} buffers cannot hold {size} bytes");
                    assert!(
                        pieces.concat() == data,
                        "{buffers} buffers: kept bytes differ"
                    );
                }
                None => assert!(!kept, "{buffers} buffers hold {size} bytes"),
            }
        }
    }
}
