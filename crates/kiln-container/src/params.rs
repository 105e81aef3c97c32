//! From an action to the parameters of one container, written once for
//! both runtimes: the command (the image's `CMD` replaced, its `ENTRYPOINT`
//! kept), environment, workspace bind mount, user, init, network and
//! resource limits. Each runtime only spells these its own way.

use std::path::PathBuf;

use kiln_platform::{DockerNetwork, DockerUser};
use kiln_worker::{CommandSpec, Limits, RunError};

/// The label every container Kiln starts carries, so leftovers can be found.
pub const LABEL_KEY: &str = "kiln.action";
pub const LABEL_VALUE: &str = "1";
/// The label naming the executor that started a container (its owner).
pub const OWNER_LABEL: &str = "kiln.owner";

/// Whose containers a backend starts, and whether it sweeps: with a
/// configured owner, the probe removes what a previous process of the same
/// owner left behind; without one, a random per-process owner that nothing
/// sweeps (so executors or tests sharing a daemon never remove each
/// other's running containers).
pub fn owner_and_sweep(configured: Option<&str>) -> (String, bool) {
    match configured.filter(|owner| !owner.is_empty()) {
        Some(owner) => (owner.to_string(), true),
        None => (format!("process-{}", uuid::Uuid::new_v4().simple()), false),
    }
}

/// The labels of a container started for `owner`.
pub fn labels(owner: &str) -> [(String, String); 2] {
    [
        (LABEL_KEY.into(), LABEL_VALUE.into()),
        (OWNER_LABEL.into(), owner.into()),
    ]
}

/// The network a container gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Network {
    /// Loopback only (`dockerNetwork=off`).
    None,
    /// A private network with outbound access only (`dockerNetwork=bridge`;
    /// see [`crate::network`]).
    Bridge,
}

/// Everything a runtime needs to create one action's container.
#[derive(Debug, Clone)]
pub struct RunParameters {
    /// `kiln-<uuid>`: unique, and recognizable in `docker ps`.
    pub name: String,
    /// `kiln.action=1` and `kiln.owner=<owner>`.
    pub labels: [(String, String); 2],
    /// What the runtime runs: `registry/repository@digest`, or a local
    /// image (the probe's trial image).
    pub image: String,
    /// The container's command: the action's arguments.
    pub command: Vec<String>,
    /// `NAME=VALUE`, exactly the Command's.
    pub environment: Vec<String>,
    /// The workspace, mounted read-write at the same absolute path.
    pub workspace: PathBuf,
    pub working_directory: PathBuf,
    /// `dockerUser` as given, `0:0` with `dockerRunAsRoot`, else the image's.
    pub user: Option<String>,
    pub init: bool,
    pub network: Network,
    pub memory_bytes: Option<u64>,
    /// CPU quota in billionths of a core (`nano_cpus`).
    pub nano_cpus: Option<u64>,
    pub pids_max: Option<u64>,
}

impl RunParameters {
    /// The parameters of `spec` run in `image` (a reference the runtime
    /// holds) under `limits`; `bridge` says whether the backend can give
    /// actions an isolated network ([`crate::network`]), or why not.
    /// Without one, an action that leaves `dockerNetwork` unset runs
    /// without network (the executor warned at start-up), and one that asks
    /// for `dockerNetwork=bridge` is refused rather than given none or the
    /// runtime's default bridge.
    pub fn new(
        spec: &CommandSpec,
        limits: &Limits,
        image: &str,
        bridge: Result<(), &str>,
        owner: &str,
    ) -> Result<RunParameters, RunError> {
        let platform = &spec.platform;
        let user = if platform.docker_run_as_root {
            Some("0:0".to_string())
        } else {
            platform.docker_user.as_ref().map(|user| match user {
                DockerUser::Name(name) => name.clone(),
                DockerUser::Uid(uid) => uid.to_string(),
                DockerUser::UidGid(uid, gid) => format!("{uid}:{gid}"),
            })
        };
        let network = match (platform.docker_network, bridge) {
            (Some(DockerNetwork::Off), _) | (None, Err(_)) => Network::None,
            (_, Ok(())) => Network::Bridge,
            (Some(DockerNetwork::Bridge), Err(reason)) => {
                return Err(RunError::Unsupported(format!(
                    "dockerNetwork=bridge: this executor cannot give container actions a network \
                     of their own ({reason}); set dockerNetwork=off, or run the action elsewhere"
                )))
            }
        };
        for path in [&spec.workspace, &spec.working_directory] {
            if path.to_str().is_none_or(|p| p.contains([',', ':'])) {
                return Err(RunError::Internal(format!(
                    "the workspace path {} cannot be mounted into a container (it must be UTF-8 without ',' or ':')",
                    path.display()
                )));
            }
        }
        Ok(RunParameters {
            name: format!("kiln-{}", uuid::Uuid::new_v4().simple()),
            labels: labels(owner),
            image: image.to_string(),
            command: spec.arguments.clone(),
            environment: spec
                .environment_variables
                .iter()
                .map(|(name, value)| format!("{name}={value}"))
                .collect(),
            workspace: spec.workspace.clone(),
            working_directory: spec.working_directory.clone(),
            user,
            init: platform.docker_init,
            network,
            memory_bytes: limits.memory_bytes,
            nano_cpus: limits.cpu_millis.map(|millis| millis * 1_000_000),
            pids_max: limits.pids_max,
        })
    }

