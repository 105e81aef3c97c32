//! Which isolation backends this host offers: each configured type is
//! probed at start-up, by running a trial action through the backend as a
//! real action would run, and left out, with a log line saying why, when
//! it does not work here. The executor advertises exactly what is left.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use kiln_container::{Docker, DockerConfig, ImageConfig, NetworkConfig, Podman, PodmanConfig};
use kiln_sandbox::{PlainProcess, Sandbox, SandboxConfig};
use kiln_worker::runners::RunnerLimits;
use kiln_worker::users::ActionUsers;
use kiln_worker::{Isolation, Isolations, WorkerConfig};
use serde::{Deserialize, Serialize};

use kiln_vm::image_disk::ImageDisksConfig;
use kiln_vm::microvm::{Microvm, MicrovmConfig};
use kiln_vm::tree_stream::DecodeLimits;
use kiln_vm::{AcceleratorChoice, QemuConfig};

use crate::config::{Period, Size};

/// The isolation settings of an executor (embedded or standalone).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, clap::Args)]
#[serde(default, deny_unknown_fields)]
pub struct IsolationSettings {
    /// Types to offer, among `none`, `sandbox`, `docker`, `podman` and
    /// `firecracker` (not by default: its probe boots a VM); each
    /// is probed at start-up by running a trial action (`true`; in a
    /// container of a one-file image imported once, for `docker` and
    /// `podman`) and dropped, with a warning saying why, if it does not
    /// work on this host. Leaving `none` out keeps actions off the host's
    /// own processes and network (start-up fails if nothing else works).
    #[arg(long = "isolation", value_delimiter = ',')]
    pub offer: Vec<String>,
    /// The longest one probe may take (its trial action included) before
    /// its type is dropped as not working. Probes run concurrently.
    #[arg(long)]
    pub probe_timeout: Period,
    /// The type of actions that do not set `workload-isolation-type`.
    #[arg(long = "default-isolation")]
    pub default: String,
    /// Image of `docker`/`podman` actions that set no `container-image`
    /// (e.g. `docker://registry.example.com/build:1`); empty: such actions
    /// fail, naming the property.
    #[arg(long)]
    pub default_image: String,
    /// Registries (`host[:port]`) reached over plain HTTP besides the
    /// loopback ones, which always are.
    #[arg(long = "insecure-registry")]
    pub insecure_registries: Vec<String>,
    /// The Docker daemon's socket.
    #[arg(long)]
    pub docker_socket: PathBuf,
    /// Whether `docker_socket` is a docker gate's (`kiln docker-gate`,
    /// started by a root process with `--run-as`), not a setting.
    #[arg(skip)]
    #[serde(skip)]
    pub docker_gated: bool,
    /// The `podman` binary.
    #[arg(long)]
    pub podman_binary: PathBuf,
    /// Whom `none` actions, and `sandbox` actions that set no `dockerUser`,
    /// run as: a range of uids `FIRST-LAST`, a uid of its own for each
    /// runner (with the group of the same number), so that two actions
    /// running at once cannot reach each other; or one user for all, a
    /// name, a uid or `uid:gid`. Never the owner of the input cache, so no
    /// action can change a file another action will see. A range must hold
    /// no user of /etc/passwd and no range of /etc/subuid. Empty: on a root
    /// executor the 65,536 uids from 2046820352 (0x7A000000), which no
    /// tool hands out; an executor that is not root runs actions as itself
    /// (and warns that it cannot protect its cache). `root` runs them as
    /// root (inputs are then overlaid).
    #[arg(long)]
    pub action_user: String,
    /// The user a root server or executor becomes once its launchers run
    /// (a name, a uid or `uid:gid`; not root), so that the process that
    /// talks to clients, the scheduler, the CAS and the file cache is not
    /// root: the launchers keep root for the steps that need it. Before it
    /// switches it hands that user what it needs (its cgroups, the
    /// directories it writes, created if missing) and prepares bridged
    /// networks. `none`, `sandbox` and `docker` may be offered with it
    /// (`docker` through a gate root starts, which forwards only the
    /// containers Kiln makes), on ports above 1023. Empty: it stays root
    /// (keeping only the capabilities its own work needs).
    #[arg(long)]
    pub run_as: String,
    /// Whether `none` actions may choose whom they run as with
    /// `dockerRunAsRoot` or `dockerUser` (as `sandbox` actions do). A
    /// `none` action that runs as root is root on the host: its inputs are
    /// overlaid, but nothing else keeps it from the machine, the input cache
    /// included. Off: such actions are refused with FAILED_PRECONDITION
    /// naming the property and this setting.
    #[arg(long, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub none_allow_user_switch: bool,
    /// Most warm runners (`recycle-runner=true`) kept at once; the least
    /// recently used goes first. 0: no runner is kept warm.
    #[arg(long)]
    pub max_warm_runners: usize,
    /// A warm runner unused this long is discarded.
    #[arg(long)]
    pub runner_idle_timeout: Period,
    /// A runner is discarded after this many actions.
    #[arg(long)]
    pub runner_max_uses: u32,
    /// Most memory the warm runners waiting for an action may hold
    /// together (what their containers' processes use); past it the least
    /// recently used go first. A size, `0` for no budget, or empty for a
    /// quarter of the executor's memory.
    #[arg(long)]
    pub warm_runner_memory: String,
    /// The memory limit of an action without `EstimatedMemory`, under the
    /// types that enforce one (`sandbox`, `docker`, `podman`): a size, `0`
    /// for none, or empty for 90 % of the executor's memory (so one action
    /// cannot take the executor down with it).
    #[arg(long)]
    pub default_action_memory_limit: String,
    /// The CPU quota of an action without `EstimatedCPU`, in milli-CPUs,
    /// under the same types; 0: none.
    #[arg(long)]
    pub default_action_cpu_limit_millis: u64,
    /// The longest fetching an action's inputs and preparing its isolation
    /// (pulling its image) may take before it runs; past it the action
    /// fails with UNAVAILABLE, which clients retry. Its own timeout starts
    /// only when it runs.
    #[arg(long)]
    pub staging_timeout: Period,
    /// The `sandbox` isolation type.
    #[command(flatten)]
    pub sandbox: SandboxConfig,
    /// The `firecracker` isolation type (microVMs under QEMU).
    #[command(flatten)]
    pub vm: VmSettings,
}

