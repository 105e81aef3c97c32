//! The monitoring endpoint: plain HTTP on its own port, serving
//! `/metrics`, `/healthz`, `/readyz` and, on the server, the web UI and
//! the downloads its pages link to.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Extension;
use axum::Router;
use kiln_auth::{Authenticator, Caller, Capability, Refusal};
use kiln_cas::wire::parse_digest;
use kiln_cas::Storage;
use kiln_proto::reapi;
use kiln_scheduler::report::OperationDetail;
use kiln_scheduler::Scheduler;
use kiln_store::DigestFunction;
use parking_lot::Mutex;

use crate::metrics::Metrics;
use crate::ui;

/// Whether the process can do its work: `/readyz` answers 200 only when
/// ready, else 503 with the reason. A warning (e.g. serving the network
/// without authentication) is added to every `/healthz` and `/readyz`
/// answer while its source reports one.
pub struct Readiness {
    not_ready: Mutex<Option<String>>,
    warning: Mutex<Option<WarningSource>>,
}

/// Asked at each health check: the warning to show now, if any.
pub type WarningSource = Box<dyn Fn() -> Option<String> + Send + Sync>;

impl Readiness {
    /// Not ready yet, for `reason`.
    pub fn new(reason: impl Into<String>) -> Arc<Readiness> {
        Arc::new(Readiness {
            not_ready: Mutex::new(Some(reason.into())),
            warning: Mutex::new(None),
        })
    }

    pub fn set_warning_source(&self, source: WarningSource) {
        *self.warning.lock() = Some(source);
    }

    /// `warning: …` lines to append to a health answer.
    fn warning_lines(&self) -> String {
        match self.warning.lock().as_ref().and_then(|source| source()) {
            Some(warning) => format!("warning: {warning}\n"),
            None => String::new(),
        }
    }

    pub fn set_ready(&self) {
        *self.not_ready.lock() = None;
    }

    pub fn set_not_ready(&self, reason: impl Into<String>) {
        *self.not_ready.lock() = Some(reason.into());
    }

    /// `Err(reason)` while not ready.
    pub fn check(&self) -> Result<(), String> {
        match &*self.not_ready.lock() {
            None => Ok(()),
            Some(reason) => Err(reason.clone()),
        }
    }
}

/// What the server's UI reads.
#[derive(Clone)]
pub struct UiSources {
    pub storage: Storage,
    pub scheduler: Option<Arc<Scheduler>>,
}

/// Where the server's UI and state metrics read from, once the store is
/// open (`None` before, and always on an executor process).
pub type SharedSources = Arc<Mutex<Option<UiSources>>>;

/// Everything the endpoint serves from.
pub struct Monitor {
    pub metrics: Arc<Metrics>,
    pub readiness: Arc<Readiness>,
    ui: SharedSources,
    /// The gRPC port's authentication, shared: once it requires keys,
    /// everything but `/healthz` and `/readyz` needs one with
    /// `cache-read` (the pages show commands, logs and outputs).
    auth: std::sync::OnceLock<Arc<Authenticator>>,
}

impl Monitor {
    /// The server's monitor: RPC and execution metrics, state metrics and
    /// the UI once [`Monitor::attach`] gives it the storage (and
    /// scheduler); not ready until then.
    pub fn for_server(data_dir: std::path::PathBuf) -> Arc<Monitor> {
        let ui = SharedSources::default();
        let metrics = Metrics::new().with_collector(crate::metrics::StateCollector {
            sources: ui.clone(),
            data_dir,
        });
        Arc::new(Monitor {
            metrics,
            readiness: Readiness::new("opening the store"),
            ui,
            auth: std::sync::OnceLock::new(),
        })
    }

    /// A monitor of `metrics` only (an executor process): no UI.
    pub fn for_metrics(metrics: Arc<Metrics>, readiness: Arc<Readiness>) -> Arc<Monitor> {
        Arc::new(Monitor {
            metrics,
            readiness,
            ui: SharedSources::default(),
            auth: std::sync::OnceLock::new(),
        })
    }

