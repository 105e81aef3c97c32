//! The docker gate (`kiln_container::gate`) in front of the real dockerd:
//! the `docker` backend works through it unchanged, and what that backend
//! never asks for (a privileged container, a bind of the host, a host
//! network, another executor's containers, …) is refused, naming what.
//! A bind's source is pinned when the container is created, so swapping
//! it for a symlink before the start reaches nothing else. Needs root
//! (the gate mounts its pins) and dockerd (`scripts/services.sh start`);
//! without them a test says it is skipped, and fails under CI.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use bollard::models::{ContainerCreateBody, HostConfig, Mount, MountType};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, CreateImageOptionsBuilder, ListContainersOptionsBuilder,
    RemoveContainerOptionsBuilder, WaitContainerOptionsBuilder,
};
use futures::StreamExt;
use kiln_container::gate::GateConfig;
use kiln_container::{Docker, DockerConfig};

const BASE: &str = "127.0.0.1:5000/kiln-test/base:latest";
const OWNER: &str = "kiln-gate-tests";
const DOCKER_SOCKET: &str = "/var/run/docker.sock";

/// Whether the test can run; says why not (a failure under CI).
fn available(test: &str) -> bool {
    let reason = if !rustix::process::geteuid().is_root() {
        "needs root (the gate mounts its pins)".to_string()
    } else if !Path::new(DOCKER_SOCKET).exists() {
        format!("no dockerd at {DOCKER_SOCKET}")
    } else {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/images/build.sh");
        match std::process::Command::new("bash").arg(&script).output() {
            Ok(built) if built.status.success() => return true,
            Ok(built) => String::from_utf8_lossy(&built.stderr).trim().to_string(),
            Err(e) => format!("running {}: {e}", script.display()),
        }
    };
    if std::env::var_os("CI").is_some() {
        panic!("{test}: {reason} (CI must provide root and dockerd)");
    }
    eprintln!("skipped: {test}: {reason}");
    false
}

/// A gate serving the test process (root) in front of dockerd, with its
/// work root, pins and socket in a directory of its own.
struct Gate {
    dir: tempfile::TempDir,
    socket: PathBuf,
    work_root: PathBuf,
    client: bollard::Docker,
    direct: bollard::Docker,
}

impl Gate {
    async fn start(client_uid: u32) -> Gate {
        let dir = tempfile::tempdir().unwrap();
        let work_root = dir.path().join("work");
        std::fs::create_dir(&work_root).unwrap();
        let socket = dir.path().join("gate.sock");
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        let config = GateConfig {
            upstream: DOCKER_SOCKET.into(),
            owner: OWNER.into(),
            client_uid,
            bind_roots: vec![work_root.clone()],
            pins_dir: dir.path().join("pins"),
            nft_binary: "nft".into(),
        };
        let gate = kiln_container::gate::DockerGate::start(config)
            .await
            .unwrap();
        tokio::spawn(gate.serve(listener));
        let api = bollard::ClientVersion {
            major_version: 1,
            minor_version: 41,
        };
        let client =
            bollard::Docker::connect_with_socket(socket.to_str().unwrap(), 120, &api).unwrap();
        let direct = bollard::Docker::connect_with_socket(DOCKER_SOCKET, 120, &api).unwrap();
        Gate {
            dir,
            socket,
            work_root,
            client,
            direct,
        }
    }

    /// Pins still mounted under the gate's directory.
    fn pins_mounted(&self) -> usize {
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let pins = self.dir.path().join("pins");
        let pins = pins.to_str().unwrap();
        mounts.lines().filter(|line| line.contains(pins)).count()
    }
}

fn labelled(body: ContainerCreateBody) -> ContainerCreateBody {
    ContainerCreateBody {
        image: Some(BASE.into()),
        labels: Some(HashMap::from([("kiln.owner".into(), OWNER.into())])),
        ..body
    }
}

fn bind(source: &Path, target: &str) -> HostConfig {
    HostConfig {
        mounts: Some(vec![Mount {
            typ: Some(MountType::BIND),
            source: Some(source.display().to_string()),
            target: Some(target.into()),
            read_only: Some(false),
            ..Default::default()
        }]),
        network_mode: Some("none".into()),
        ..Default::default()
    }
}

/// What the daemon (or the gate) answered a refused request: its status
/// and message.
fn refusal<T: std::fmt::Debug>(result: Result<T, bollard::errors::Error>) -> (u16, String) {
    match result {
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code,
            message,
        }) => (status_code, message),
        other => panic!("not refused: {other:?}"),
    }
}

