//! Per-action cgroups: where they are made ([`CgroupRoot`], found once at
//! start-up in either the v1 or the v2 hierarchy), the limits written into
//! them, and what is read back afterwards (OOM kills, peak memory). A
//! [`Cgroup`] kills what is left in it and removes itself when dropped, so
//! no error path leaks one.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use kiln_worker::Limits;

/// The CFS period used for CPU quotas: 100 ms, the kernel's default.
pub const CPU_PERIOD_MICROS: u64 = 100_000;
/// The smallest quota the kernel accepts (1 ms per period).
const CPU_QUOTA_MIN_MICROS: u64 = 1_000;

/// Which cgroup hierarchy the limits live in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// One hierarchy per controller (`/sys/fs/cgroup/memory`, ...).
    V1,
    /// The unified hierarchy (`/sys/fs/cgroup` is cgroup2).
    V2,
}

/// A controller directory an action cgroup has a leaf in. In v2 there is
/// one directory for all controllers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Controller {
    Memory,
    Cpu,
    Pids,
    Unified,
}

impl Controller {
    fn v1_name(self) -> &'static str {
        match self {
            Controller::Memory => "memory",
            Controller::Cpu => "cpu",
            Controller::Pids => "pids",
            Controller::Unified => "",
        }
    }
}

/// Where action cgroups are created: a parent directory per controller
/// (v1) or one parent with the controllers enabled for its children (v2).
#[derive(Debug, Clone)]
pub struct CgroupRoot {
    version: Version,
    parents: Vec<(Controller, PathBuf)>,
}

/// One write of a limit: the file (in the controller's directory) and value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitWrite {
    pub controller: Controller,
    pub file: &'static str,
    pub value: String,
    /// Older kernels or configurations lack the file: skip it then.
    pub optional: bool,
}

/// The files and values that enforce `limits`, in the order they must be
/// written (v1 wants `memory.limit_in_bytes` before the memsw limit).
pub fn limit_writes(version: Version, limits: &Limits) -> Vec<LimitWrite> {
    let write = |controller, file, value: String, optional| LimitWrite {
        controller,
        file,
        value,
        optional,
    };
    let quota = limits
        .cpu_millis
        .map(|millis| (millis * CPU_PERIOD_MICROS / 1000).max(CPU_QUOTA_MIN_MICROS));
    let mut writes = Vec::new();
    match version {
        Version::V1 => {
            if let Some(bytes) = limits.memory_bytes {
                writes.push(write(
                    Controller::Memory,
                    "memory.limit_in_bytes",
                    bytes.to_string(),
                    false,
                ));
                // memory+swap equal to memory: no swap at all.
                writes.push(write(
                    Controller::Memory,
                    "memory.memsw.limit_in_bytes",
                    bytes.to_string(),
                    true,
                ));
            }
            if let Some(quota) = quota {
                writes.push(write(
                    Controller::Cpu,
                    "cpu.cfs_period_us",
                    CPU_PERIOD_MICROS.to_string(),
                    false,
                ));
                writes.push(write(
                    Controller::Cpu,
                    "cpu.cfs_quota_us",
                    quota.to_string(),
                    false,
                ));
            }
            if let Some(pids) = limits.pids_max {
                writes.push(write(Controller::Pids, "pids.max", pids.to_string(), false));
            }
        }
        Version::V2 => {
            if let Some(bytes) = limits.memory_bytes {
                writes.push(write(
                    Controller::Unified,
                    "memory.max",
                    bytes.to_string(),
                    false,
                ));
                writes.push(write(
                    Controller::Unified,
                    "memory.swap.max",
                    "0".into(),
                    true,
                ));
                // An OOM kill takes the whole action, not one random process.
                writes.push(write(
                    Controller::Unified,
                    "memory.oom.group",
                    "1".into(),
                    true,
                ));
            }
            if let Some(quota) = quota {
                writes.push(write(
                    Controller::Unified,
                    "cpu.max",
                    format!("{quota} {CPU_PERIOD_MICROS}"),
                    false,
                ));
            }
            if let Some(pids) = limits.pids_max {
                writes.push(write(
                    Controller::Unified,
                    "pids.max",
                    pids.to_string(),
                    false,
                ));
            }
        }
    }
    writes
}

