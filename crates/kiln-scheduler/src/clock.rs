//! Time and names, injected: the scheduler reads the time only through a
//! [`Clock`] and names operations only through an [`IdGenerator`], so queue,
//! fair-share, warm-routing and expiry policy are unit-tested with a clock
//! the test moves and names it can predict, without a server and without
//! sleeping. A server uses [`SystemClock`] and [`RandomIds`] (UUIDs).
//!
//! Timers that wait (tokio's `sleep`, `timeout`) stay on tokio's clock;
//! what they wait for is decided by comparing [`Clock::now`] readings.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use kiln_proto::protobuf::Timestamp;
#[cfg(test)]
use std::time::Duration;

/// Where the scheduler reads the time.
pub trait Clock: Send + Sync + 'static {
    /// Monotonic time, for ages and deadlines.
    fn now(&self) -> Instant;
    /// Wall-clock time, for the timestamps clients and operators see.
    fn wall(&self) -> SystemTime;
}

/// Where the scheduler takes the unique part of each operation's name
/// (`operations/{id}`).
pub trait IdGenerator: Send + Sync + 'static {
    fn new_id(&self) -> String;
}

/// The machine's clocks.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }

    fn wall(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// Random (v4) UUIDs: names no client can guess or collide with.
#[derive(Debug, Default, Clone, Copy)]
pub struct RandomIds;

impl IdGenerator for RandomIds {
    fn new_id(&self) -> String {
        uuid::Uuid::new_v4().to_string()
    }
}

/// The clock and id generator a scheduler runs with.
#[derive(Clone)]
pub struct Environment {
    pub clock: Arc<dyn Clock>,
    pub ids: Arc<dyn IdGenerator>,
}

impl Default for Environment {
    /// The real clocks and random UUIDs.
    fn default() -> Self {
        Environment {
            clock: Arc::new(SystemClock),
            ids: Arc::new(RandomIds),
        }
    }
}

/// `time` as a protobuf `Timestamp` (times before the epoch as the epoch).
pub(crate) fn timestamp_of(time: SystemTime) -> Timestamp {
    let since_epoch = time
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    Timestamp {
        seconds: since_epoch.as_secs() as i64,
        nanos: since_epoch.subsec_nanos() as i32,
    }
}

/// A clock that moves only when a test says so.
#[cfg(test)]
pub(crate) struct ManualClock {
    start: Instant,
    wall_start: SystemTime,
    elapsed: parking_lot::Mutex<Duration>,
}

#[cfg(test)]
impl ManualClock {
    pub(crate) fn new() -> Arc<ManualClock> {
        Arc::new(ManualClock {
            start: Instant::now(),
            wall_start: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            elapsed: parking_lot::Mutex::new(Duration::ZERO),
        })
    }

    pub(crate) fn advance(&self, by: Duration) {
        *self.elapsed.lock() += by;
    }
}

#[cfg(test)]
impl Clock for ManualClock {
    fn now(&self) -> Instant {
        self.start + *self.elapsed.lock()
    }

    fn wall(&self) -> SystemTime {
        self.wall_start + *self.elapsed.lock()
    }
}

/// Ids `1`, `2`, `3`, … in the order they are asked for.
#[cfg(test)]
#[derive(Default)]
pub(crate) struct SequentialIds(std::sync::atomic::AtomicU64);

#[cfg(test)]
impl IdGenerator for SequentialIds {
    fn new_id(&self) -> String {
        let id = self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        id.to_string()
    }
}
