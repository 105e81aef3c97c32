//! The docker gate: how an executor that is not root (`--run-as`) runs
//! `docker` actions without holding the Docker socket, which is root's
//! whole power (a container binding `/` read-write, `--privileged`, the
//! host's namespaces).
//!
//! Root starts `kiln docker-gate` before the executor becomes its user.
//! The gate holds the daemon's socket and listens on one of its own that
//! only that user may connect to (its peer's uid is checked too). It
//! speaks the same Engine API, so the executor's `docker` backend is
//! unchanged but for the socket path; what it forwards is only what that
//! backend asks for, and only in the shape it asks for it:
//!
//! - **endpoints**: ping, version, info; pulling an image (and importing
//!   the probe's trial image, under its own repository alone) and
//!   inspecting one; creating, attaching to, starting, waiting for,
//!   stopping, killing, inspecting and removing a container; listing this
//!   executor's containers; inspecting Kiln's bridge network. Anything
//!   else is refused (403, naming the method and path);
//! - **containers created**: every setting in an allow-list (image,
//!   command, entrypoint, environment, working directory, user, labels,
//!   attach flags; in `HostConfig` binds, network, init, memory, swap,
//!   CPUs, pids and the `none` log driver), labelled `kiln.owner=<this
//!   executor>`, on no network or Kiln's isolated one ([`crate::network`],
//!   set up by the gate itself, as root). So no privileged container, no
//!   added capability or device, no host namespace, no volume or port;
//! - **binds**: only paths beneath the executor's work root or its warm
//!   runners' agent directory, reached through no symlink, and handed to
//!   the daemon pinned ([`kiln_sandbox::pin`]): what the daemon mounts is
//!   what was checked, whatever the user does to its own path between the
//!   create and the start;
//! - **containers operated on**: only those labelled with this executor's
//!   owner (the ones it created, or, asked once, found left by a previous
//!   process), and by their full id, so a name or prefix cannot come to
//!   mean another container between the check and the request.
//!
//! Registry credentials pass through (`X-Registry-Auth`) and are never
//! logged. What the gate does not guard: root in the container is root on
//! the host's kernel with Docker's default capabilities, as it is for a
//! root executor; what the executor may bind is its own.

use std::collections::HashMap;
use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode, Uri};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use kiln_sandbox::pin::{Pin, Pins};
use parking_lot::Mutex;
use serde_json::Value;
use tokio::net::{UnixListener, UnixStream};

use crate::network::DOCKER_NETWORK;
use crate::params::OWNER_LABEL;
use crate::trial::TRIAL_REPOSITORY;

/// The Engine API version the gate forwards as (the backend's).
const API_PREFIX: &str = "/v1.41";
/// The largest create request or daemon answer the gate reads whole.
const MAX_BODY: usize = 1024 * 1024;

/// What a gate serves, and for whom.
#[derive(Debug, Clone)]
pub struct GateConfig {
    /// The daemon's socket.
    pub upstream: PathBuf,
    /// The `kiln.owner` label of the executor's containers.
    pub owner: String,
    /// The executor's uid: no other may connect.
    pub client_uid: u32,
    /// Directories binds may come from: the executor's work root and its
    /// runners' agent directory.
    pub bind_roots: Vec<PathBuf>,
    /// Root's directory where binds are pinned.
    pub pins_dir: PathBuf,
    /// The nftables command, for Kiln's bridge network.
    pub nft_binary: PathBuf,
}

type Body = BoxBody<Bytes, hyper::Error>;

struct Gate {
    config: GateConfig,
    pins: Mutex<Pins>,
    /// This executor's containers by full id.
    owned: Mutex<HashMap<String, Owned>>,
    /// Whether bridged containers are isolated here, or why not.
    bridge: Result<(), String>,
}

/// One of the executor's containers.
#[derive(Debug, Default)]
struct Owned {
    /// Its binds, pinned until it is removed (and this dropped).
    _pins: Vec<Pin>,
    /// Whether it is a warm runner (its entrypoint Kiln's agent), whose
    /// freezer the executor is given once it starts.
    runner: bool,
}