/// The value of `key` in a flat keyed file such as v2 `memory.events` or
/// v1 `memory.oom_control` (`key value` per line).
pub fn keyed_value(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        (fields.next() == Some(key))
            .then(|| fields.next()?.parse().ok())
            .flatten()
    })
}

/// A cgroup mount from `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct CgroupMount {
    /// The path inside the hierarchy that is mounted (usually `/`).
    root: String,
    mount_point: PathBuf,
    v2: bool,
    /// v1 controllers of the hierarchy (from the super options).
    controllers: Vec<String>,
}

fn parse_mountinfo(text: &str) -> Vec<CgroupMount> {
    text.lines()
        .filter_map(|line| {
            let (before, after) = line.split_once(" - ")?;
            let fields: Vec<&str> = before.split(' ').collect();
            let mut after = after.split(' ');
            let fstype = after.next()?;
            let _source = after.next();
            let super_options = after.next().unwrap_or("");
            let v2 = match fstype {
                "cgroup2" => true,
                "cgroup" => false,
                _ => return None,
            };
            Some(CgroupMount {
                root: unescape_mountinfo(fields.get(3)?),
                mount_point: PathBuf::from(unescape_mountinfo(fields.get(4)?)),
                v2,
                controllers: super_options.split(',').map(str::to_string).collect(),
            })
        })
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4].iter().all(u8::is_ascii_digit)
        {
            let value = u8::from_str_radix(&field[i + 1..i + 4], 8).unwrap_or(b'?');
            out.push(value);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `/proc/self/cgroup`: (controllers, path) per hierarchy; v2 has no
/// controllers listed.
type Membership = Vec<(Vec<String>, String)>;

fn parse_proc_cgroup(text: &str) -> Membership {
    text.lines()
        .filter_map(|line| {
            let mut parts = line.splitn(3, ':');
            let _id = parts.next()?;
            let controllers = parts.next()?;
            let path = parts.next()?;
            Some((
                controllers
                    .split(',')
                    .filter(|c| !c.is_empty())
                    .map(str::to_string)
                    .collect(),
                path.to_string(),
            ))
        })
        .collect()
}

/// `own` (a path in the hierarchy) under a mount of `mount_root`, then
/// `parent`: relative to the executor's own cgroup, or absolute within the
/// hierarchy when it starts with `/`.
fn parent_directory(mount_point: &Path, mount_root: &str, own: &str, parent: &str) -> PathBuf {
    let inside = if parent.starts_with('/') {
        parent.to_string()
    } else {
        format!("{}/{parent}", own.trim_end_matches('/'))
    };
    let relative = inside
        .strip_prefix(mount_root.trim_end_matches('/'))
        .unwrap_or(&inside)
        .trim_start_matches('/');
    mount_point.join(relative)
}

impl CgroupRoot {
    /// Finds the hierarchy the executor lives in and prepares `parent`
    /// (relative to the executor's own cgroup unless absolute) for action
    /// cgroups. Fails with a human reason when no memory controller is
    /// usable; CPU and pids are used when present (see [`Self::missing`]).
    pub fn detect(parent: &str) -> Result<CgroupRoot, String> {
        let mountinfo = fs::read_to_string("/proc/self/mountinfo")
            .map_err(|e| format!("reading /proc/self/mountinfo: {e}"))?;
        let own = fs::read_to_string("/proc/self/cgroup")
            .map_err(|e| format!("reading /proc/self/cgroup: {e}"))?;
        let mounts = parse_mountinfo(&mountinfo);
        let membership = parse_proc_cgroup(&own);
        if mounts
            .iter()
            .any(|m| !m.v2 && m.controllers.iter().any(|c| c == "memory"))
        {
            return Self::detect_v1(&mounts, &membership, parent);
        }
        Self::detect_v2(&mounts, &membership, parent)
    }

    fn detect_v1(
        mounts: &[CgroupMount],
        membership: &[(Vec<String>, String)],
        parent: &str,
    ) -> Result<CgroupRoot, String> {
        let mut parents = Vec::new();
        for controller in [Controller::Memory, Controller::Cpu, Controller::Pids] {
            let name = controller.v1_name();
            let Some(mount) = mounts
                .iter()
                .find(|m| !m.v2 && m.controllers.iter().any(|c| c == name))
            else {
                continue;
            };
            let Some((_, own)) = membership
                .iter()
                .find(|(controllers, _)| controllers.iter().any(|c| c == name))
            else {
                continue;
            };
            let directory = parent_directory(&mount.mount_point, &mount.root, own, parent);
            fs::create_dir_all(&directory)
                .map_err(|e| format!("creating cgroup {}: {e}", directory.display()))?;
            parents.push((controller, directory));
        }
        Ok(CgroupRoot {
            version: Version::V1,
            parents,
        })
    }

    fn detect_v2(
        mounts: &[CgroupMount],
        membership: &[(Vec<String>, String)],
        parent: &str,
    ) -> Result<CgroupRoot, String> {
        let mount = mounts
            .iter()
            .find(|m| m.v2)
            .ok_or("no cgroup hierarchy is mounted (neither a v1 memory controller nor cgroup2)")?;
        let own = membership
            .iter()
            .find(|(controllers, _)| controllers.is_empty())
            .map(|(_, path)| path.as_str())
            .ok_or("/proc/self/cgroup has no cgroup2 entry")?;
        let own_directory: PathBuf = parent_directory(&mount.mount_point, &mount.root, own, ".")
            .components()
            .collect();
        let available =
            fs::read_to_string(own_directory.join("cgroup.controllers")).map_err(|e| {
                format!(
                    "reading {}/cgroup.controllers: {e}",
                    own_directory.display()
                )
            })?;
        let wanted: Vec<&str> = ["memory", "cpu", "pids"]
            .into_iter()
            .filter(|c| available.split_whitespace().any(|a| a == *c))
            .collect();
        if !wanted.contains(&"memory") {
            return Err(format!(
                "the memory controller is not available in {} (cgroup.controllers: {:?}); \
                 delegate it to the executor (systemd: Delegate=yes)",
                own_directory.display(),
                available.trim()
            ));
        }
        let enable: String = wanted.iter().map(|c| format!("+{c} ")).collect();
        let directory = parent_directory(&mount.mount_point, &mount.root, own, parent);
        let enabled = |directory: &Path| {
            fs::read_to_string(directory.join("cgroup.subtree_control")).is_ok_and(|on| {
                wanted
                    .iter()
                    .all(|c| on.split_whitespace().any(|o| o == *c))
            })
        };
        // Done already, by this process as root before it switched to a
        // user of its own (see `give_to`), who may not write it.
        if enabled(&own_directory) && enabled(&directory) {
            return Ok(CgroupRoot {
                version: Version::V2,
                parents: vec![(Controller::Unified, directory)],
            });
        }
        if !parent.starts_with('/') {
            // "No internal processes": a cgroup with processes cannot give
            // controllers to its children, so the executor moves itself
            // into a leaf of its own first.
            if let Err(error) = write_file(&own_directory.join("cgroup.subtree_control"), &enable) {
                if error.raw_os_error() != Some(libc::EBUSY) {
                    return Err(format!(
                        "enabling {enable}in {}: {error}",
                        own_directory.display()
                    ));
                }
                let leaf = own_directory.join("kiln-worker");
                fs::create_dir_all(&leaf)
                    .map_err(|e| format!("creating {}: {e}", leaf.display()))?;
                write_file(&leaf.join("cgroup.procs"), &std::process::id().to_string())
                    .map_err(|e| format!("moving the executor into {}: {e}", leaf.display()))?;
                write_file(&own_directory.join("cgroup.subtree_control"), &enable).map_err(|e| {
                    format!("enabling {enable}in {} (other processes share the executor's cgroup?): {e}", own_directory.display())
                })?;
            }
        }
        fs::create_dir_all(&directory)
            .map_err(|e| format!("creating cgroup {}: {e}", directory.display()))?;
        write_file(&directory.join("cgroup.subtree_control"), &enable)
            .map_err(|e| format!("enabling {enable}in {}: {e}", directory.display()))?;
        Ok(CgroupRoot {
            version: Version::V2,
            parents: vec![(Controller::Unified, directory)],
        })
    }

    /// Hands the parents to user `uid` (group `gid`), as cgroup delegation
    /// does: each directory and the files that add processes and enable
    /// controllers below it. The user then makes, limits and removes the
    /// actions' cgroups in them; a new cgroup's files belong to whoever
    /// made it. For a root process that switches to that user next.
    pub fn give_to(&self, uid: u32, gid: u32) -> io::Result<()> {
        let owner = (
            Some(rustix::process::Uid::from_raw(uid)),
            Some(rustix::process::Gid::from_raw(gid)),
        );
        for (_, directory) in &self.parents {
            rustix::fs::chown(directory, owner.0, owner.1)
                .map_err(|e| context(e.into(), "giving away", directory))?;
            for file in [
                "cgroup.procs",
                "tasks",
                "cgroup.subtree_control",
                "cgroup.threads",
            ] {
                let path = directory.join(file);
                match rustix::fs::chown(&path, owner.0, owner.1) {
                    Ok(()) | Err(rustix::io::Errno::NOENT) => {}
                    Err(e) => return Err(context(e.into(), "giving away", &path)),
                }
            }
        }
        Ok(())
    }

    /// The same root with one hierarchy only (v1: the pids controller if
    /// mounted, else the first), for cgroups that only track and kill an
    /// action's processes: each v1 controller costs a `mkdir` and an
    /// `rmdir` per action, the memory one the most.
    pub fn tracking_only(&self) -> CgroupRoot {
        let keep = self
            .parents
            .iter()
            .find(|(controller, _)| *controller == Controller::Pids)
            .or(self.parents.first())
            .cloned();
        CgroupRoot {
            version: self.version,
            parents: keep.into_iter().collect(),
        }
    }

    /// Removes cgroups left by executors that are gone (named
    /// `<pid>-<n>` after the executor's pid), killing what is inside.
    pub fn remove_stale(&self) {
        for (controller, parent) in &self.parents {
            let Ok(entries) = fs::read_dir(parent) else {
                continue;
            };
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                // Only names this crate's Sandbox gives: `<pid>-<n>`.
                let Some(pid) = name
                    .split_once('-')
                    .filter(|(pid, n)| n.parse::<u64>().is_ok() && pid.parse::<u32>().is_ok())
                    .map(|(pid, _)| pid)
                else {
                    continue;
                };
                if Path::new(&format!("/proc/{pid}")).exists() || !entry.path().is_dir() {
                    continue;
                }
                let stale = Cgroup {
                    version: self.version,
                    directories: vec![(*controller, entry.path())],
                    join: Vec::new(),
                };
                drop(stale);
            }
        }
    }

    /// The hierarchy in use.
    pub fn version(&self) -> Version {
        self.version
    }

    /// The parent directories action cgroups are created in.
    pub fn parents(&self) -> &[(Controller, PathBuf)] {
        &self.parents
    }

    /// The limits this host cannot enforce, by name (v1 controllers not
    /// mounted). Empty on v2, where detection requires all of them.
    pub fn missing(&self) -> Vec<&'static str> {
        if self.version == Version::V2 {
            return Vec::new();
        }
        [Controller::Memory, Controller::Cpu, Controller::Pids]
            .into_iter()
            .filter(|c| !self.parents.iter().any(|(p, _)| p == c))
            .map(Controller::v1_name)
            .collect()
    }

    /// Creates the cgroup `name` under the parent(s) and writes `limits`
    /// into it. The returned guard removes it when dropped.
    pub fn create(&self, name: &str, limits: &Limits) -> io::Result<Cgroup> {
        let mut cgroup = Cgroup {
            version: self.version,
            directories: Vec::with_capacity(self.parents.len()),
            join: Vec::with_capacity(self.parents.len()),
        };
        for (controller, parent) in &self.parents {
            let directory = parent.join(name);
            fs::create_dir(&directory).map_err(|e| context(e, "creating", &directory))?;
            cgroup.directories.push((*controller, directory));
        }
        for write in limit_writes(self.version, limits) {
            let Some(directory) = cgroup.directory(write.controller) else {
                continue;
            };
            let path = directory.join(write.file);
            match write_file(&path, &write.value) {
                Err(error) if write.optional && error.kind() == io::ErrorKind::NotFound => {}
                result => result.map_err(|e| context(e, "writing", &path))?,
            }
        }
        for (_, directory) in &cgroup.directories {
            let path = directory.join(join_file(self.version));
            let file = OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(|e| context(e, "opening", &path))?;
            cgroup.join.push(file);
        }
        Ok(cgroup)
    }
}

