//! Warm runners (`recycle-runner=true`): an action's directory, kept after
//! an action that finished cleanly and handed to the next action with the
//! same runner key ([`kiln_platform::Platform::runner_key`]).
//!
//! What a warm runner keeps, by isolation type:
//! - `none`: its workspace, with `preserve-workspace=true`;
//! - `sandbox`: that, and a private writable `/tmp` (the runner's `tmp`
//!   directory, bind-mounted over the sandbox's /tmp);
//! - `docker`, `podman`: that, and a container with Kiln's agent in it
//!   ([`WarmRunner::resident`], see `kiln_container::warm`), whose
//!   writable layer and processes outlive each action.
//!
//! No process of an action outlives it under `none` or `sandbox`: `sandbox` has its own
//! PID namespace, and `none` actions run in a cgroup that is emptied. The
//! one exception is asked for: a `none` runner with `persistentWorkerKey`
//! keeps its persistent worker ([`crate::persistent`]) alive, in a cgroup
//! of its own, for as long as the runner is kept; a runner that is
//! discarded kills it. Its workspace directory itself is kept (only its
//! contents are emptied), so the worker's working directory stays valid.
//!
//! Between two actions ([`reset_for_reuse`], in the background once the
//! result went out: the runner is offered at once, and whoever takes or
//! retires it waits for the reset first, [`WarmRunner::reset`]): its
//! captured stdout/stderr and an overlay's lower layer are emptied;
//! without `preserve-workspace` the workspace is emptied too. With it,
//! the previous action's declared outputs, every file of its input tree,
//! and the files matching `clean-workspace-inputs` are deleted, and the
//! next action's inputs are laid over what is left
//! ([`crate::inputs::Placement::over_existing`]). Every path is opened
//! beneath the runner's directory without following symlinks, so an action
//! that replaced a directory with a link cannot make the executor delete
//! anything outside it.
//!
//! A runner whose action failed, timed out, was OOM-killed or cancelled, or
//! left [`DO_NOT_RECYCLE`] in its workspace is not kept. The pool holds at
//! most [`RunnerLimits::max_warm`] runners and
//! [`RunnerLimits::memory_budget`] bytes of their memory (least recently
//! used go first),
//! each for at most [`RunnerLimits::idle_timeout`] and
//! [`RunnerLimits::max_uses`] actions. A warm runner takes no capacity
//! while it waits: it is a directory, and maybe a container whose
//! processes are an action's leftovers.

use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use kiln_platform::Platform;
pub use kiln_platform::RunnerKey;
use rustix::fs::{Mode, OFlags, ResolveFlags};

use crate::isolation::Resident;
use crate::persistent::{WorkerProcess, WORKER_STDERR};
use crate::scratch::Scratch;
use crate::users::ActionUser;

/// An action that leaves this file at its workspace's root asks for its
/// runner not to be reused.
pub const DO_NOT_RECYCLE: &str = ".KILN_DO_NOT_RECYCLE";

/// The runner's own scratch directory (the sandbox's /tmp), in its action
/// directory.
pub const RUNNER_TMP: &str = "tmp";

/// How many warm runners an executor keeps, and for how long.
#[derive(Debug, Clone, Copy)]
pub struct RunnerLimits {
    /// Most warm runners kept at once; the least recently used goes first.
    pub max_warm: usize,
    /// A warm runner unused this long is discarded.
    pub idle_timeout: Duration,
    /// A runner is discarded after this many actions.
    pub max_uses: u32,
    /// Most memory the waiting runners may hold together
    /// ([`WarmRunner::memory_bytes`]); the least recently used go first.
    /// None: no budget.
    pub memory_budget: Option<u64>,
}

impl Default for RunnerLimits {
    fn default() -> RunnerLimits {
        RunnerLimits {
            max_warm: 32,
            idle_timeout: Duration::from_secs(600),
            max_uses: 1000,
            memory_budget: None,
        }
    }
}