/// A request the gate does not forward: its status and why, or the
/// daemon's own answer to what the gate asked first.
enum Refusal {
    Gate(StatusCode, String),
    Daemon(Box<Response<Body>>),
}

impl Refusal {
    fn forbidden(what: impl std::fmt::Display) -> Refusal {
        Refusal::Gate(StatusCode::FORBIDDEN, format!("kiln docker gate: {what}"))
    }

    fn response(self) -> Response<Body> {
        match self {
            Refusal::Gate(status, message) => {
                let body = serde_json::json!({ "message": message }).to_string();
                Response::builder()
                    .status(status)
                    .header(header::CONTENT_TYPE, "application/json")
                    .body(full(body.into()))
                    .expect("a valid response")
            }
            Refusal::Daemon(response) => *response,
        }
    }
}

fn full(bytes: Bytes) -> Body {
    Full::new(bytes).map_err(|never| match never {}).boxed()
}

/// A docker gate, ready to serve.
pub struct DockerGate(Arc<Gate>);

impl DockerGate {
    /// Opens the roots binds may come from (as the process is before
    /// anything of the user's runs: the caller says it is ready only
    /// after this) and sets up Kiln's bridge network on the daemon, as
    /// root; an error if its pins directory cannot be made.
    pub async fn start(config: GateConfig) -> std::io::Result<DockerGate> {
        let pins = Pins::new(&config.pins_dir, config.bind_roots.clone())?;
        let bridge = set_up_bridge(&config).await;
        if let Err(reason) = &bridge {
            tracing::warn!(%reason, "docker gate: bridged containers are not offered");
        }
        Ok(DockerGate(Arc::new(Gate {
            config,
            pins: Mutex::new(pins),
            owned: Mutex::new(HashMap::new()),
            bridge,
        })))
    }

    /// Serves `listener` until the process ends.
    pub async fn serve(self, listener: UnixListener) {
        let gate = self.0;
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                // Out of descriptors, say: the executor's next request retries.
                Err(error) => {
                    tracing::warn!(%error, "docker gate: accepting a connection");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let peer = rustix::net::sockopt::socket_peercred(&stream).map(|cred| cred.uid.as_raw());
            if peer.ok() != Some(gate.config.client_uid) {
                tracing::warn!(?peer, "docker gate: refused a connection from another user");
                continue;
            }
            let gate = gate.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request| {
                    let gate = gate.clone();
                    async move { Ok::<_, Infallible>(gate.handle(request).await) }
                });
                let served = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .with_upgrades()
                    .await;
                if let Err(error) = served {
                    tracing::debug!(%error, "docker gate: a connection ended");
                }
            });
        }
    }
}

async fn set_up_bridge(config: &GateConfig) -> Result<(), String> {
    let socket = config.upstream.display().to_string();
    let client = bollard::Docker::connect_with_socket(&socket, 120, &crate::docker::API_VERSION)
        .map_err(|e| format!("cannot use {socket}: {e}"))?;
    crate::network::set_up_docker(&client, &config.nft_binary)
        .await
        .map(drop)
}

impl Gate {
    async fn handle(&self, request: Request<Incoming>) -> Response<Body> {
        let method = request.method().clone();
        let path = request.uri().path().to_string();
        match self.route(request).await {
            Ok(response) => response,
            Err(refusal) => {
                if let Refusal::Gate(StatusCode::FORBIDDEN, reason) = &refusal {
                    tracing::warn!(%method, path, reason, "docker gate: refused");
                }
                refusal.response()
            }
        }
    }