/// A fresh name for an action cgroup, `<executor pid>-<n>`: the shape
/// [`CgroupRoot::remove_stale`] recognises. One counter per process,
/// shared by every backend that makes action cgroups.
pub fn action_cgroup_name() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// The file a forked child writes `0` to, to join a cgroup itself. On v1,
/// `tasks` moves just the calling thread (the child has one), which spares
/// the global lock a `cgroup.procs` write takes and its RCU grace period:
/// milliseconds per action. v2 has only `cgroup.procs` for this.
fn join_file(version: Version) -> &'static str {
    match version {
        Version::V1 => "tasks",
        Version::V2 => "cgroup.procs",
    }
}

fn context(error: io::Error, doing: &str, path: &Path) -> io::Error {
    io::Error::new(error.kind(), format!("{doing} {}: {error}", path.display()))
}

fn write_file(path: &Path, value: &str) -> io::Result<()> {
    OpenOptions::new()
        .write(true)
        .open(path)?
        .write_all(value.as_bytes())
}

/// One action's cgroup (a leaf in each v1 controller, or one v2 leaf).
/// Dropping it kills whatever is still inside and removes it.
#[derive(Debug)]
pub struct Cgroup {
    version: Version,
    directories: Vec<(Controller, PathBuf)>,
    /// The [`join_file`] of each directory, opened up front so a child can
    /// join between fork and exec without opening files.
    join: Vec<File>,
}