/// The settings of `firecracker` actions: each runs in a VM booted by
/// QEMU from its container image, converted to a disk once per digest.
/// Offered only when listed in `--isolation` (each probe boots a VM).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, clap::Args)]
#[serde(default, deny_unknown_fields)]
pub struct VmSettings {
    /// The QEMU system emulator (a name looked up on PATH, or a path).
    #[arg(long = "vm-qemu-binary")]
    pub qemu_binary: PathBuf,
    /// `qemu-img`, which puts a copy-on-write overlay over each VM's root
    /// disk.
    #[arg(long = "vm-qemu-img-binary")]
    pub qemu_img_binary: PathBuf,
    /// `mke2fs` (e2fsprogs), which builds image and workspace disks.
    #[arg(long = "vm-mke2fs-binary")]
    pub mke2fs_binary: PathBuf,
    /// The guest kernel (a bzImage; scripts/install-deps.sh unpacks
    /// Debian's cloud kernel there).
    #[arg(long = "vm-kernel")]
    pub kernel: PathBuf,
    /// The guest kernel's modules (`lib/modules/VERSION`, with its
    /// `modules.dep`).
    #[arg(long = "vm-modules")]
    pub modules: PathBuf,
    /// `auto` (KVM when a guest really runs under /dev/kvm, else TCG),
    /// `kvm` or `tcg`.
    #[arg(long = "vm-accelerator")]
    pub accelerator: String,
    /// Where image disks (one per image digest) and the guest's initramfs
    /// are cached, across restarts.
    #[arg(long = "vm-cache-dir")]
    pub cache_dir: PathBuf,
    /// Most disk the cached image disks may take; past it the least
    /// recently used disk no VM uses goes.
    #[arg(long = "vm-disk-cache-size")]
    pub disk_cache_size: Size,
    /// Where each VM's own files (sockets, disk overlay, workspace disk)
    /// live while it runs; a short path (socket paths are limited).
    #[arg(long = "vm-run-dir")]
    pub run_dir: PathBuf,
    /// Guest memory of an action without `EstimatedMemory`; the VM gets
    /// the kernel's and agent's overhead on top.
    #[arg(long = "vm-default-memory")]
    pub default_memory: Size,
    /// vCPUs of an action without `EstimatedCPU`.
    #[arg(long = "vm-default-vcpus")]
    pub default_vcpus: u32,
    /// Free space on the workspace disk of an action without
    /// `EstimatedFreeDiskBytes`.
    #[arg(long = "vm-default-free-disk")]
    pub default_free_disk: Size,
    /// Free space in each image's root disk beyond its files: what an
    /// action may write outside its workspace, `/var/lib/docker` of an
    /// `init-dockerd` action included (its loaded and pulled images). The
    /// disk files are sparse: it costs host disk only as guests write.
    /// Disks built before a change keep their size until evicted.
    #[arg(long = "vm-image-free-disk")]
    pub image_free_disk: Size,
    /// Most vCPUs one VM gets, whatever its `EstimatedCPU`.
    #[arg(long = "vm-max-vcpus")]
    pub max_vcpus: u32,
    /// The longest a guest may take from QEMU's start to its agent's
    /// answer; software emulation (TCG) boots in seconds.
    #[arg(long = "vm-boot-timeout")]
    pub boot_timeout: Period,
    /// Most bytes of outputs one VM may send back.
    #[arg(long = "vm-max-output-size")]
    pub max_output_size: Size,
    /// Which output files a VM's guest hashes itself, so that only those
    /// the CAS lacks cross to the host: a size (files of that many bytes
    /// or more), `off` (every file is sent), or `auto`: from 1 MiB where
    /// the guest runs under KVM, off under TCG, where hashing in the
    /// emulated guest costs more than sending (benchmarks/microvm.md).
    #[arg(long = "vm-hash-outputs-from")]
    pub hash_outputs_from: String,
}