/// A runner waiting for its next action.
#[derive(Debug)]
pub struct WarmRunner {
    pub key: RunnerKey,
    /// Its action directory.
    pub dir: PathBuf,
    /// Actions it has run.
    pub uses: u32,
    /// Its persistent worker (`persistentWorkerKey`), alive between
    /// actions; killed when the runner is dropped.
    pub worker: Option<WorkerProcess>,
    /// What its backend keeps running in it between actions (a container
    /// and its agent); ended when the runner is dropped.
    pub resident: Option<Box<dyn Resident>>,
    idle_since: Instant,
    /// Its memory when it was put back (a waiting container is frozen,
    /// so it holds no more later).
    held_bytes: u64,
    /// Its reset for the next action ([`reset_for_reuse`]), running in the
    /// background after the last action's result went out. Whoever takes
    /// the runner, or retires it, waits for it first: a runner whose reset
    /// failed is discarded.
    pub reset: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
    /// Whom its actions run as: its own uid while it is kept, given back
    /// when it is dropped (after its directory is recycled).
    pub user: ActionUser,
}

impl WarmRunner {
    /// The memory it holds while it waits: its resident's (a container's
    /// processes). A directory runner holds none.
    pub fn memory_bytes(&self) -> u64 {
        self.resident.as_ref().map_or(0, |r| r.memory_bytes())
    }

    /// Waits for its reset ([`WarmRunner::reset`]): itself, ready for its
    /// next action, or with why it is not (to be retired).
    pub async fn ready(mut self) -> Result<WarmRunner, (WarmRunner, String)> {
        let Some(reset) = self.reset.take() else {
            return Ok(self);
        };
        match reset.await {
            Ok(Ok(())) => Ok(self),
            Ok(Err(e)) => Err((self, e.to_string())),
            Err(e) => Err((self, e.to_string())),
        }
    }

    pub fn new(key: RunnerKey, dir: PathBuf, uses: u32) -> WarmRunner {
        WarmRunner {
            key,
            dir,
            uses,
            worker: None,
            resident: None,
            idle_since: Instant::now(),
            held_bytes: 0,
            reset: None,
            user: ActionUser::own(),
        }
    }
}

/// The warm runners of one executor.
pub struct RunnerPool {
    limits: RunnerLimits,
    /// Oldest first.
    warm: Mutex<Vec<WarmRunner>>,
}

impl RunnerPool {
    pub fn new(limits: RunnerLimits) -> RunnerPool {
        RunnerPool {
            limits,
            warm: Mutex::default(),
        }
    }

    /// The most recently used warm runner with `key`, if any; and the
    /// runners that expired meanwhile (to be retired).
    pub fn take(&self, key: &RunnerKey) -> (Option<WarmRunner>, Vec<WarmRunner>) {
        let mut warm = self.warm.lock().expect("runner pool lock");
        let expired = self.expire(&mut warm);
        let found = warm
            .iter()
            .rposition(|runner| runner.key == *key)
            .map(|at| warm.remove(at));
        (found, expired)
    }

    /// Every warm runner, taken out of the pool (the executor is stopping).
    pub fn drain(&self) -> Vec<WarmRunner> {
        std::mem::take(&mut *self.warm.lock().expect("runner pool lock"))
    }

    /// Offers `runner` to later actions. Returns the runners it pushed out
    /// (over the count, idle too long, or itself when it has run its last
    /// action), to be retired.
    pub fn put(&self, mut runner: WarmRunner) -> Vec<WarmRunner> {
        if runner.uses >= self.limits.max_uses || self.limits.max_warm == 0 {
            return vec![runner];
        }
        if let Some(budget) = self.limits.memory_budget {
            // Read once, outside the lock. One that alone holds more than
            // the budget is not kept, and pushes no other out.
            runner.held_bytes = runner.memory_bytes();
            if runner.held_bytes > budget {
                return vec![runner];
            }
        }
        let mut warm = self.warm.lock().expect("runner pool lock");
        warm.push(runner);
        let mut evicted = self.expire(&mut warm);
        let over = warm.len().saturating_sub(self.limits.max_warm);
        evicted.extend(warm.drain(..over));
        if let Some(budget) = self.limits.memory_budget {
            let mut total: u64 = warm.iter().map(|runner| runner.held_bytes).sum();
            let mut over = 0;
            while total > budget && over < warm.len() {
                total -= warm[over].held_bytes;
                over += 1;
            }
            evicted.extend(warm.drain(..over));
        }
        evicted
    }