impl Cgroup {
    fn directory(&self, controller: Controller) -> Option<&Path> {
        self.directories
            .iter()
            .find(|(c, _)| *c == controller)
            .map(|(_, d)| d.as_path())
    }

    /// The directories of this cgroup (one per v1 controller).
    pub fn directories(&self) -> impl Iterator<Item = &Path> {
        self.directories.iter().map(|(_, d)| d.as_path())
    }

    /// Descriptors a freshly forked, single-threaded child writes `0` to
    /// (one `write` each) to join this cgroup before it execs.
    pub fn join_fds(&self) -> Vec<RawFd> {
        self.join.iter().map(AsRawFd::as_raw_fd).collect()
    }

    /// Moves process `pid` (all its threads) into this cgroup.
    pub fn add_pid(&self, pid: u32) -> io::Result<()> {
        for (_, directory) in &self.directories {
            write_file(&directory.join("cgroup.procs"), &pid.to_string())
                .map_err(|e| context(e, &format!("adding {pid} to"), directory))?;
        }
        Ok(())
    }

    /// The directory whose `cgroup.procs` lists its processes: the pids
    /// controller's, else the first (all list the same on v1).
    fn listing_directory(&self) -> Option<&Path> {
        self.directories
            .iter()
            .find(|(c, _)| *c == Controller::Pids)
            .or(self.directories.first())
            .map(|(_, directory)| directory.as_path())
    }