impl Default for VmSettings {
    fn default() -> Self {
        VmSettings {
            qemu_binary: "qemu-system-x86_64".into(),
            qemu_img_binary: "qemu-img".into(),
            mke2fs_binary: "mke2fs".into(),
            kernel: kiln_vm::vmm::DEFAULT_KERNEL.into(),
            modules: kiln_vm::vmm::DEFAULT_MODULES_DIR.into(),
            accelerator: "auto".into(),
            cache_dir: "/var/cache/kiln-vm".into(),
            disk_cache_size: Size::gib(20),
            run_dir: "/run/kiln-vm".into(),
            default_memory: Size::gib(1),
            default_vcpus: 1,
            default_free_disk: Size::gib(1),
            image_free_disk: Size::mib(256),
            max_vcpus: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
            boot_timeout: Period::secs(120),
            max_output_size: Size::gib(16),
            hash_outputs_from: "auto".into(),
        }
    }
}

impl VmSettings {
    /// The backend's configuration, with the image and network settings
    /// container actions use.
    fn microvm_config(
        &self,
        images: ImageConfig,
        network: NetworkConfig,
    ) -> Result<MicrovmConfig, String> {
        let accelerator = match self.accelerator.as_str() {
            "auto" => AcceleratorChoice::Auto,
            "kvm" => AcceleratorChoice::Kvm,
            "tcg" => AcceleratorChoice::Tcg,
            other => {
                return Err(format!(
                    "vm_accelerator = {other:?}: expected auto, kvm or tcg"
                ))
            }
        };
        let mut qemu = QemuConfig::new(self.cache_dir.join("initramfs"));
        qemu.qemu = self.qemu_binary.clone();
        qemu.qemu_img = self.qemu_img_binary.clone();
        qemu.accelerator = accelerator;
        Ok(MicrovmConfig {
            qemu,
            kernel: self.kernel.clone(),
            modules_dir: self.modules.clone(),
            disks: ImageDisksConfig {
                free_bytes: self.image_free_disk.bytes(),
                ..ImageDisksConfig::new(self.cache_dir.join("images"), self.disk_cache_size.bytes())
            },
            mke2fs: self.mke2fs_binary.clone(),
            run_dir: self.run_dir.clone(),
            images,
            network,
            default_memory_bytes: self.default_memory.bytes(),
            default_vcpus: self.default_vcpus.max(1),
            default_free_disk_bytes: self.default_free_disk.bytes(),
            max_vcpus: self.max_vcpus.max(1),
            boot_timeout: self.boot_timeout.get(),
            output_limits: DecodeLimits {
                entries: 1_000_000,
                bytes: self.max_output_size.bytes(),
            },
            hash_outputs_from: match self.hash_outputs_from.as_str() {
                "auto" => kiln_vm::microvm::HashOutputsFrom::Auto,
                "off" => kiln_vm::microvm::HashOutputsFrom::Off,
                size => kiln_vm::microvm::HashOutputsFrom::Bytes(size.parse::<Size>().map_err(|e| {
                    format!("vm_hash_outputs_from = {size:?}: expected auto, off or a size ({e})")
                })?.bytes()),
            },
        })
    }
}