    async fn route(&self, request: Request<Incoming>) -> Result<Response<Body>, Refusal> {
        let method = request.method().clone();
        let path = request.uri().path();
        let path = path.strip_prefix(API_PREFIX).unwrap_or(path).to_string();
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let query = request.uri().query().unwrap_or("").to_string();
        let refused = || {
            Refusal::forbidden(format!(
                "{method} {path} is not a request Kiln's docker backend makes"
            ))
        };
        match (&method, segments.as_slice()) {
            (&Method::GET | &Method::HEAD, ["_ping"]) | (&Method::GET, ["version"] | ["info"]) => {
                self.forward(request, None).await
            }
            (&Method::GET, ["containers", "json"]) => {
                self.check_listing(&query)?;
                self.forward(request, None).await
            }
            (&Method::POST, ["containers", "create"]) => self.create(request).await,
            (&Method::POST, ["containers", id, op])
                if ["start", "attach", "wait", "stop", "kill"].contains(op) =>
            {
                self.on_container(request, id, Some(op), query).await
            }
            (&Method::GET, ["containers", id, "json"]) => {
                self.on_container(request, id, Some("json"), query).await
            }
            (&Method::DELETE, ["containers", id]) => {
                self.on_container(request, id, None, query).await
            }
            (&Method::POST, ["images", "create"]) => {
                check_image_create(&query)?;
                self.forward(request, None).await
            }
            (&Method::GET, ["images", .., "json"]) => self.forward(request, None).await,
            (&Method::GET, ["networks", name]) if *name == DOCKER_NETWORK => {
                if let Err(reason) = &self.bridge {
                    return Err(Refusal::Gate(
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("kiln docker gate: {DOCKER_NETWORK} is not set up: {reason}"),
                    ));
                }
                self.forward(request, None).await
            }
            _ => Err(refused()),
        }
    }

    /// Forwards `request`, operation `op` (None: removal) on this
    /// executor's container `given`, by its full id; gives the executor a
    /// runner's freezer once it starts, and forgets a container removed.
    async fn on_container(
        &self,
        request: Request<Incoming>,
        given: &str,
        op: Option<&str>,
        query: String,
    ) -> Result<Response<Body>, Refusal> {
        let id = self.owned_id(given).await?;
        let path = match op {
            Some(op) => format!("{API_PREFIX}/containers/{id}/{op}"),
            None => format!("{API_PREFIX}/containers/{id}"),
        };
        let response = self.forward(request, Some(api_uri(&path, &query)?)).await?;
        let status = response.status();
        match op {
            Some("start") if status.is_success() => {
                let runner = self.owned.lock().get(&id).is_some_and(|owned| owned.runner);
                if runner {
                    self.give_freezer(&id).await;
                }
            }
            None if status.is_success() || status == StatusCode::NOT_FOUND => {
                self.owned.lock().remove(&id);
            }
            _ => {}
        }
        Ok(response)
    }

    /// Listing containers: only this executor's.
    fn check_listing(&self, query: &str) -> Result<(), Refusal> {
        let wanted = format!("{OWNER_LABEL}={}", self.config.owner);
        let filters = form_urlencoded::parse(query.as_bytes())
            .find(|(key, _)| key == "filters")
            .and_then(|(_, value)| serde_json::from_str::<Value>(&value).ok());
        let labels = filters.as_ref().and_then(|f| f.get("label"));
        match labels {
            Some(Value::Array(labels)) if labels.len() == 1 && labels[0] == wanted.as_str() => {
                Ok(())
            }
            _ => Err(Refusal::forbidden(format!(
                "listing containers is allowed only with the filter label={wanted}"
            ))),
        }
    }

    /// The full id of this executor's container `given` (an id, a prefix
    /// or a name), asking the daemon once for one the gate did not create.
    async fn owned_id(&self, given: &str) -> Result<String, Refusal> {
        if self.owned.lock().contains_key(given) {
            return Ok(given.to_string());
        }
        if given.is_empty()
            || !given
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
        {
            return Err(Refusal::forbidden(format!(
                "{given:?} is not a container name"
            )));
        }
        let inspected = self.inspect(given).await?;
        let owner = inspected
            .pointer("/Config/Labels")
            .and_then(|labels| labels.get(OWNER_LABEL))
            .and_then(Value::as_str);
        let id = inspected.get("Id").and_then(Value::as_str).unwrap_or("");
        if owner != Some(self.config.owner.as_str()) || id.is_empty() {
            return Err(Refusal::forbidden(format!(
                "container {given} is not one of this executor's"
            )));
        }
        self.owned.lock().entry(id.to_string()).or_default();
        Ok(id.to_string())
    }