    /// Removes every runner idle longer than the idle timeout.
    pub fn expire_idle(&self) -> Vec<WarmRunner> {
        let mut warm = self.warm.lock().expect("runner pool lock");
        self.expire(&mut warm)
    }

    /// The distinct keys ([`RunnerKey::short`]) of the warm runners now.
    pub fn keys(&self) -> Vec<String> {
        let warm = self.warm.lock().expect("runner pool lock");
        let mut keys: Vec<String> = warm.iter().map(|r| r.key.short().to_string()).collect();
        keys.sort_unstable();
        keys.dedup();
        keys
    }

    /// Warm runners now.
    pub fn len(&self) -> usize {
        self.warm.lock().expect("runner pool lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn expire(&self, warm: &mut Vec<WarmRunner>) -> Vec<WarmRunner> {
        let timeout = self.limits.idle_timeout;
        let (kept, expired) = std::mem::take(warm)
            .into_iter()
            .partition(|runner| runner.idle_since.elapsed() < timeout);
        *warm = kept;
        expired
    }
}

/// What a runner kept with `preserve-workspace` must lose before its next
/// action.
#[derive(Debug, Default)]
pub struct Leftovers {
    /// The action directory's entry holding what the action wrote: its
    /// workspace, or an overlay's upper layer.
    pub written: &'static str,
    /// The previous action's declared outputs and input files, relative to
    /// `written`.
    pub paths: Vec<PathBuf>,
    /// `clean-workspace-inputs`: files matching them are deleted.
    pub clean: Option<globset::GlobSet>,
}

/// Makes a kept runner's directory ready for its next action (see the
/// module comment); `leftovers` with `preserve-workspace`, else None.
/// Blocking.
pub fn reset_for_reuse(
    scratch: &Scratch,
    action_dir: &Path,
    leftovers: Option<&Leftovers>,
) -> std::io::Result<()> {
    let Some(leftovers) = leftovers else {
        return scratch.empty_action_dir(action_dir, &[RUNNER_TMP, WORKER_STDERR]);
    };
    scratch.empty_action_dir(action_dir, &[RUNNER_TMP, WORKER_STDERR, leftovers.written])?;
    let written = action_dir.join(leftovers.written);
    // Its directories are the action user's: the executor takes them
    // back to delete in them, and gives them again before the next
    // action (`Worker::stage`).
    scratch.hand_over_directories(&written, scratch.owner())?;
    let root = rustix::fs::open(
        &written,
        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
        Mode::empty(),
    )?;
    for path in &leftovers.paths {
        remove_beneath(&root, path)?;
    }
    if let Some(clean) = &leftovers.clean {
        remove_matching(&written, Path::new(""), clean)?;
    }
    Ok(())
}

/// Deletes `relative` (a file, symlink or whole directory) beneath `root`,
/// resolving its parent without following any symlink; a path that is not
/// there, or whose parent is not a real directory beneath `root`, is left.
/// Directories of the executor's closed to their owner on the way (an
/// action that closed them, taken back with their mode) are opened to it
/// first: it holds no capability to search past a mode.
pub fn remove_beneath(root: &impl AsFd, relative: &Path) -> std::io::Result<()> {
    let (Some(parent), Some(name)) = (relative.parent(), relative.file_name()) else {
        return Ok(());
    };
    let parent = match open_dir_as_owner(root, parent) {
        Ok(fd) => fd,
        // Gone, not a directory, reached only through a symlink, or closed
        // by someone else.
        Err(_) => return Ok(()),
    };
    match rustix::fs::unlinkat(&parent, name, rustix::fs::AtFlags::empty()) {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::NOENT) => Ok(()),
        Err(rustix::io::Errno::ISDIR) => {
            // The directory, by its descriptor's path: std's recursive
            // removal never follows a symlink inside it.
            use std::os::fd::AsRawFd;
            let through_fd = Path::new("/proc/self/fd")
                .join(parent.as_raw_fd().to_string())
                .join(name);
            let removed = match std::fs::remove_dir_all(&through_fd) {
                Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                    crate::scratch::open_to_owner(&through_fd, 0)?;
                    std::fs::remove_dir_all(&through_fd)
                }
                other => other,
            };
            match removed {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            }
        }
        Err(e) => Err(e.into()),
    }
}