impl Default for IsolationSettings {
    fn default() -> Self {
        IsolationSettings {
            offer: ["none", "sandbox", "docker", "podman"]
                .map(String::from)
                .to_vec(),
            probe_timeout: Period::secs(30),
            default: "none".into(),
            default_image: String::new(),
            insecure_registries: Vec::new(),
            docker_socket: DockerConfig::default().socket,
            docker_gated: false,
            podman_binary: PodmanConfig::default().binary,
            action_user: String::new(),
            run_as: String::new(),
            none_allow_user_switch: false,
            max_warm_runners: RunnerLimits::default().max_warm,
            runner_idle_timeout: Period(RunnerLimits::default().idle_timeout),
            runner_max_uses: RunnerLimits::default().max_uses,
            warm_runner_memory: String::new(),
            default_action_memory_limit: String::new(),
            default_action_cpu_limit_millis: 0,
            staging_timeout: Period::secs(300),
            sandbox: SandboxConfig::default(),
            vm: VmSettings::default(),
        }
    }
}

/// The uids `none` and `sandbox` actions run as by default on a root
/// executor, one per runner: 65,536 from 0x7A000000, in the range systemd
/// leaves unused (between the container ranges, which end at
/// 1,879,048,191, and its "foreign" range at 2,147,352,576), far above
/// where `useradd` and `/etc/subuid` hand out ids.
pub const DEFAULT_ACTION_UIDS: (u32, u32) = (0x7A00_0000, 0x7A00_FFFF);

impl IsolationSettings {
    /// Writes what these settings say about running actions (warm
    /// runners, default limits, the staging deadline) into `worker`, on an
    /// executor with `executor_memory` bytes.
    pub fn apply_to(&self, worker: &mut WorkerConfig, executor_memory: u64) -> anyhow::Result<()> {
        worker.runners = RunnerLimits {
            max_warm: self.max_warm_runners,
            idle_timeout: self.runner_idle_timeout.get().max(Duration::from_millis(1)),
            max_uses: self.runner_max_uses.max(1),
            memory_budget: self.warm_runner_memory_budget(executor_memory)?,
        };
        worker.default_memory_bytes = self.default_memory_limit(executor_memory)?;
        worker.default_cpu_millis = Some(self.default_action_cpu_limit_millis).filter(|&m| m > 0);
        worker.staging_timeout = self.staging_timeout.get().max(Duration::from_millis(1));
        Ok(())
    }

    /// The memory limit of actions without `EstimatedMemory` on an
    /// executor with `executor_memory` bytes (`u64::MAX`: unknown; see
    /// [`IsolationSettings::default_action_memory_limit`]); None: none.
    /// `warm_runner_memory` in bytes; None: no budget.
    fn warm_runner_memory_budget(&self, executor_memory: u64) -> anyhow::Result<Option<u64>> {
        let given = self.warm_runner_memory.trim();
        let bytes = if given.is_empty() {
            if executor_memory == u64::MAX {
                return Ok(None);
            }
            executor_memory / 4
        } else {
            crate::config::parse_size(given)
                .map_err(|e| anyhow::anyhow!("warm_runner_memory {given:?}: {e}"))?
        };
        Ok(Some(bytes).filter(|&b| b > 0))
    }