    /// Gives the UI and the state metrics what they read.
    pub fn attach(&self, sources: UiSources) {
        *self.ui.lock() = Some(sources);
    }

    /// Lets go of what [`Monitor::attach`] gave (the server is stopping):
    /// the UI answers as an executor's would and state metrics go empty.
    pub fn detach(&self) {
        *self.ui.lock() = None;
    }

    /// Checks callers as `authenticator` does, from now on.
    pub fn require_auth(&self, authenticator: Arc<Authenticator>) {
        let _ = self.auth.set(authenticator);
    }

    fn sources(&self) -> Option<UiSources> {
        self.ui.lock().clone()
    }
}

type Shared = Arc<Monitor>;

/// Serves `monitor` on `listener` until the process ends.
pub fn serve(listener: tokio::net::TcpListener, monitor: Shared) -> tokio::task::JoinHandle<()> {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/", get(overview))
        .route("/operations", get(operations))
        .route("/build", get(build))
        .route("/operation/{id}", get(operation))
        .route("/operation/{id}/{log}", get(log))
        .route("/blob/{hash}/{size}", get(blob))
        .route("/static/style.css", get(style))
        .route("/static/live.js", get(script))
        .fallback(|| async { (StatusCode::NOT_FOUND, "not found\n") })
        .layer(axum::middleware::from_fn_with_state(
            monitor.clone(),
            authenticate,
        ))
        .layer(axum::middleware::from_fn(server_timing))
        .with_state(monitor);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "the monitoring endpoint stopped");
        }
    })
}

/// Binds `addr` for [`serve`], naming it in the error.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("binding the monitoring endpoint {addr}: {e}"))
}

/// Adds `Server-Timing: app;dur=MS` to every answer: the time the server
/// spent producing it (for a streamed download, until its headers).
/// Lets a request through if the server's authentication does: health
/// checks always; the rest with a credential that may `cache-read`, sent
/// as on the gRPC port (`x-buildbuddy-api-key`, `authorization: Bearer`)
/// or as a browser's Basic password (the user name is not read).
async fn authenticate(
    State(monitor): State<Shared>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let path = request.uri().path();
    let auth = monitor.auth.get();
    let Some(auth) = auth.filter(|_| !matches!(path, "/healthz" | "/readyz")) else {
        return next.run(request).await;
    };
    match auth.authenticate(request.headers()) {
        Ok(caller) if caller.may(Capability::CacheRead) => {
            let mut request = request;
            request.extensions_mut().insert(caller);
            next.run(request).await
        }
        Ok(_) => (
            StatusCode::FORBIDDEN,
            "this page needs a key with the capability cache-read\n",
        )
            .into_response(),
        Err(refusal) => {
            let message = match refusal {
                Refusal::Unauthenticated(message) | Refusal::PermissionDenied(message) => message,
            };
            (
                StatusCode::UNAUTHORIZED,
                [(
                    header::WWW_AUTHENTICATE,
                    "Basic realm=\"kiln: an API key as the password\", charset=\"UTF-8\"",
                )],
                format!("{message}\n"),
            )
                .into_response()
        }
    }
}

async fn server_timing(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let started = std::time::Instant::now();
    let mut response = next.run(request).await;
    let spent = started.elapsed().as_secs_f64() * 1000.0;
    if let Ok(value) = HeaderValue::from_str(&format!("app;dur={spent:.2}")) {
        response.headers_mut().insert("server-timing", value);
    }
    response
}

async fn metrics(State(monitor): State<Shared>) -> Response {
    let text = monitor.metrics.encode();
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

async fn healthz(State(monitor): State<Shared>) -> String {
    format!("ok\n{}", monitor.readiness.warning_lines())
}

async fn readyz(State(monitor): State<Shared>) -> Response {
    let stopped = monitor
        .sources()
        .and_then(|sources| sources.storage.store().stopped());
    let ready = match stopped {
        Some(why) => Err(why),
        None => monitor.readiness.check(),
    };
    let warnings = monitor.readiness.warning_lines();
    match ready {
        Ok(()) => (StatusCode::OK, format!("ready\n{warnings}")).into_response(),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {reason}\n{warnings}"),
        )
            .into_response(),
    }
}

