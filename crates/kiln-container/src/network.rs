//! `dockerNetwork=bridge` for containers: the sandbox's guarantee, a
//! private network namespace with outbound access only. The host itself
//! (its loopback, its own addresses, the gateway, where Kiln and every
//! service on 0.0.0.0 listen) and other actions are out of reach. The
//! runtimes' default bridges give neither: there, concurrent actions reach
//! each other and the host through the gateway.
//!
//! - **podman** joins a namespace by path (`--network ns:PATH`), so its
//!   actions get exactly a sandbox action's network: a namespace wired by
//!   [`kiln_sandbox::network::Outbound`] (veth, a /30 of the sandbox
//!   range, the `kiln_sandbox` nftables table), passed as the path of the
//!   executor's descriptor for it (`/proc/<pid>/fd/<fd>`: nothing to
//!   mount, nothing left behind). It is also cheaper than podman's own
//!   bridge: a few netlink requests instead of netavark's set-up and
//!   tear-down.
//! - **docker** cannot join a namespace by path. Its actions run on a
//!   user-defined bridge network of Kiln's, [`DOCKER_NETWORK`] (interface
//!   [`DOCKER_BRIDGE`], created at probe if absent, `enable_icc=false` for
//!   daemons that manage iptables), and one nftables table,
//!   [`NFT_TABLE`], installed at probe: it drops what the bridge sends to
//!   the host itself (before any DNAT), to itself (other actions; bridged
//!   frames reach nftables through `br_netfilter`, which is required: this
//!   kernel's nftables bridge family cannot match a bridge by name), to the
//!   sandbox's and podman's actions (`kiln-*`), and any IPv6; it lets
//!   nothing start a connection into the bridge, drops spoofed sources and
//!   masquerades the rest. Docker's embedded DNS (127.0.0.11, inside the
//!   container's own namespace) keeps working with these rules: checked by
//!   resolving another container's name and an outside one.
//!
//! What it costs over `dockerNetwork=off` (benchmarks/container-network.md):
//! podman +2.5 to +2.7 ms per action (netavark's bridge had cost +218 to
//! +273 ms); docker +137 to +146 ms, all of it dockerd's own per-container
//! network set-up (its default bridge cost +69 to +138 ms), since the rules
//! are installed once. A Kiln-prepared namespace would be as cheap for
//! docker, but docker has no way to join one.
//!
//! Where a backend cannot set this up (no `nft`, no `br_netfilter`, ...),
//! `dockerNetwork=bridge` actions are refused naming the property and the
//! reason, and actions that leave it unset run without network: never on
//! the runtime's default bridge.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use bollard::models::NetworkCreateRequest;
use bollard::Docker as Client;

/// The docker network `dockerNetwork=bridge` actions run on.
pub const DOCKER_NETWORK: &str = "kiln-actions";
/// Its bridge interface: not `kiln-…`, which names the sandbox's veths
/// (whose rules would drop its traffic as spoofed).
pub const DOCKER_BRIDGE: &str = "kiln_actions";
/// The nftables table (family `inet`) that isolates [`DOCKER_BRIDGE`].
pub const NFT_TABLE: &str = "kiln_containers";
/// The label Kiln's docker network carries.
const NETWORK_LABEL: &str = "kiln.network";
const BRIDGE_NAME_OPTION: &str = "com.docker.network.bridge.name";

/// What the container backends need to isolate bridged actions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkConfig {
    /// The sandbox's range (`--sandbox-network-cidr`), which podman's
    /// actions share: a /30 each.
    pub cidr: String,
    /// The nftables command.
    pub nft_binary: PathBuf,
}

impl Default for NetworkConfig {
    fn default() -> NetworkConfig {
        NetworkConfig {
            cidr: "10.213.0.0/16".into(),
            nft_binary: "nft".into(),
        }
    }
}

/// Makes sure [`DOCKER_NETWORK`] exists with its bridge named
/// [`DOCKER_BRIDGE`], and installs the rules that isolate it; the
/// network's IPv4 subnet, or why bridged docker actions cannot be
/// isolated here.
pub async fn set_up_docker(client: &Client, nft: &Path) -> Result<String, String> {
    let subnet = docker_subnet(client, true).await?;
    let nft = nft.to_path_buf();
    let rules = docker_ruleset(&subnet);
    tokio::task::spawn_blocking(move || {
        bridge_netfilter()?;
        kiln_sandbox::network::enable_forwarding()?;
        kiln_sandbox::network::install_ruleset(&nft, NFT_TABLE, &rules)
    })
    .await
    .map_err(|e| format!("setting up {NFT_TABLE}: {e}"))??;
    Ok(subnet)
}

/// The subnet of [`DOCKER_NETWORK`] as the docker gate set it up (see
/// [`crate::gate`], which answers why not if it could not), for a backend
/// that is not root and reaches the daemon through the gate: the rules
/// are the gate's to install.
pub async fn gated_docker(client: &Client) -> Result<String, String> {
    docker_subnet(client, false).await
}