    /// The stop grace in whole seconds, rounded up (what both runtimes take).
    pub fn grace_seconds(limits: &Limits) -> u64 {
        limits.grace.as_millis().div_ceil(1000) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    use crate::image::ResolvedImage;
    use kiln_platform::{ContainerImage, ImageReference, Platform};

    fn spec(platform: Platform) -> CommandSpec {
        CommandSpec {
            arguments: vec!["id".into(), "-u".into()],
            environment_variables: vec![("A".into(), "b=c".into())],
            workspace: "/work/x/workspace".into(),
            working_directory: "/work/x/workspace/sub".into(),
            stdout_path: "/work/x/io/stdout".into(),
            stderr_path: "/work/x/io/stderr".into(),
            output: None,
            platform: Arc::new(platform),
            action_user: None,
            runner_tmp: None,
            output_paths: Vec::new(),
            owned_directories: Vec::new(),
            input_digests: None,
            stored_outputs: None,
        }
    }

    fn image() -> ResolvedImage {
        ResolvedImage {
            image: ContainerImage {
                registry: "127.0.0.1:5000".into(),
                repository: "kiln-test/base".into(),
                reference: ImageReference::Tag("latest".into()),
            },
            digest: format!("sha256:{}", "a".repeat(64)),
        }
    }

    const LIMITS: Limits = Limits {
        timeout: Duration::from_secs(5),
        grace: Duration::from_millis(1500),
        memory_bytes: Some(64 << 20),
        cpu_millis: Some(500),
        pids_max: Some(100),
    };

    #[test]
    fn platform_properties_become_container_parameters() {
        let mut platform = Platform::default();
        platform.docker_user = Some(DockerUser::UidGid(1000, 100));
        platform.docker_init = true;
        platform.docker_network = Some(DockerNetwork::Off);
        let params =
            RunParameters::new(&spec(platform), &LIMITS, &image().pinned(), Ok(()), "test")
                .unwrap();
        assert!(params.name.starts_with("kiln-"));
        assert_eq!(
            params.image,
            format!("127.0.0.1:5000/kiln-test/base@sha256:{}", "a".repeat(64))
        );
        assert_eq!(params.command, ["id", "-u"]);
        assert_eq!(params.environment, ["A=b=c"]);
        assert_eq!(params.user.as_deref(), Some("1000:100"));
        assert!(params.init);
        assert_eq!(params.network, Network::None);
        assert_eq!(params.nano_cpus, Some(500_000_000));
        assert_eq!(RunParameters::grace_seconds(&LIMITS), 2);
        assert_eq!(params.labels[1], ("kiln.owner".into(), "test".into()));
    }

    #[test]
    fn only_a_configured_owner_sweeps() {
        assert_eq!(owner_and_sweep(Some("worker-1")), ("worker-1".into(), true));
        let (first, sweep) = owner_and_sweep(None);
        assert!(!sweep);
        assert_ne!(first, owner_and_sweep(Some("")).0, "random per process");
    }

    #[test]
    fn run_as_root_wins_and_an_unset_network_is_none_without_a_bridge() {
        let mut platform = Platform::default();
        platform.docker_user = Some(DockerUser::Name("builder".into()));
        platform.docker_run_as_root = true;
        let with_bridge = RunParameters::new(
            &spec(platform.clone()),
            &LIMITS,
            &image().pinned(),
            Ok(()),
            "test",
        )
        .unwrap();
        assert_eq!(with_bridge.user.as_deref(), Some("0:0"));
        assert_eq!(with_bridge.network, Network::Bridge);
        let without = RunParameters::new(
            &spec(platform),
            &LIMITS,
            &image().pinned(),
            Err("no nft"),
            "test",
        )
        .unwrap();
        assert_eq!(without.network, Network::None);
        let default = RunParameters::new(
            &spec(Platform::default()),
            &LIMITS,
            &image().pinned(),
            Ok(()),
            "test",
        )
        .unwrap();
        assert_eq!(default.user, None);
    }

    #[test]
    fn an_explicit_bridge_is_refused_where_the_runtime_has_none() {
        let mut platform = Platform::default();
        platform.docker_network = Some(DockerNetwork::Bridge);
        let with_bridge = RunParameters::new(
            &spec(platform.clone()),
            &LIMITS,
            &image().pinned(),
            Ok(()),
            "test",
        )
        .unwrap();
        assert_eq!(with_bridge.network, Network::Bridge);
        let error = RunParameters::new(
            &spec(platform),
            &LIMITS,
            &image().pinned(),
            Err("no nft"),
            "test",
        )
        .expect_err("no bridge to give");
        assert!(matches!(error, RunError::Unsupported(_)), "{error:?}");
        assert!(
            error.to_string().starts_with("dockerNetwork=bridge:")
                && error.to_string().contains("(no nft)"),
            "{error}"
        );
        assert_eq!(
            tonic::Status::from(error).code(),
            tonic::Code::FailedPrecondition
        );
    }
}