/// The answer of an executor process's endpoint to a UI path.
fn metrics_only() -> Response {
    (
        StatusCode::NOT_FOUND,
        "this process serves /metrics, /healthz and /readyz only\n",
    )
        .into_response()
}

/// A page: the whole document, or only its `<main>` for the live-update
/// script (which sends `x-kiln-fragment`). Pages are never cached, and
/// their content may run no script but the UI's own.
fn page(headers: &HeaderMap, status: StatusCode, page: ui::Page) -> Response {
    let fragment = headers.contains_key("x-kiln-fragment");
    let body = if fragment {
        page.main.into_string()
    } else {
        ui::document(&page).into_string()
    };
    let mut response = (status, body).into_response();
    let response_headers = response.headers_mut();
    response_headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    response_headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response_headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; script-src 'self'; frame-ancestors 'none'",
        ),
    );
    response_headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    if page.live {
        response_headers.insert("x-kiln-live", HeaderValue::from_static("1"));
    }
    response
}

fn no_scheduler() -> ui::Page {
    ui::not_found("Remote execution is disabled on this server, so it keeps no operations.")
}

/// The organisation of the page's caller: its key's, or empty where no
/// key is needed (open access).
fn org_of(caller: Option<Extension<Caller>>) -> Arc<str> {
    caller.map_or_else(|| Arc::from(""), |Extension(caller)| caller.org)
}

async fn overview(
    State(monitor): State<Shared>,
    caller: Option<Extension<Caller>>,
    headers: HeaderMap,
) -> Response {
    let Some(sources) = monitor.sources() else {
        return metrics_only();
    };
    page(
        &headers,
        StatusCode::OK,
        ui::overview(
            sources.scheduler.as_deref(),
            &sources.storage,
            &org_of(caller),
        ),
    )
}

async fn operations(
    State(monitor): State<Shared>,
    caller: Option<Extension<Caller>>,
    headers: HeaderMap,
    Query(filters): Query<ui::Filters>,
) -> Response {
    let Some(sources) = monitor.sources() else {
        return metrics_only();
    };
    match &sources.scheduler {
        Some(scheduler) => page(
            &headers,
            StatusCode::OK,
            ui::operations(scheduler, &filters, &org_of(caller)),
        ),
        None => page(&headers, StatusCode::NOT_FOUND, no_scheduler()),
    }
}

#[derive(serde::Deserialize)]
struct BuildQuery {
    id: String,
}

async fn build(
    State(monitor): State<Shared>,
    caller: Option<Extension<Caller>>,
    headers: HeaderMap,
    Query(query): Query<BuildQuery>,
) -> Response {
    let Some(sources) = monitor.sources() else {
        return metrics_only();
    };
    match &sources.scheduler {
        Some(scheduler) => page(
            &headers,
            StatusCode::OK,
            ui::build(scheduler, &query.id, &org_of(caller)),
        ),
        None => page(&headers, StatusCode::NOT_FOUND, no_scheduler()),
    }
}

/// Operation `id` if it belongs to organisation `org`.
fn operation_of(sources: &UiSources, id: &str, org: &str) -> Option<OperationDetail> {
    sources
        .scheduler
        .as_ref()
        .and_then(|s| s.operation(&format!("operations/{id}")))
        .filter(|detail| *detail.summary.org == *org)
}

async fn operation(
    State(monitor): State<Shared>,
    caller: Option<Extension<Caller>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let Some(sources) = monitor.sources() else {
        return metrics_only();
    };
    let Some(detail) = operation_of(&sources, &id, &org_of(caller)) else {
        return page(
            &headers,
            StatusCode::NOT_FOUND,
            ui::not_found("No such operation is kept: the server keeps the most recent finished operations only."),
        );
    };
    let blobs = ui::action_blobs(&sources.storage, &detail).await;
    page(&headers, StatusCode::OK, ui::action(&detail, &blobs))
}