/// The directory `relative` beneath `root`, opened one component at a time
/// with no symlink followed; each directory on the way that the executor
/// owns but cannot read, write or search is given those bits first.
fn open_dir_as_owner(root: &impl AsFd, relative: &Path) -> std::io::Result<OwnedFd> {
    use std::os::fd::AsRawFd;
    let beneath = ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
    let open = |dir: &dyn AsFd, name: &Path, flags: OFlags| {
        rustix::fs::openat2(dir, name, flags | OFlags::CLOEXEC, Mode::empty(), beneath)
    };
    let mut dir = open(root, Path::new("."), OFlags::DIRECTORY | OFlags::RDONLY)?;
    let own = rustix::process::geteuid().as_raw();
    for component in relative.components() {
        let std::path::Component::Normal(name) = component else {
            continue;
        };
        let name = Path::new(name);
        let found = open(&dir, name, OFlags::DIRECTORY | OFlags::PATH)?;
        let stat = rustix::fs::fstat(&found)?;
        if stat.st_uid == own && stat.st_mode & 0o700 != 0o700 {
            // By the descriptor: the directory just found, not a name.
            let through_fd = Path::new("/proc/self/fd").join(found.as_raw_fd().to_string());
            std::fs::set_permissions(
                through_fd,
                std::fs::Permissions::from_mode((stat.st_mode | 0o700) & 0o7777),
            )?;
        }
        dir = open(&dir, name, OFlags::DIRECTORY | OFlags::RDONLY)?;
    }
    Ok(dir)
}

/// Deletes the files and symlinks under `dir` whose path relative to the
/// workspace (`relative`, then their name) matches `clean`. Descends only
/// into real directories.
fn remove_matching(dir: &Path, relative: &Path, clean: &globset::GlobSet) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir.join(relative))? {
        let entry = entry?;
        let path = relative.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            remove_matching(dir, &path, clean)?;
        } else if clean.is_match(&path) {
            std::fs::remove_file(entry.path())?;
        }
    }
    Ok(())
}