/// [`DOCKER_NETWORK`]'s IPv4 subnet, once checked to be Kiln's bridge;
/// created first if absent and `create`.
async fn docker_subnet(client: &Client, create: bool) -> Result<String, String> {
    let network = match client.inspect_network(DOCKER_NETWORK, None).await {
        Ok(network) => network,
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) if create => {
            let created = client.create_network(docker_network_request()).await;
            match created {
                Ok(_)
                // 409: another executor created it meanwhile.
                | Err(bollard::errors::Error::DockerResponseServerError {
                    status_code: 409, ..
                }) => {}
                Err(e) => return Err(format!("creating the docker network {DOCKER_NETWORK}: {e}")),
            }
            client
                .inspect_network(DOCKER_NETWORK, None)
                .await
                .map_err(|e| format!("inspecting the docker network {DOCKER_NETWORK}: {e}"))?
        }
        Err(e) => {
            return Err(format!(
                "inspecting the docker network {DOCKER_NETWORK}: {e}"
            ))
        }
    };
    let bridge = network
        .options
        .as_ref()
        .and_then(|options| options.get(BRIDGE_NAME_OPTION));
    if network.driver.as_deref() != Some("bridge")
        || bridge.map(String::as_str) != Some(DOCKER_BRIDGE)
    {
        return Err(format!(
            "the docker network {DOCKER_NETWORK} exists but is not a bridge named {DOCKER_BRIDGE} \
             (driver {:?}, {BRIDGE_NAME_OPTION}={bridge:?}); remove it and Kiln creates its own",
            network.driver
        ));
    }
    let subnets: Vec<String> = network
        .ipam
        .and_then(|ipam| ipam.config)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|config| config.subnet)
        .filter(|subnet| subnet.parse::<Ipv4Cidr>().is_ok())
        .collect();
    let [subnet] = subnets.as_slice() else {
        return Err(format!(
            "the docker network {DOCKER_NETWORK} should have one IPv4 subnet, it has {subnets:?}"
        ));
    };
    Ok(subnet.clone())
}

fn docker_network_request() -> NetworkCreateRequest {
    NetworkCreateRequest {
        name: DOCKER_NETWORK.into(),
        driver: Some("bridge".into()),
        enable_ipv6: Some(false),
        options: Some(HashMap::from([
            (BRIDGE_NAME_OPTION.into(), DOCKER_BRIDGE.into()),
            // What a daemon that manages iptables enforces itself.
            (
                "com.docker.network.bridge.enable_icc".into(),
                "false".into(),
            ),
        ])),
        labels: Some(HashMap::from([(NETWORK_LABEL.into(), "1".into())])),
        ..Default::default()
    }
}

/// Frames bridged between two containers never reach the IP hooks unless
/// `br_netfilter` passes them on: it must be loaded, and on for IPv4 and
/// IPv6 (as dockerd itself sets it when it manages iptables).
fn bridge_netfilter() -> Result<(), String> {
    for family in ["iptables", "ip6tables"] {
        let path = format!("/proc/sys/net/bridge/bridge-nf-call-{family}");
        let current = std::fs::read_to_string(&path).map_err(|e| {
            format!(
                "reading {path}: {e}; the br_netfilter kernel module must be loaded \
                 (`modprobe br_netfilter`) so traffic between containers passes nftables"
            )
        })?;
        if current.trim() != "1" {
            std::fs::write(&path, "1").map_err(|e| format!("enabling {path}: {e}"))?;
            tracing::info!(path, "enabled br_netfilter for the docker actions' bridge");
        }
    }
    Ok(())
}

/// The rules isolating [`DOCKER_BRIDGE`], whose containers have addresses
/// in `subnet`, replacing any earlier version of the table: the
/// sandbox's, plus no way to the sandbox's and podman's actions.
fn docker_ruleset(subnet: &str) -> String {
    let bridge = format!("\"{DOCKER_BRIDGE}\"");
    let sandboxes = format!("\"{}*\"", kiln_sandbox::network::INTERFACE_PREFIX);
    kiln_sandbox::network::outbound_only_ruleset(
        NFT_TABLE,
        &bridge,
        subnet,
        &[&format!(
            "iifname {bridge} oifname {sandboxes} drop comment \"sandbox and podman actions\""
        )],
    )
}

/// Just enough to tell an IPv4 subnet from an IPv6 one.
struct Ipv4Cidr;

impl std::str::FromStr for Ipv4Cidr {
    type Err = ();
    fn from_str(text: &str) -> Result<Ipv4Cidr, ()> {
        let (address, prefix) = text.split_once('/').ok_or(())?;
        address.parse::<std::net::Ipv4Addr>().map_err(|_| ())?;
        prefix.parse::<u8>().ok().filter(|p| *p <= 32).ok_or(())?;
        Ok(Ipv4Cidr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_ipv4_subnets_are_taken() {
        assert!("172.18.0.0/16".parse::<Ipv4Cidr>().is_ok());
        assert!("fd00::/64".parse::<Ipv4Cidr>().is_err());
        assert!("172.18.0.0/33".parse::<Ipv4Cidr>().is_err());
    }

    #[test]
    fn the_docker_rules_name_the_bridge_and_its_subnet() {
        let rules = docker_ruleset("172.18.0.0/16");
        assert!(rules.contains("iifname \"kiln_actions\" ip saddr != 172.18.0.0/16 drop"));
        assert!(rules.contains("iifname \"kiln_actions\" oifname \"kiln-*\" drop"));
        assert!(!DOCKER_BRIDGE.starts_with(kiln_sandbox::network::INTERFACE_PREFIX));
    }
}