#[derive(serde::Deserialize)]
struct LogQuery {
    #[serde(default)]
    offset: u64,
}

async fn log(
    State(monitor): State<Shared>,
    caller: Option<Extension<Caller>>,
    headers: HeaderMap,
    Path((id, name)): Path<(String, String)>,
    Query(query): Query<LogQuery>,
) -> Response {
    let Some(sources) = monitor.sources() else {
        return metrics_only();
    };
    let detail = operation_of(&sources, &id, &org_of(caller));
    let result = detail
        .as_ref()
        .and_then(|d| d.response.as_ref())
        .and_then(|r| r.result.clone());
    let (Some(detail), Some(result)) = (detail, result) else {
        return page(
            &headers,
            StatusCode::NOT_FOUND,
            ui::not_found("No finished operation with that id is kept."),
        );
    };
    let (raw, digest) = match name.as_str() {
        "stdout" => (&result.stdout_raw, result.stdout_digest.as_ref()),
        "stderr" => (&result.stderr_raw, result.stderr_digest.as_ref()),
        _ => {
            return page(
                &headers,
                StatusCode::NOT_FOUND,
                ui::not_found("Logs are stdout and stderr."),
            )
        }
    };
    let log_page = ui::log_page(&sources.storage, raw, digest, query.offset).await;
    page(&headers, StatusCode::OK, ui::log(&detail, &name, log_page))
}

#[derive(serde::Deserialize)]
struct BlobQuery {
    #[serde(default)]
    name: String,
}

/// A blob from the CAS as a download, streamed in 1 MiB reads.
async fn blob(
    State(monitor): State<Shared>,
    caller: Option<Extension<Caller>>,
    Path((hash, size)): Path<(String, i64)>,
    Query(query): Query<BlobQuery>,
) -> Response {
    let Some(sources) = monitor.sources() else {
        return metrics_only();
    };
    let wire = reapi::Digest {
        hash,
        size_bytes: size,
    };
    let digest = match parse_digest(DigestFunction::Sha256, Some(&wire), "blob") {
        Ok(d) => d,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response(),
    };
    // Another organisation's blob is missing, as an absent one is.
    let visible = match sources.storage.visible_to(&org_of(caller), &digest).await {
        Ok(visible) => visible,
        Err(e) => return (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
    };
    let opened = match visible {
        true => sources.storage.open(&digest).await,
        false => Ok(None),
    };
    let blob = match opened {
        Ok(Some(blob)) => blob,
        Ok(None) => {
            return (
                StatusCode::NOT_FOUND,
                format!("blob {digest} is not in the CAS\n"),
            )
                .into_response()
        }
        Err(e) => return (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
    };
    const CHUNK: u64 = 1 << 20;
    let total = blob.len();
    let blob = Arc::new(blob);
    let chunks = futures::stream::unfold(0u64, move |at| {
        let blob = blob.clone();
        async move {
            if at >= total {
                return None;
            }
            let len = CHUNK.min(total - at);
            let read = tokio::task::spawn_blocking(move || blob.read_range(at, len))
                .await
                .map_err(std::io::Error::other)
                .and_then(|r| r);
            Some((read, at + len))
        }
    });
    // Only a safe subset of the name reaches the header.
    let name: String = query
        .name
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || "._-+".contains(*c))
        .take(128)
        .collect();
    let name = if name.is_empty() {
        digest.hash_hex()
    } else {
        name
    };
    let mut response = axum::body::Body::from_stream(chunks).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(total));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    if let Ok(value) = HeaderValue::from_str(&format!("attachment; filename=\"{name}\"")) {
        headers.insert(header::CONTENT_DISPOSITION, value);
    }
    response
}

async fn style() -> Response {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        include_str!("ui/style.css"),
    )
        .into_response()
}

async fn script() -> Response {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        include_str!("ui/live.js"),
    )
        .into_response()
}