    /// The processes in this cgroup now.
    pub fn pids(&self) -> io::Result<Vec<u32>> {
        let Some(directory) = self.listing_directory() else {
            return Ok(Vec::new());
        };
        let text = fs::read_to_string(directory.join("cgroup.procs"))?;
        Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
    }

    fn memory_file(&self, v1: &str, v2: &str) -> Option<String> {
        let (directory, file) = match self.version {
            Version::V1 => (self.directory(Controller::Memory)?, v1),
            Version::V2 => (self.directory(Controller::Unified)?, v2),
        };
        fs::read_to_string(directory.join(file)).ok()
    }

    /// How many processes the kernel's OOM killer took in this cgroup.
    pub fn oom_kills(&self) -> u64 {
        self.memory_file("memory.oom_control", "memory.events")
            .and_then(|text| keyed_value(&text, "oom_kill"))
            .unwrap_or(0)
    }

    /// Whether the memory limit was hit hard enough for the OOM killer.
    pub fn memory_exceeded(&self) -> bool {
        self.oom_kills() > 0
    }

    /// The most memory the cgroup used, where the kernel records it (v1
    /// always; v2 from Linux 5.19).
    pub fn peak_memory_bytes(&self) -> Option<u64> {
        self.memory_file("memory.max_usage_in_bytes", "memory.peak")?
            .trim()
            .parse()
            .ok()
    }