    fn default_memory_limit(&self, executor_memory: u64) -> anyhow::Result<Option<u64>> {
        let given = self.default_action_memory_limit.trim();
        let bytes = if given.is_empty() {
            if executor_memory == u64::MAX {
                return Ok(None);
            }
            executor_memory / 10 * 9
        } else {
            crate::config::parse_size(given)
                .map_err(|e| anyhow::anyhow!("default_action_memory_limit {given:?}: {e}"))?
        };
        Ok(Some(bytes).filter(|&b| b > 0))
    }

    /// Whom actions run as (see [`IsolationSettings::action_user`]): a
    /// user, a range of uids, or the executor's own user. A range must
    /// hold no user of this machine (`/etc/passwd`) and no subordinate uid
    /// (`/etc/subuid`), whose files an action could reach; and enough
    /// uids for every runner an executor running `concurrency` actions at
    /// once may hold.
    pub fn resolve_action_users(&self, concurrency: usize) -> anyhow::Result<ActionUsers> {
        let root = kiln_sandbox::launcher::root_behind();
        let own = rustix::process::geteuid().as_raw();
        let (first, last) = if self.action_user.is_empty() {
            if !root {
                return Ok(ActionUsers::One(None));
            }
            DEFAULT_ACTION_UIDS
        } else if let Some(range) = uid_range(&self.action_user)? {
            range
        } else {
            let user = kiln_platform::DockerUser::parse("--action-user", &self.action_user)?;
            let (uid, gid) = kiln_worker::users::resolve(&user).map_err(|reason| {
                anyhow::anyhow!("--action-user {}: {reason}", self.action_user)
            })?;
            if uid == own {
                return Ok(ActionUsers::One(None));
            }
            if !root {
                anyhow::bail!(
                    "--action-user {} needs a root executor (this one runs as uid {own} and cannot switch users)",
                    self.action_user
                );
            }
            return Ok(ActionUsers::One(Some((uid, gid))));
        };
        let shown = if self.action_user.is_empty() {
            format!("the action users {first}-{last} (the default --action-user)")
        } else {
            format!("--action-user {}", self.action_user)
        };
        if !root {
            anyhow::bail!(
                "{shown} needs a root executor (this one runs as uid {own} and cannot switch users)"
            );
        }
        if let Some((name, uid)) = kiln_worker::users::named_in_range(first, last)
            .into_iter()
            .next()
        {
            anyhow::bail!(
                "{shown}: uid {uid} is taken on this machine, by {name}, and an action running \
                 as it could reach their files; choose uids no user (/etc/passwd) or subordinate \
                 range (/etc/subuid) has"
            );
        }
        // Running actions, warm runners, and directories being emptied
        // in the background (one per CPU) each hold a uid.
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let needed = (concurrency + self.max_warm_runners + cpus) as u64;
        let count = u64::from(last - first) + 1;
        if count < needed {
            anyhow::bail!(
                "{shown} holds {count} uids, and this executor may hold {needed} at once \
                 ({concurrency} running at once, {} kept warm (--max-warm-runners), and one per \
                 CPU for directories being emptied): give a wider range",
                self.max_warm_runners
            );
        }
        Ok(ActionUsers::Range { first, last })
    }
}

/// Says at start-up whom actions run as; one user shared by every action
/// is a warning: two `none` actions running at once can reach each other.
pub fn log_action_users(users: ActionUsers) {
    match users {
        ActionUsers::Range { first, last } => tracing::info!(
            first,
            last,
            "actions run as the action users: a uid of its own for each runner"
        ),
        ActionUsers::One(Some((uid, gid))) => tracing::warn!(
            uid,
            gid,
            "every action runs as one action user: two `none` actions running at once can \
             reach each other's processes and workspaces (give --action-user a range of uids, \
             FIRST-LAST, for a uid of its own to each)"
        ),
        ActionUsers::One(None) => {}
    }
}