async fn pull_base(client: &bollard::Docker) {
    let options = CreateImageOptionsBuilder::default()
        .from_image(BASE)
        .build();
    let mut pulled = client.create_image(Some(options), None, None);
    while let Some(item) = pulled.next().await {
        item.unwrap();
    }
}

fn force() -> bollard::query_parameters::RemoveContainerOptions {
    RemoveContainerOptionsBuilder::default().force(true).build()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_docker_backend_runs_through_the_gate_and_binds_what_was_checked() {
    if !available("the docker gate") {
        return;
    }
    let gate = Gate::start(rustix::process::geteuid().as_raw()).await;
    // The backend, unchanged but for its socket: its probe (network, the
    // trial image imported, the trial container run) goes through.
    let docker = Docker::probe(DockerConfig {
        socket: gate.socket.clone(),
        owner: Some(OWNER.into()),
        work_root: Some(gate.work_root.clone()),
        gated: true,
        ..Default::default()
    })
    .await;
    assert!(docker.is_ok(), "{:?}", docker.err());
    assert_eq!(
        gate.pins_mounted(),
        0,
        "the trial's pin went with its container"
    );

    pull_base(&gate.client).await;
    let workspace = gate.work_root.join("ws");
    std::fs::create_dir(&workspace).unwrap();
    std::fs::write(workspace.join("marker"), "inside").unwrap();
    let outside = gate.dir.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("marker"), "outside").unwrap();
    let body = labelled(ContainerCreateBody {
        cmd: Some(vec![
            "/bin/sh".into(),
            "-c".into(),
            "cat /ws/marker > /ws/seen".into(),
        ]),
        host_config: Some(bind(&workspace, "/ws")),
        ..Default::default()
    });
    let created = gate
        .client
        .create_container(
            None::<bollard::query_parameters::CreateContainerOptions>,
            body,
        )
        .await
        .unwrap();
    assert_eq!(gate.pins_mounted(), 1);
    // Between the create and the start, the executor's user swaps its
    // workspace for a symlink to somewhere it should not reach.
    std::fs::rename(&workspace, gate.work_root.join("old")).unwrap();
    std::os::unix::fs::symlink(&outside, &workspace).unwrap();
    gate.client
        .start_container(&created.id, None)
        .await
        .unwrap();
    let options = WaitContainerOptionsBuilder::default().build();
    let waited = gate
        .client
        .wait_container(&created.id, Some(options))
        .next()
        .await;
    assert_eq!(waited.map(|w| w.unwrap().status_code), Some(0));
    assert!(
        !outside.join("seen").exists(),
        "the container reached the symlink's target"
    );
    assert_eq!(
        std::fs::read_to_string(gate.work_root.join("old/seen")).unwrap(),
        "inside",
        "the container bound what was checked"
    );
    gate.client
        .remove_container(&created.id, Some(force()))
        .await
        .unwrap();
    assert_eq!(gate.pins_mounted(), 0, "the pin went with the container");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_gate_refuses_what_the_backend_never_asks_for() {
    if !available("the docker gate's refusals") {
        return;
    }
    let gate = Gate::start(rustix::process::geteuid().as_raw()).await;
    pull_base(&gate.direct).await;
    let outside = gate.dir.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    std::os::unix::fs::symlink(&outside, gate.work_root.join("link")).unwrap();
    let create = |body: ContainerCreateBody| {
        let client = gate.client.clone();
        async move {
            refusal(
                client
                    .create_container(
                        None::<bollard::query_parameters::CreateContainerOptions>,
                        body,
                    )
                    .await,
            )
        }
    };
    let cases: Vec<(&str, ContainerCreateBody)> = vec![
        (
            "HostConfig.Privileged",
            labelled(ContainerCreateBody {
                host_config: Some(HostConfig {
                    privileged: Some(true),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        ),
        (
            "HostConfig.CapAdd",
            labelled(ContainerCreateBody {
                host_config: Some(HostConfig {
                    cap_add: Some(vec!["SYS_ADMIN".into()]),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        ),
        (
            "HostConfig.NetworkMode=host",
            labelled(ContainerCreateBody {
                host_config: Some(HostConfig {
                    network_mode: Some("host".into()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        ),
        (
            "/etc: beneath none of the directories",
            labelled(ContainerCreateBody {
                host_config: Some(bind(Path::new("/etc"), "/host-etc")),
                ..Default::default()
            }),
        ),
        (
            "not reached without a symlink",
            labelled(ContainerCreateBody {
                host_config: Some(bind(&gate.work_root.join("link"), "/ws")),
                ..Default::default()
            }),
        ),
        (
            "a container without the label kiln.owner=kiln-gate-tests",
            ContainerCreateBody {
                image: Some(BASE.into()),
                ..Default::default()
            },
        ),
        (
            "Volumes is not a setting",
            labelled(ContainerCreateBody {
                volumes: Some(vec!["/data".into()]),
                ..Default::default()
            }),
        ),
    ];
    for (named, body) in cases {
        let (status, message) = create(body).await;
        assert_eq!(status, 403, "{named}: {message}");
        assert!(message.contains(named), "{named}: {message}");
    }
    assert_eq!(gate.pins_mounted(), 0);

    // Another executor's container (made on the daemon directly): not
    // started, inspected, or removed through the gate.
    let theirs = gate
        .direct
        .create_container(
            Some(CreateContainerOptionsBuilder::default().build()),
            ContainerCreateBody {
                image: Some(BASE.into()),
                cmd: Some(vec!["true".into()]),
                labels: Some(HashMap::from([(
                    "kiln.owner".into(),
                    "someone-else".into(),
                )])),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let (status, message) = refusal(gate.client.start_container(&theirs.id, None).await);
    assert_eq!(
        (status, message.contains("not one of this executor's")),
        (403, true),
        "{message}"
    );
    let (status, _) = refusal(gate.client.inspect_container(&theirs.id, None).await);
    assert_eq!(status, 403);
    let (status, _) = refusal(
        gate.client
            .remove_container(&theirs.id, Some(force()))
            .await,
    );
    assert_eq!(status, 403);
    assert!(
        gate.direct
            .inspect_container(&theirs.id, None)
            .await
            .is_ok(),
        "still there"
    );
    gate.direct
        .remove_container(&theirs.id, Some(force()))
        .await
        .unwrap();

    // Listing every container, an exec, an image imported under any name.
    let (status, message) = refusal(
        gate.client
            .list_containers(Some(
                ListContainersOptionsBuilder::default().all(true).build(),
            ))
            .await,
    );
    assert_eq!(status, 403, "{message}");
    assert!(
        message.contains("label=kiln.owner=kiln-gate-tests"),
        "{message}"
    );
    let (status, message) = refusal(
        gate.client
            .create_exec(
                "anything",
                bollard::models::ExecConfig {
                    cmd: Some(vec!["true".into()]),
                    ..Default::default()
                },
            )
            .await,
    );
    assert_eq!(status, 403, "{message}");
    assert!(
        message.contains("is not a request Kiln's docker backend makes"),
        "{message}"
    );
    let options = CreateImageOptionsBuilder::default()
        .from_src("-")
        .repo("debian")
        .tag("12")
        .build();
    let imported = gate
        .client
        .create_image(
            Some(options),
            Some(bollard::body_full(Vec::new().into())),
            None,
        )
        .next()
        .await
        .expect("an answer");
    let (status, message) = refusal(imported);
    assert_eq!(status, 403, "{message}");
}

/// Sends `body` as a container create straight to the gate's socket and
/// returns the answer's status line and body.
async fn raw_create(socket: &Path, body: &[u8]) -> (String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::UnixStream::connect(socket).await.unwrap();
    let head = format!(
        "POST /v1.41/containers/create HTTP/1.1\r\nHost: docker\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    // The gate may answer before reading all of an oversized body.
    let _ = stream.write_all(body).await;
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer).await;
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let status = answer.lines().next().unwrap_or("").to_string();
    let body = answer.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status, body)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_gate_answers_malformed_creates_and_keeps_serving() {
    if !available("the docker gate's bad input") {
        return;
    }
    let gate = Gate::start(rustix::process::geteuid().as_raw()).await;
    let (status, body) = raw_create(&gate.socket, b"{not json").await;
    assert!(status.contains(" 400 "), "{status}: {body}");
    assert!(body.contains("the create body"), "{body}");
    let (status, body) = raw_create(&gate.socket, b"[1, 2]").await;
    assert!(status.contains(" 403 "), "{status}: {body}");
    let huge = vec![b' '; 2 << 20];
    let (status, body) = raw_create(&gate.socket, &huge).await;
    assert!(status.contains(" 400 "), "{status}: {body}");
    assert!(body.contains("over 1048576 bytes"), "{body}");
    // Still serving.
    assert!(gate.client.ping().await.is_ok());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_gate_serves_its_user_alone() {
    if !available("the docker gate's peer check") {
        return;
    }
    // A gate for another uid than this process's.
    let gate = Gate::start(64_000).await;
    let answered =
        tokio::time::timeout(std::time::Duration::from_secs(30), gate.client.ping()).await;
    match answered {
        Ok(Err(_)) => {}
        other => panic!("a connection from another user was served: {other:?}"),
    }
}