    /// SIGKILLs every process in the cgroup and waits (briefly) until none
    /// is left. A fork bomb is bounded by `pids.max`, so this converges.
    /// v2 writes `cgroup.kill` (the executor owns that file: no signal of
    /// its own); v1, which has none, has the launchers kill each process
    /// listed, until none is (its processes run as other users, whom the
    /// executor, keeping no CAP_KILL, cannot signal).
    pub fn kill_all(&self) {
        let killed_whole = self.version == Version::V2
            && self
                .directory(Controller::Unified)
                .is_some_and(|directory| write_file(&directory.join("cgroup.kill"), "1").is_ok());
        for _ in 0..1000 {
            match self.pids() {
                Ok(pids) if !pids.is_empty() => {}
                _ => return,
            }
            if !killed_whole {
                if let Some(directory) = self.listing_directory() {
                    if let Err(error) = crate::launcher::kill_cgroup(directory) {
                        tracing::warn!(cgroup = %directory.display(), %error, "killing what is left in a cgroup");
                        return;
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        tracing::warn!(cgroup = ?self.directories, "processes survived SIGKILL in a cgroup");
    }

    /// [`Cgroup::remove`] on a blocking thread (it polls while processes
    /// die), logging a failure.
    pub async fn remove_off_thread(self) {
        let removed = tokio::task::spawn_blocking(move || self.remove()).await;
        if let Ok(Err(error)) = removed {
            tracing::warn!(%error, "removing an action cgroup");
        }
    }

    /// Kills what is left and removes the cgroup now, reporting failure
    /// (dropping does the same silently).
    pub fn remove(mut self) -> io::Result<()> {
        self.remove_directories()
    }

    fn remove_directories(&mut self) -> io::Result<()> {
        if self.directories.is_empty() {
            return Ok(());
        }
        self.kill_all();
        self.join.clear();
        let mut result = Ok(());
        for (_, directory) in self.directories.drain(..) {
            // A killed process leaves its cgroup only once reaped: retry
            // EBUSY for a moment.
            let mut attempt = 0;
            loop {
                match fs::remove_dir(&directory) {
                    Ok(()) => break,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) && attempt < 200 => {
                        attempt += 1;
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    Err(e) => {
                        result = Err(context(e, "removing", &directory));
                        break;
                    }
                }
            }
        }
        result
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        if let Err(error) = self.remove_directories() {
            tracing::warn!(%error, "leaking a cgroup");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(memory: Option<u64>, cpu: Option<u64>, pids: Option<u64>) -> Limits {
        Limits {
            timeout: Duration::from_secs(1),
            grace: Duration::from_secs(1),
            memory_bytes: memory,
            cpu_millis: cpu,
            pids_max: pids,
        }
    }

    fn pairs(writes: &[LimitWrite]) -> Vec<(&str, &str)> {
        writes.iter().map(|w| (w.file, w.value.as_str())).collect()
    }

    #[test]
    fn v2_limits_are_written_as_the_unified_files_expect() {
        let writes = limit_writes(Version::V2, &limits(Some(64 << 20), Some(1500), Some(64)));
        assert_eq!(
            pairs(&writes),
            [
                ("memory.max", "67108864"),
                ("memory.swap.max", "0"),
                ("memory.oom.group", "1"),
                ("cpu.max", "150000 100000"),
                ("pids.max", "64"),
            ]
        );
        assert!(writes.iter().all(|w| w.controller == Controller::Unified));
        assert!(limit_writes(Version::V2, &limits(None, None, None)).is_empty());
        // Tiny CPU reservations still get the smallest quota the kernel takes.
        assert_eq!(
            pairs(&limit_writes(Version::V2, &limits(None, Some(1), None))),
            [("cpu.max", "1000 100000")]
        );
    }

    #[test]
    fn v1_limits_go_to_their_controllers_in_order() {
        let writes = limit_writes(Version::V1, &limits(Some(1 << 30), Some(500), Some(10)));
        assert_eq!(
            pairs(&writes),
            [
                ("memory.limit_in_bytes", "1073741824"),
                ("memory.memsw.limit_in_bytes", "1073741824"),
                ("cpu.cfs_period_us", "100000"),
                ("cpu.cfs_quota_us", "50000"),
                ("pids.max", "10"),
            ]
        );
        let controllers: Vec<_> = writes.iter().map(|w| w.controller).collect();
        assert_eq!(
            controllers,
            [
                Controller::Memory,
                Controller::Memory,
                Controller::Cpu,
                Controller::Cpu,
                Controller::Pids
            ]
        );
    }

    #[test]
    fn oom_kills_are_read_from_either_format() {
        let v2_events = "low 0\nhigh 0\nmax 17\noom 2\noom_kill 1\noom_group_kill 1\n";
        assert_eq!(keyed_value(v2_events, "oom_kill"), Some(1));
        assert_eq!(keyed_value(v2_events, "oom"), Some(2));
        let v1_control = "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n";
        assert_eq!(keyed_value(v1_control, "oom_kill"), Some(3));
        assert_eq!(keyed_value("under_oom 0\n", "oom_kill"), None);
    }

    /// A directory laid out like a cgroup2 mount, with the executor in
    /// `/system.slice/kiln.service`.
    fn fake_v2(controllers: &str) -> (tempfile::TempDir, Vec<CgroupMount>, Membership) {
        let root = tempfile::tempdir().unwrap();
        let own = root.path().join("system.slice/kiln.service");
        fs::create_dir_all(own.join("kiln")).unwrap();
        fs::write(own.join("cgroup.controllers"), controllers).unwrap();
        fs::write(own.join("cgroup.subtree_control"), "").unwrap();
        fs::write(own.join("kiln/cgroup.subtree_control"), "").unwrap();
        let mounts = vec![CgroupMount {
            root: "/".into(),
            mount_point: root.path().to_path_buf(),
            v2: true,
            controllers: vec!["rw".into()],
        }];
        let membership = vec![(vec![], "/system.slice/kiln.service".to_string())];
        (root, mounts, membership)
    }

    #[test]
    fn v2_parents_get_the_controllers_enabled() {
        let (root, mounts, membership) = fake_v2("cpuset cpu io memory pids\n");
        let found = CgroupRoot::detect_v2(&mounts, &membership, "kiln").unwrap();
        let own = root.path().join("system.slice/kiln.service");
        assert_eq!(found.version(), Version::V2);
        assert_eq!(found.parents(), [(Controller::Unified, own.join("kiln"))]);
        assert!(found.missing().is_empty());
        for file in ["cgroup.subtree_control", "kiln/cgroup.subtree_control"] {
            assert_eq!(
                fs::read_to_string(own.join(file)).unwrap().trim(),
                "+memory +cpu +pids"
            );
        }
    }

    #[test]
    fn v2_without_a_delegated_memory_controller_says_what_to_do() {
        let (_root, mounts, membership) = fake_v2("cpu pids\n");
        let reason = CgroupRoot::detect_v2(&mounts, &membership, "kiln").unwrap_err();
        assert!(reason.contains("memory controller"), "{reason}");
        assert!(reason.contains("Delegate=yes"), "{reason}");
    }

    #[test]
    fn hierarchies_are_found_from_mountinfo_and_proc_cgroup() {
        let mountinfo = "\
25 30 0:23 / /sys/fs/cgroup rw,nosuid - tmpfs tmpfs rw,mode=755
26 25 0:24 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw
28 25 0:26 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
29 25 0:27 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu
30 25 0:28 /nested /sys/fs/cgroup/pids\\040x rw - cgroup cgroup rw,pids
";
        let mounts = parse_mountinfo(mountinfo);
        assert_eq!(mounts.len(), 4);
        assert!(mounts[0].v2);
        assert_eq!(
            mounts[3].mount_point,
            PathBuf::from("/sys/fs/cgroup/pids x")
        );
        assert_eq!(mounts[3].root, "/nested");
        let proc_cgroup = "8:pids:/nested/a\n4:memory:/process_api/abc\n1:cpu:/\n0::/\n";
        let membership = parse_proc_cgroup(proc_cgroup);
        assert_eq!(
            membership[1],
            (vec!["memory".to_string()], "/process_api/abc".to_string())
        );
        assert_eq!(membership[3], (vec![], "/".to_string()));
        assert_eq!(
            parent_directory(
                Path::new("/sys/fs/cgroup/memory"),
                "/",
                "/process_api/abc",
                "kiln"
            ),
            PathBuf::from("/sys/fs/cgroup/memory/process_api/abc/kiln")
        );
        assert_eq!(
            parent_directory(
                Path::new("/sys/fs/cgroup/pids"),
                "/nested",
                "/nested/a",
                "kiln"
            ),
            PathBuf::from("/sys/fs/cgroup/pids/a/kiln")
        );
        assert_eq!(
            parent_directory(
                Path::new("/sys/fs/cgroup"),
                "/",
                "/system.slice/kiln.service",
                "/kiln.slice/actions"
            ),
            PathBuf::from("/sys/fs/cgroup/kiln.slice/actions")
        );
    }
}
