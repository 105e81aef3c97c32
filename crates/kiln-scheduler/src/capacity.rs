//! Capacity accounting: [`ResourceAmount`] (CPU, memory, disk), what an
//! executor has in total ([`Capacity`]) and what each running action holds
//! of it ([`Reservation`], given back on drop).

use std::path::Path;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::Notify;

/// CPU, memory and workspace disk: what an executor has in total and an
/// action reserves while it runs (`docs/platform-properties.md`,
/// "Resources").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ResourceAmount {
    pub cpu_millis: u64,
    pub memory_bytes: u64,
    pub disk_bytes: u64,
}

impl ResourceAmount {
    /// No limit: what an executor that advertises no capacity offers.
    pub const UNLIMITED: ResourceAmount = ResourceAmount {
        cpu_millis: u64::MAX,
        memory_bytes: u64::MAX,
        disk_bytes: u64::MAX,
    };

    /// What an action whose platform estimates `estimates` reserves on its
    /// executor while it runs: each estimate, else the server's default.
    pub(crate) fn reserved_by(
        estimates: &kiln_platform::Resources,
        defaults: ResourceAmount,
    ) -> ResourceAmount {
        ResourceAmount {
            cpu_millis: estimates.cpu_millis.unwrap_or(defaults.cpu_millis),
            memory_bytes: estimates.memory_bytes.unwrap_or(defaults.memory_bytes),
            disk_bytes: estimates.free_disk_bytes.unwrap_or(defaults.disk_bytes),
        }
    }

    /// What an executor with workspaces under `work_dir` offers: each
    /// amount `given`, or where it is 0, this machine's (see
    /// [`ResourceAmount::of_host`]).
    pub fn given_or_host(given: ResourceAmount, work_dir: &Path) -> ResourceAmount {
        let host = ResourceAmount::of_host(work_dir);
        let or = |given: u64, host: u64| if given == 0 { host } else { given };
        ResourceAmount {
            cpu_millis: or(given.cpu_millis, host.cpu_millis),
            memory_bytes: or(given.memory_bytes, host.memory_bytes),
            disk_bytes: or(given.disk_bytes, host.disk_bytes),
        }
    }

    /// This machine: its CPUs (1000 millis each), its physical memory, and
    /// the free space of the file system that holds `work_dir` (or its
    /// nearest existing ancestor).
    pub fn of_host(work_dir: &Path) -> ResourceAmount {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u64);
        let memory_bytes = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|info| {
                let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
                let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
                Some(kib * 1024)
            })
            .unwrap_or(u64::MAX);
        let disk_bytes = work_dir
            .ancestors()
            .find_map(|dir| rustix::fs::statvfs(dir).ok())
            .map_or(u64::MAX, |fs| fs.f_bavail.saturating_mul(fs.f_frsize));
        ResourceAmount {
            cpu_millis: cpus * 1000,
            memory_bytes,
            disk_bytes,
        }
    }

    pub(crate) fn fits_in(self, available: ResourceAmount) -> bool {
        self.cpu_millis <= available.cpu_millis
            && self.memory_bytes <= available.memory_bytes
            && self.disk_bytes <= available.disk_bytes
    }

    pub(crate) fn max(self, other: ResourceAmount) -> ResourceAmount {
        ResourceAmount {
            cpu_millis: self.cpu_millis.max(other.cpu_millis),
            memory_bytes: self.memory_bytes.max(other.memory_bytes),
            disk_bytes: self.disk_bytes.max(other.disk_bytes),
        }
    }

    /// Takes `amount` out of `self` (it fits).
    pub(crate) fn take(&mut self, amount: ResourceAmount) {
        self.cpu_millis -= amount.cpu_millis;
        self.memory_bytes -= amount.memory_bytes;
        self.disk_bytes -= amount.disk_bytes;
    }

    /// Gives `amount` back to `self`.
    pub(crate) fn give(&mut self, amount: ResourceAmount) {
        self.cpu_millis = self.cpu_millis.saturating_add(amount.cpu_millis);
        self.memory_bytes = self.memory_bytes.saturating_add(amount.memory_bytes);
        self.disk_bytes = self.disk_bytes.saturating_add(amount.disk_bytes);
    }
}

impl std::fmt::Display for ResourceAmount {
    /// In the property names of `docs/platform-properties.md`, for error
    /// messages.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let amount = |value: u64, unit: &str| {
            if value == u64::MAX {
                "unlimited".to_string()
            } else {
                format!("{value}{unit}")
            }
        };
        write!(
            f,
            "EstimatedCPU={} EstimatedMemory={} EstimatedFreeDiskBytes={}",
            amount(self.cpu_millis, "m"),
            amount(self.memory_bytes, "B"),
            amount(self.disk_bytes, "B")
        )
    }
}

/// One executor's capacity while it runs: its total and what is free.
/// Queued actions are placed only where their reservation fits in `free`.
pub(crate) struct Capacity {
    pub(crate) free: Mutex<ResourceAmount>,
    /// Wakes the executor when a reservation ends.
    pub(crate) released: Notify,
}

impl Capacity {
    pub(crate) fn new(total: ResourceAmount) -> Arc<Capacity> {
        Arc::new(Capacity {
            free: Mutex::new(total),
            released: Notify::new(),
        })
    }
}

/// An action's share of its executor's capacity, given back on drop (the
/// action finished, was requeued, or its executor was lost).
pub(crate) struct Reservation {
    pub(crate) capacity: Arc<Capacity>,
    pub(crate) amount: ResourceAmount,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.capacity.free.lock().give(self.amount);
        self.capacity.released.notify_waiters();
    }
}