/// `FIRST-LAST` as a range of uids (None: not a range, a user); an error
/// for a range that is empty or holds root or the invalid uid 4294967295.
fn uid_range(given: &str) -> anyhow::Result<Option<(u32, u32)>> {
    let Some((first, last)) = given.split_once('-') else {
        return Ok(None);
    };
    let number = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !number(first) || !number(last) {
        return Ok(None);
    }
    let parse = |s: &str| {
        s.parse::<u32>()
            .ok()
            .filter(|&uid| uid != u32::MAX)
            .ok_or_else(|| {
                anyhow::anyhow!("--action-user {given}: {s} is not a uid (0 to 4294967294)")
            })
    };
    let (first, last) = (parse(first)?, parse(last)?);
    if first == 0 || first > last {
        anyhow::bail!(
            "--action-user {given}: a range of uids goes from its first to its last, and \
             holds no root (0): e.g. {}-{}, the default",
            DEFAULT_ACTION_UIDS.0,
            DEFAULT_ACTION_UIDS.1
        );
    }
    Ok(Some((first, last)))
}

/// Who a server's embedded executor (`serving`, its data directory
/// `dir`) or an executor (its work directory `dir`) is on a container
/// daemon: the `kiln.owner` label of its containers (see [`offered`]).
pub fn container_owner(serving: bool, dir: &std::path::Path) -> String {
    if serving {
        format!("kiln-serve:{}", dir.display())
    } else {
        format!("kiln-worker:{}", dir.display())
    }
}

/// Probes the configured backends and returns those that work; an error
/// when `none` is not configured and no other type works. `owner`
/// names this executor instance, stably across restarts and uniquely among
/// those sharing a container daemon (e.g. its data directory): containers
/// are labelled with it, and at start-up the leftovers of a previous run of
/// the same owner are removed. Trial actions run as `action_users` would
/// and in workspaces under `work_root`, where a launcher's policy (see
/// `kiln_sandbox::launch`) takes them.
pub async fn offered(
    settings: &IsolationSettings,
    owner: &str,
    action_users: ActionUsers,
    work_root: &std::path::Path,
) -> anyhow::Result<Isolations> {
    // The `kiln` binary installs launchers when it runs as root (see
    // `kiln_sandbox::launcher`); a server embedded in another program
    // starts its actions itself.
    let launchers = kiln_sandbox::launcher::pids();
    if !launchers.is_empty() {
        tracing::info!(pids = ?launchers, "actions start through the launchers");
    } else if rustix::process::geteuid().is_root() {
        tracing::info!("no launchers installed: actions start in this process");
    }
    // `none`: a plain process as the action user, in a cgroup emptied when
    // it ends, started with a clone that copies nothing of the executor.
    let mut isolations = Isolations::new(Arc::new(
        PlainProcess::new(&settings.sandbox.cgroup_parent)
            .allowing_user_switch(settings.none_allow_user_switch)
            .trying_as(action_users.any())
            .probe_namespaces()
            .await,
    ));
    // The workspace's root-only steps (overlays, directories given to the
    // action user) are the launchers' too.
    if let Some(steps) = kiln_sandbox::privileged::steps() {
        isolations = isolations.with_privileged_steps(steps);
    }
    let images = ImageConfig {
        default_image: Some(settings.default_image.clone()).filter(|image| !image.is_empty()),
        insecure_registries: settings.insecure_registries.clone(),
        ..ImageConfig::default()
    };
    // Probes run at once: podman's CLI alone takes a few hundred ms, and
    // each probe starts a trial action.
    let probe_timeout = settings.probe_timeout.get().max(Duration::from_millis(1));
    let probes = settings
        .offer
        .iter()
        .filter(|name| *name != "none")
        .map(|name| {
            let images = images.clone();
            async move {
                let started = std::time::Instant::now();
                // Dropping a probe that takes too long stops its trial
                // action: the backends remove a container whose run is
                // dropped.
                let timed_out =
                    || format!("the probe did not finish within {probe_timeout:?} (probe_timeout)");
                let probed = probe(name, settings, images, owner, work_root);
                let probed = tokio::time::timeout(probe_timeout, probed)
                    .await
                    .unwrap_or_else(|_| Err(timed_out()));
                (name, probed, started.elapsed())
            }
        });
    for (name, probed, elapsed) in futures::future::join_all(probes).await {
        let elapsed_ms = elapsed.as_millis() as u64;
        match probed {
            Ok(backend) => {
                tracing::info!(isolation = %name, elapsed_ms, "isolation type offered");
                isolations = isolations.with(backend);
            }
            Err(reason) => {
                tracing::warn!(isolation = %name, %reason, elapsed_ms, "isolation type not offered")
            }
        }
    }
    // `none` runs actions as plain host processes, in the host's network
    // namespace: offered only when configured.
    if !settings.offer.iter().any(|name| name == "none") && !isolations.without("none") {
        anyhow::bail!(
            "none of the configured isolation types ({}) works on this host, and none (plain \
             host processes) is not among them: the executor would have nothing to run actions \
             with",
            settings.offer.join(", ")
        );
    }
    if !isolations.set_default(&settings.default) {
        tracing::warn!(
            default = %settings.default,
            offered = ?isolations.names(),
            using = isolations.default_name(),
            "the configured default isolation type is not offered"
        );
    }
    Ok(isolations)
}