    /// The daemon's inspection of container `container`; its own answer
    /// when it has none (no such container: 404).
    async fn inspect(&self, container: &str) -> Result<Value, Refusal> {
        let request = Request::get(format!("{API_PREFIX}/containers/{container}/json"))
            .header(header::HOST, "docker")
            .body(full(Bytes::new()))
            .expect("a valid request");
        let response = self.send(request).await?;
        if !response.status().is_success() {
            return Err(Refusal::Daemon(Box::new(response.map(BodyExt::boxed))));
        }
        let body = read_whole(response.into_body()).await?;
        serde_json::from_slice(&body)
            .map_err(|e| Refusal::Gate(StatusCode::BAD_GATEWAY, format!("kiln docker gate: {e}")))
    }

    /// Gives the executor the freezer of runner container `id`, just
    /// started, so it freezes its runner between actions itself (a file
    /// write, where `docker pause` is a daemon round trip): what cgroup
    /// delegation gives a user, for that one cgroup.
    async fn give_freezer(&self, id: &str) {
        let inspected = self.inspect(id).await.ok();
        let file = inspected
            .as_ref()
            .and_then(|inspected| inspected.pointer("/State/Pid")?.as_u64())
            .and_then(|pid| u32::try_from(pid).ok())
            .filter(|pid| *pid > 0)
            .and_then(crate::warm::Freezer::file_of);
        let Some(file) = file else {
            tracing::debug!(
                container = id,
                "docker gate: no freezer to give for a runner"
            );
            return;
        };
        if let Err(error) = std::os::unix::fs::lchown(&file, Some(self.config.client_uid), None) {
            tracing::warn!(container = id, file = %file.display(), %error, "docker gate: could not give a runner's freezer");
        }
    }

    async fn create(&self, request: Request<Incoming>) -> Result<Response<Body>, Refusal> {
        let (mut parts, body) = request.into_parts();
        let body = read_whole(body).await?;
        let mut create: Value = serde_json::from_slice(&body).map_err(|e| {
            Refusal::Gate(
                StatusCode::BAD_REQUEST,
                format!("kiln docker gate: the create body: {e}"),
            )
        })?;
        let pins = self.check_create(&mut create)?;
        let runner = create
            .pointer("/Entrypoint/0")
            .and_then(Value::as_str)
            .is_some_and(|entrypoint| entrypoint == crate::warm::AGENT_PATH);
        let body = Bytes::from(serde_json::to_vec(&create).expect("a JSON value"));
        // The API version the body was checked against, whatever the path
        // said (an unversioned path means the daemon's latest).
        let query = parts.uri.query().unwrap_or("").to_string();
        parts.uri = api_uri(&format!("{API_PREFIX}/containers/create"), &query)?;
        parts.headers.remove(header::TRANSFER_ENCODING);
        parts
            .headers
            .insert(header::CONTENT_LENGTH, body.len().into());
        let response = self.send(Request::from_parts(parts, full(body))).await?;
        if response.status() != StatusCode::CREATED {
            return Ok(response.map(BodyExt::boxed));
        }
        let (parts, body) = response.into_parts();
        let body = read_whole(body).await?;
        let id = serde_json::from_slice::<Value>(&body)
            .ok()
            .and_then(|created| {
                created
                    .get("Id")
                    .and_then(Value::as_str)
                    .map(str::to_string)
            })
            .ok_or_else(|| {
                Refusal::Gate(
                    StatusCode::BAD_GATEWAY,
                    "kiln docker gate: a create answer without an Id".into(),
                )
            })?;
        self.owned.lock().insert(
            id,
            Owned {
                _pins: pins,
                runner,
            },
        );
        Ok(Response::from_parts(parts, full(body)))
    }

