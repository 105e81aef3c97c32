//! Kiln's operator view, served by the same binary on its own plain-HTTP
//! port (`--monitoring-listen`):
//!
//! - [`metrics`]: every Prometheus metric, event metrics observed as they
//!   happen and state read from the components at each scrape;
//! - [`rpc`]: the tower layer that counts and times every gRPC call;
//! - [`http`]: the endpoint (`/metrics`, `/healthz`, `/readyz`, the UI and
//!   its downloads) and [`http::Readiness`];
//! - `ui`: the server-rendered pages, their stylesheet and the small
//!   script that keeps them live.
//!
//! It reads the store, the CAS and the scheduler only through their public
//! snapshots and counters; nothing here changes what they do.
#![forbid(unsafe_code)]

pub mod http;
pub mod metrics;
pub mod rpc;
mod ui;

pub use http::{Monitor, Readiness, UiSources};
pub use metrics::{Metrics, StateCollector};
pub use rpc::RpcMetricsLayer;