/// Probes the isolation type `name`: the backend, once its trial action
/// ran, or why it does not work here.
async fn probe(
    name: &str,
    settings: &IsolationSettings,
    images: ImageConfig,
    owner: &str,
    work_root: &std::path::Path,
) -> Result<Arc<dyn Isolation>, String> {
    match name {
        "sandbox" => Sandbox::probe_in(settings.sandbox.clone(), work_root)
            .await
            .map(|s| Arc::new(s) as _),
        "docker" => Docker::probe(DockerConfig {
            socket: settings.docker_socket.clone(),
            images,
            owner: Some(owner.to_string()),
            network: container_network(settings),
            work_root: Some(work_root.to_path_buf()),
            gated: settings.docker_gated,
        })
        .await
        .map(|d| Arc::new(d) as _),
        "podman" => Podman::probe(PodmanConfig {
            binary: settings.podman_binary.clone(),
            images,
            owner: Some(owner.to_string()),
            network: container_network(settings),
        })
        .await
        .map(|p| Arc::new(p) as _),
        "firecracker" => {
            let config = settings
                .vm
                .microvm_config(images, container_network(settings))?;
            Microvm::probe(config).await.map(|m| Arc::new(m) as _)
        }
        _ => {
            Err("unknown isolation type (known: none, sandbox, docker, podman, firecracker)".into())
        }
    }
}

/// Container actions' networks share the sandbox's settings: podman's are
/// carved from the same range, and both use the same `nft`.
fn container_network(settings: &IsolationSettings) -> NetworkConfig {
    NetworkConfig {
        cidr: settings.sandbox.network_cidr.clone(),
        nft_binary: settings.sandbox.nft_binary.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_warm_runner_memory_budget_defaults_to_a_quarter_and_names_a_bad_value() {
        let budget = |given: &str, memory: u64| {
            IsolationSettings {
                warm_runner_memory: given.into(),
                ..Default::default()
            }
            .warm_runner_memory_budget(memory)
        };
        assert_eq!(budget("", 8 << 30).unwrap(), Some(2 << 30));
        assert_eq!(budget("", u64::MAX).unwrap(), None);
        assert_eq!(budget("512MiB", 8 << 30).unwrap(), Some(512 << 20));
        assert_eq!(budget("0", 8 << 30).unwrap(), None);
        let error = budget("lots", 8 << 30).unwrap_err().to_string();
        assert!(error.contains("warm_runner_memory \"lots\""), "{error}");
    }
    #[test]
    fn hashing_outputs_in_the_guest_is_auto_off_or_a_size_and_names_a_bad_value() {
        use kiln_vm::microvm::HashOutputsFrom;
        let from = |given: &str| {
            VmSettings {
                hash_outputs_from: given.into(),
                ..Default::default()
            }
            .microvm_config(ImageConfig::default(), NetworkConfig::default())
            .map(|config| config.hash_outputs_from)
        };
        assert_eq!(from("auto").unwrap(), HashOutputsFrom::Auto);
        assert_eq!(from("off").unwrap(), HashOutputsFrom::Off);
        assert_eq!(from("1MiB").unwrap(), HashOutputsFrom::Bytes(1 << 20));
        let error = from("lots").unwrap_err();
        assert!(error.contains("vm_hash_outputs_from = \"lots\""), "{error}");
    }
}