    /// Checks a container create body against the allow-list, pinning
    /// each bind's source in place.
    fn check_create(&self, create: &mut Value) -> Result<Vec<Pin>, Refusal> {
        const TOP: &[&str] = &[
            "Image",
            "Cmd",
            "Entrypoint",
            "Env",
            "WorkingDir",
            "User",
            "Labels",
            "AttachStdin",
            "AttachStdout",
            "AttachStderr",
            "Tty",
            "OpenStdin",
            "HostConfig",
        ];
        const HOST: &[&str] = &[
            "Mounts",
            "NetworkMode",
            "Init",
            "Memory",
            "MemorySwap",
            "NanoCpus",
            "PidsLimit",
            "LogConfig",
        ];
        const MOUNT: &[&str] = &["Type", "Source", "Target", "ReadOnly"];
        let top = create
            .as_object_mut()
            .ok_or_else(|| Refusal::forbidden("a create body that is not an object"))?;
        only(top, TOP, "")?;
        let owner = top
            .get("Labels")
            .and_then(|labels| labels.get(OWNER_LABEL))
            .and_then(Value::as_str);
        if owner != Some(self.config.owner.as_str()) {
            return Err(Refusal::forbidden(format!(
                "a container without the label {OWNER_LABEL}={}",
                self.config.owner
            )));
        }
        let Some(host) = top.get_mut("HostConfig").filter(|h| !h.is_null()) else {
            return Ok(Vec::new());
        };
        let host = host
            .as_object_mut()
            .ok_or_else(|| Refusal::forbidden("a HostConfig that is not an object"))?;
        only(host, HOST, "HostConfig.")?;
        match host.get("NetworkMode").and_then(Value::as_str) {
            None | Some("none") => {}
            Some(network) if network == DOCKER_NETWORK => {
                if let Err(reason) = &self.bridge {
                    return Err(Refusal::forbidden(format!(
                        "HostConfig.NetworkMode={DOCKER_NETWORK}: not set up here ({reason})"
                    )));
                }
            }
            Some(other) => {
                return Err(Refusal::forbidden(format!(
                    "HostConfig.NetworkMode={other}: only none and {DOCKER_NETWORK}"
                )))
            }
        }
        if let Some(log) = host.get("LogConfig").filter(|l| !l.is_null()) {
            if log.get("Type").and_then(Value::as_str) != Some("none")
                || log.get("Config").is_some_and(|c| !c.is_null())
            {
                return Err(Refusal::forbidden(
                    "HostConfig.LogConfig: only the none driver",
                ));
            }
        }
        let mut pins = Vec::new();
        let Some(mounts) = host.get_mut("Mounts").filter(|m| !m.is_null()) else {
            return Ok(pins);
        };
        let mounts = mounts
            .as_array_mut()
            .ok_or_else(|| Refusal::forbidden("HostConfig.Mounts that is not a list"))?;
        for mount in mounts {
            let mount = mount
                .as_object_mut()
                .ok_or_else(|| Refusal::forbidden("a mount that is not an object"))?;
            only(mount, MOUNT, "HostConfig.Mounts[].")?;
            if mount.get("Type").and_then(Value::as_str) != Some("bind") {
                return Err(Refusal::forbidden("a mount other than a bind"));
            }
            let source = mount
                .get("Source")
                .and_then(Value::as_str)
                .ok_or_else(|| Refusal::forbidden("a bind without a source"))?;
            let pin = self
                .pins
                .lock()
                .pin(std::path::Path::new(source))
                .map_err(|e| Refusal::forbidden(format!("the bind of {e}")))?;
            mount.insert(
                "Source".into(),
                Value::String(pin.path().display().to_string()),
            );
            pins.push(pin);
        }
        Ok(pins)
    }