/// The `clean-workspace-inputs` globs as one matcher (they were checked
/// when the platform was parsed); None without any.
pub fn clean_globs(platform: &Platform) -> Option<globset::GlobSet> {
    if platform.clean_workspace_inputs.is_empty() {
        return None;
    }
    let mut set = globset::GlobSetBuilder::new();
    for pattern in &platform.clean_workspace_inputs {
        if let Ok(glob) = globset::GlobBuilder::new(pattern)
            .literal_separator(true)
            .build()
        {
            set.add(glob);
        }
    }
    set.build().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str) -> RunnerKey {
        let action = [("runner-recycling-key".to_string(), name.to_string())];
        Platform::parse(&kiln_platform::PropertySources {
            action: &action,
            ..Default::default()
        })
        .unwrap()
        .runner_key_of("test", "")
    }

    /// The directories of `runners`.
    fn dirs(runners: Vec<WarmRunner>) -> Vec<PathBuf> {
        runners.into_iter().map(|runner| runner.dir).collect()
    }

    /// Runs `f` on a thread of its own that holds none of the capabilities
    /// a root executor drops to read, search or change past a mode: an
    /// owner like any other, as the executor is.
    fn as_the_executor<T: Send>(f: impl FnOnce() -> T + Send) -> T {
        use rustix::thread::{CapabilitySet, CapabilitySets};
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let past_modes = CapabilitySet::DAC_OVERRIDE
                        | CapabilitySet::DAC_READ_SEARCH
                        | CapabilitySet::FOWNER;
                    let current = rustix::thread::capabilities(None).unwrap();
                    rustix::thread::set_capabilities(
                        None,
                        CapabilitySets {
                            effective: current.effective - past_modes,
                            permitted: current.permitted - past_modes,
                            inheritable: CapabilitySet::empty(),
                        },
                    )
                    .unwrap();
                    f()
                })
                .join()
                .unwrap()
        })
    }

    /// A preserved workspace's previous outputs go even from under
    /// directories the action closed to everyone, the executor included
    /// once it took them back: it opens its own directories on the way.
    #[test]
    fn previous_outputs_under_closed_directories_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("workspace");
        std::fs::create_dir_all(root.join("out/closed/kept")).unwrap();
        std::fs::create_dir_all(root.join("out/tree/sub")).unwrap();
        std::fs::write(root.join("out/closed/result.txt"), "old").unwrap();
        std::fs::write(root.join("out/closed/kept/input.txt"), "in").unwrap();
        std::fs::write(root.join("out/tree/sub/deep.txt"), "old").unwrap();
        let close = |path: &str| {
            std::fs::set_permissions(root.join(path), std::fs::Permissions::from_mode(0o000))
                .unwrap()
        };
        close("out/tree/sub");
        close("out/closed");
        let fd = rustix::fs::open(
            &root,
            OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .unwrap();
        as_the_executor(|| {
            assert!(
                std::fs::symlink_metadata(root.join("out/closed/result.txt")).is_err(),
                "this thread still searches past a mode"
            );
            remove_beneath(&fd, Path::new("out/closed/result.txt")).unwrap();
            remove_beneath(&fd, Path::new("out/tree")).unwrap();
        });
        assert!(!root.join("out/closed/result.txt").exists());
        assert!(!root.join("out/tree").exists());
        assert_eq!(
            std::fs::read_to_string(root.join("out/closed/kept/input.txt")).unwrap(),
            "in",
            "only the outputs go"
        );
    }

    #[test]
    fn the_pool_hands_out_runners_by_key_and_evicts_the_least_recently_used() {
        let pool = RunnerPool::new(RunnerLimits {
            max_warm: 2,
            ..Default::default()
        });
        assert!(pool
            .put(WarmRunner::new(key("a"), "/a".into(), 1))
            .is_empty());
        assert!(pool
            .put(WarmRunner::new(key("b"), "/b".into(), 1))
            .is_empty());
        assert_eq!(
            dirs(pool.put(WarmRunner::new(key("c"), "/c".into(), 1))),
            vec![PathBuf::from("/a")]
        );
        assert!(pool.take(&key("a")).0.is_none());
        let (b, _) = pool.take(&key("b"));
        assert_eq!(b.unwrap().dir, PathBuf::from("/b"));
        assert!(pool.take(&key("b")).0.is_none(), "a runner is leased once");
        assert_eq!(pool.len(), 1);
    }

    /// A resident that holds `0` bytes and does nothing else.
    #[derive(Debug)]
    struct Holding(u64);

    #[async_trait::async_trait]
    impl Resident for Holding {
        async fn run(
            &mut self,
            _: &crate::CommandSpec,
            _: &crate::Limits,
            _: &crate::CancellationToken,
        ) -> Result<crate::ProcessOutcome, crate::RunError> {
            unreachable!("never run")
        }

        async fn start_worker(
            &mut self,
            _: &crate::CommandSpec,
            _: &crate::persistent::WorkerStart,
        ) -> Result<WorkerProcess, crate::RunError> {
            unreachable!("never run")
        }

        fn memory_bytes(&self) -> u64 {
            self.0
        }
    }

    fn holding(name: &str, bytes: u64) -> WarmRunner {
        let mut runner = WarmRunner::new(key(name), format!("/{name}").into(), 1);
        runner.resident = Some(Box::new(Holding(bytes)));
        runner
    }

    #[tokio::test]
    async fn a_runner_is_ready_once_its_reset_is_done_and_not_if_it_failed() {
        let mut done = WarmRunner::new(key("a"), "/a".into(), 1);
        done.reset = Some(tokio::task::spawn_blocking(|| Ok(())));
        assert!(done.ready().await.is_ok_and(|r| r.reset.is_none()));
        let mut failed = WarmRunner::new(key("b"), "/b".into(), 1);
        failed.reset = Some(tokio::task::spawn_blocking(|| {
            Err(std::io::Error::other("cannot be emptied"))
        }));
        let (runner, why) = failed.ready().await.unwrap_err();
        assert_eq!(
            (runner.dir, why),
            (PathBuf::from("/b"), "cannot be emptied".into())
        );
        let never_reset = WarmRunner::new(key("c"), "/c".into(), 1);
        assert!(never_reset.ready().await.is_ok());
    }

    #[test]
    fn runners_over_the_memory_budget_go_least_recently_used_first() {
        let pool = RunnerPool::new(RunnerLimits {
            memory_budget: Some(100),
            ..Default::default()
        });
        assert!(pool.put(holding("a", 40)).is_empty());
        assert!(pool.put(holding("b", 40)).is_empty());
        // Directory runners hold nothing against the budget.
        assert!(pool
            .put(WarmRunner::new(key("dir"), "/dir".into(), 1))
            .is_empty());
        // 120 bytes: the oldest goes, and only it.
        assert_eq!(dirs(pool.put(holding("c", 40))), vec![PathBuf::from("/a")]);
        assert_eq!(pool.len(), 3);
        // One alone over the budget is not kept, and pushes no other out.
        assert_eq!(
            dirs(pool.put(holding("huge", 500))),
            vec![PathBuf::from("/huge")]
        );
        assert_eq!(pool.len(), 3);
        assert!(pool.take(&key("b")).0.is_some());
    }

    #[test]
    fn a_runner_is_dropped_after_its_last_use_or_idle_timeout() {
        let pool = RunnerPool::new(RunnerLimits {
            max_uses: 3,
            ..Default::default()
        });
        assert_eq!(
            dirs(pool.put(WarmRunner::new(key("a"), "/a".into(), 3))),
            vec![PathBuf::from("/a")]
        );
        let idle = RunnerPool::new(RunnerLimits {
            idle_timeout: Duration::ZERO,
            ..Default::default()
        });
        assert_eq!(
            dirs(idle.put(WarmRunner::new(key("a"), "/a".into(), 1))),
            vec![PathBuf::from("/a")]
        );
        assert!(idle.is_empty());
    }

    #[test]
    fn leftovers_go_and_nothing_outside_the_runner_is_touched() {
        let dir = tempfile::tempdir().unwrap();
        let scratch = Scratch::open(&dir.path().join("work")).unwrap();
        let action_dir = dir.path().join("work/a");
        let ws = action_dir.join("workspace");
        let outside = dir.path().join("outside");
        for d in [
            &ws.join("out"),
            &ws.join("cache/x"),
            &outside,
            &action_dir.join("io"),
            &action_dir.join(RUNNER_TMP),
        ] {
            std::fs::create_dir_all(d).unwrap();
        }
        for f in [
            ws.join("out/result"),
            ws.join("input.txt"),
            ws.join("leftover"),
            ws.join("cache/x/stale.o"),
            outside.join("victim"),
            action_dir.join("io/stdout"),
            action_dir.join(RUNNER_TMP).join("kept"),
        ] {
            std::fs::write(f, "x").unwrap();
        }
        // The action made a directory the previous outputs pass through
        // into a link to a directory outside.
        std::os::unix::fs::symlink(&outside, ws.join("escape")).unwrap();
        let clean = {
            let mut platform = Platform::default();
            platform.clean_workspace_inputs = vec!["cache/**".into()];
            clean_globs(&platform)
        };
        let leftovers = Leftovers {
            written: "workspace",
            paths: vec!["out".into(), "input.txt".into(), "escape/victim".into()],
            clean,
        };
        reset_for_reuse(&scratch, &action_dir, Some(&leftovers)).unwrap();
        assert!(!ws.join("out").exists());
        assert!(!ws.join("input.txt").exists());
        assert!(!ws.join("cache/x/stale.o").exists());
        assert!(ws.join("leftover").exists());
        assert!(outside.join("victim").exists(), "followed a symlink out");
        assert!(!action_dir.join("io/stdout").exists());
        assert!(action_dir.join(RUNNER_TMP).join("kept").exists());

        reset_for_reuse(&scratch, &action_dir, None).unwrap();
        assert!(!ws.join("leftover").exists());
        assert!(action_dir.join(RUNNER_TMP).join("kept").exists());
    }
}