    /// Forwards `request` to the daemon, at `to` if given, splicing the
    /// two connections once the daemon switches protocols (an attach).
    async fn forward(
        &self,
        mut request: Request<Incoming>,
        to: Option<Uri>,
    ) -> Result<Response<Body>, Refusal> {
        if let Some(uri) = to {
            *request.uri_mut() = uri;
        }
        let upgrading = request.headers().contains_key(header::UPGRADE);
        let downstream = upgrading.then(|| hyper::upgrade::on(&mut request));
        let mut response = self.send(request.map(BodyExt::boxed)).await?;
        if let (StatusCode::SWITCHING_PROTOCOLS, Some(downstream)) = (response.status(), downstream)
        {
            let upstream = hyper::upgrade::on(&mut response);
            tokio::spawn(async move {
                let (Ok(down), Ok(up)) = tokio::join!(downstream, upstream) else {
                    return;
                };
                let (mut down, mut up) = (TokioIo::new(down), TokioIo::new(up));
                let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
            });
        }
        Ok(response.map(BodyExt::boxed))
    }

    /// Sends `request` to the daemon on a connection of its own.
    async fn send(&self, request: Request<Body>) -> Result<Response<Incoming>, Refusal> {
        let unreachable = |e: &dyn std::fmt::Display| {
            Refusal::Gate(
                StatusCode::BAD_GATEWAY,
                format!(
                    "kiln docker gate: the daemon at {}: {e}",
                    self.config.upstream.display()
                ),
            )
        };
        let stream = UnixStream::connect(&self.config.upstream)
            .await
            .map_err(|e| unreachable(&e))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| unreachable(&e))?;
        tokio::spawn(async move {
            let _ = connection.with_upgrades().await;
        });
        sender
            .send_request(request)
            .await
            .map_err(|e| unreachable(&e))
    }
}

/// `path` with `query` (the request's, unchanged).
fn api_uri(path: &str, query: &str) -> Result<Uri, Refusal> {
    let uri = if query.is_empty() {
        path.to_string()
    } else {
        format!("{path}?{query}")
    };
    uri.parse()
        .map_err(|e| Refusal::forbidden(format!("{uri}: {e}")))
}

/// Refuses any setting of `object` outside `allowed` that is not null.
fn only(
    object: &serde_json::Map<String, Value>,
    allowed: &[&str],
    prefix: &str,
) -> Result<(), Refusal> {
    match object
        .iter()
        .find(|(key, value)| !value.is_null() && !allowed.contains(&key.as_str()))
    {
        Some((key, _)) => Err(Refusal::forbidden(format!(
            "{prefix}{key} is not a setting Kiln's containers use"
        ))),
        None => Ok(()),
    }
}

/// Pulls, and the probe's trial image imported under its own repository.
fn check_image_create(query: &str) -> Result<(), Refusal> {
    let params: HashMap<String, String> = form_urlencoded::parse(query.as_bytes())
        .map(|(key, value)| (key.into_owned(), value.into_owned()))
        .collect();
    match (params.get("fromImage"), params.get("fromSrc")) {
        (Some(_), None) => Ok(()),
        (None, Some(source))
            if source == "-"
                && params.get("repo").map(String::as_str) == Some(TRIAL_REPOSITORY) =>
        {
            Ok(())
        }
        _ => Err(Refusal::forbidden(format!(
            "an image import other than the probe's ({TRIAL_REPOSITORY})"
        ))),
    }
}

async fn read_whole<B>(body: B) -> Result<Bytes, Refusal>
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error:
        std::fmt::Display + Send + Sync + 'static + Into<Box<dyn std::error::Error + Send + Sync>>,
{
    Limited::new(body, MAX_BODY)
        .collect()
        .await
        .map(|collected| collected.to_bytes())
        .map_err(|e| {
            Refusal::Gate(
                StatusCode::BAD_REQUEST,
                format!("kiln docker gate: a body over {MAX_BODY} bytes, or cut short: {e}"),
            )
        })
}
