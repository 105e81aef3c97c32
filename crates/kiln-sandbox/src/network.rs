//! `dockerNetwork=bridge` under the sandbox: each action gets a network
//! namespace of its own, joined to the host by a veth pair, with outbound
//! access only. The host routes and masquerades the action's traffic to
//! other machines; an nftables table drops everything it sends to the host
//! itself (its loopback, its own addresses, where Kiln and other services
//! listen on 0.0.0.0) and to other actions.
//!
//! Why veth and nftables rather than a user-space stack (slirp4netns,
//! pasta): those make the action's connections from the host's own network
//! namespace, so they reach every service listening on the host's
//! addresses, and they cost a helper process per action. A veth pair is a
//! few netlink requests (see [`crate::netlink`]), and the filtering is done
//! by one table installed once, at start-up.
//!
//! Each action's host-side interface is `kiln-<slot>`, where the slot also
//! picks its /30 in the configured range: creating the interface claims the
//! slot (the kernel refuses a name in use), so executors sharing a host
//! cannot collide. Its alias names the executor process that owns it; at
//! start-up, interfaces left by a process that is gone (killed -9, say)
//! are deleted (an executor's own death deletes nothing while an orphaned
//! action keeps the namespace alive). When an action ends, the executor
//! closes the namespace's descriptor: its last reference once the action's
//! processes are gone, so the kernel deletes the namespace and the pair
//! with it, in the background and batched across namespaces (one
//! `RTM_DELLINK` per action cost the executor more CPU, and took 20-40 ms).
//! The executor waits for the host's end to go, off the action's path,
//! and deletes it outright if something else still holds the namespace
//! after [`DELETION_BOUND`]. The action has no CAP_NET_ADMIN, so it can
//! create nothing more.
//!
//! The same namespaces serve podman's actions (`kiln-container`), which
//! join one by the path of its descriptor in this process
//! ([`ActionNetwork::path`]).
//!
//! On a root executor the launchers make and wire them
//! ([`crate::launcher::wire`]), delete what outlived its release
//! ([`crate::launcher::unwire`]) and what gone executors left, so the
//! executor keeps neither CAP_SYS_ADMIN nor CAP_NET_ADMIN: a launcher
//! wires on its one thread, which then returns to the host's namespace,
//! sends the namespace's descriptor back, and deletes only an interface
//! named and aliased as its executor's. Elsewhere (the crate's tests) this process does it all.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

use crate::netlink::Socket;

/// Host-side interfaces of bridged actions are named this, then the slot.
pub const INTERFACE_PREFIX: &str = "kiln-";
/// The nftables table (family `inet`) holding the filtering and NAT rules.
pub const NFT_TABLE: &str = "kiln_sandbox";
/// Start of the alias of an interface Kiln made, followed by its owner.
const ALIAS_PREFIX: &str = "kiln-sandbox owner=";
/// The interface inside the action's namespace.
const ACTION_INTERFACE: &str = "eth0";
/// Most interfaces being deleted in the background at once; past this an
/// action's own deletion is waited for before its result is returned.
const MAX_BACKGROUND_DELETIONS: usize = 32;
/// How long an ended action's interface may take to go with its namespace
/// before it is deleted outright.
pub const DELETION_BOUND: Duration = Duration::from_secs(5);
/// How often a release looks whether the interface has gone.
const DELETION_CHECK_INTERVAL: Duration = Duration::from_millis(10);

/// The host's side of bridged sandbox networks, set up once at start-up.
#[derive(Debug)]
pub struct Outbound {
    /// First address of the range actions' /30s are carved from.
    base: u32,
    slots: u32,
    /// Where the next search for a free slot starts.
    next: AtomicU32,
    /// The alias this process gives its interfaces (pid and start time,
    /// so a recycled pid is not mistaken for the owner).
    alias: Arc<str>,
    /// Deleting a namespace and its interfaces takes the kernel 20-40 ms
    /// (RCU grace periods, waiting for the last references): waited for
    /// after the action's result is returned, a bounded number at a time.
    deletions: Arc<Semaphore>,
}

/// An action's network namespace, wired to the host. Dropped, it closes
/// the namespace's descriptor: once nothing else holds the namespace, the
/// kernel deletes it and the pair with it ([`Outbound::release`] waits
/// for that).
#[derive(Debug)]
pub struct ActionNetwork {
    namespace: OwnedFd,
    host_index: u32,
}

impl Outbound {
    /// Checks what bridged networks need (nft, forwarding), deletes
    /// interfaces left by executors that are gone, installs the nftables
    /// table for `cidr` with the `nft` command, and wires and unwires one
    /// namespace as a trial. Blocking. The error names what is missing.
    pub fn set_up(cidr: &str, nft: &Path) -> Result<Outbound, String> {
        let (base, prefix) = parse_cidr(cidr)?;
        let alias = format!(
            "{ALIAS_PREFIX}{}",
            process_identity(std::process::id()).ok_or("reading /proc/self/stat")?
        );
        let outbound = Outbound {
            base,
            slots: 1 << ((30 - prefix) as u32),
            next: AtomicU32::new(std::process::id()),
            alias: alias.into(),
            deletions: Arc::new(Semaphore::new(MAX_BACKGROUND_DELETIONS)),
        };
        if !host_prepared_for(cidr, nft) {
            prepare_host(cidr, nft)?;
        }
        match crate::launcher::reclaim_networks() {
            None => reclaim_leftovers(),
            Some(Ok(())) => {}
            Some(Err(e)) => {
                tracing::warn!(error = %e, "deleting the interfaces of executors that are gone")
            }
        }
        warn_about_loopback_resolver();
        let trial = outbound
            .connect()
            .map_err(|e| format!("wiring a trial network namespace: {e}"))?;
        let host_index = trial.host_index;
        drop(trial);
        await_deletion(host_index, &outbound.alias);
        Ok(outbound)
    }

    /// A fresh network namespace with `lo` up and `eth0` routed through
    /// the host. Blocking (a few netlink requests). Wired by a launcher
    /// where they are installed (a root executor keeps no CAP_SYS_ADMIN
    /// or CAP_NET_ADMIN for it), else in this process.
    pub fn connect(&self) -> io::Result<ActionNetwork> {
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let (namespace, host_index) = match crate::launcher::wire(self.base, self.slots, start) {
            Some(wired) => wired?,
            None => wire_on_a_thread(self.base, self.slots, start, &self.alias)?,
        };
        Ok(ActionNetwork {
            namespace,
            host_index,
        })
    }

    /// [`Outbound::connect`] for an action, on the blocking pool, its
    /// failure named by `what` (the backend): given back for another
    /// attempt when the launcher wiring it died with the request.
    pub async fn connect_for_action(
        self: &Arc<Self>,
        what: &str,
    ) -> Result<ActionNetwork, kiln_worker::RunError> {
        let outbound = Arc::clone(self);
        let connected = tokio::task::spawn_blocking(move || outbound.connect())
            .await
            .map_err(|e| kiln_worker::RunError::Internal(format!("{what}: {e}")))?;
        connected.map_err(|e| connect_failure(what, e))
    }

    /// Ends `network` once its action has ended: closes its namespace,
    /// which the kernel then deletes with the pair, and waits for the
    /// host's end to go (deleting it after [`DELETION_BOUND`]), in the
    /// background unless [`MAX_BACKGROUND_DELETIONS`] are under way
    /// already.
    pub async fn release(&self, network: ActionNetwork) {
        let host_index = network.host_index;
        drop(network);
        let alias = Arc::clone(&self.alias);
        let deleted = move || await_deletion(host_index, &alias);
        let Ok(permit) = Arc::clone(&self.deletions).try_acquire_owned() else {
            let _ = tokio::task::spawn_blocking(deleted).await;
            return;
        };
        tokio::task::spawn_blocking(move || {
            deleted();
            drop(permit);
        });
    }

    /// Returns once no interface of an ended action is still being deleted.
    pub async fn released(&self) {
        // Each deletion under way holds one permit.
        let _ = self
            .deletions
            .acquire_many(MAX_BACKGROUND_DELETIONS as u32)
            .await;
    }
}

/// What [`prepare_host`] did, for which range and `nft`.
static PREPARED: std::sync::Mutex<Option<(String, PathBuf)>> = std::sync::Mutex::new(None);

/// What bridged networks need of the host, which only root may change:
/// IPv4 forwarding on, and the nftables table for `cidr`, installed with
/// `nft`. Done by [`Outbound::set_up`], or before it by a root process
/// about to switch to a user of its own (see [`crate::run_as`]). Blocking.
pub fn prepare_host(cidr: &str, nft: &Path) -> Result<(), String> {
    enable_forwarding()?;
    install_ruleset(nft, NFT_TABLE, &ruleset(cidr))?;
    *PREPARED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner) =
        Some((cidr.to_string(), nft.to_path_buf()));
    Ok(())
}

/// Whether [`prepare_host`] has run in this process for `cidr` and `nft`.
fn host_prepared_for(cidr: &str, nft: &Path) -> bool {
    PREPARED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .as_ref()
        .is_some_and(|(done, with)| done == cidr && with == nft)
}

/// [`wire`] on a thread of its own, since unsharing moves only the
/// calling thread, which ends with the wiring.
fn wire_on_a_thread(base: u32, slots: u32, start: u32, alias: &str) -> io::Result<(OwnedFd, u32)> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| wire(base, slots, start, alias))
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the wiring thread panicked")))
    })
}

/// Wires a fresh network namespace (see [`Outbound::connect`]) for an
/// action of the executor whose interfaces carry `alias`, in slot `start`
/// or the next free one of the `slots` /30s from `base`, and leaves the
/// calling thread in it. Returns the namespace and the index of the
/// host's end of the pair. Blocking. What a launcher does for the
/// executor.
pub(crate) fn wire(base: u32, slots: u32, start: u32, alias: &str) -> io::Result<(OwnedFd, u32)> {
    let mut host = Socket::open()?;
    // SAFETY: unshare affects only this thread (see above for where it goes next).
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a constant NUL-terminated path; the result is checked.
    let namespace = unsafe {
        libc::open(
            c"/proc/thread-self/ns/net".as_ptr(),
            libc::O_RDONLY | libc::O_CLOEXEC,
        )
    };
    if namespace < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor owned by nobody else.
    let namespace = unsafe { OwnedFd::from_raw_fd(namespace) };
    let mut inside = Socket::open()?;
    // `lo` is always interface 1 of a new namespace.
    inside.set_up(1)?;
    let mut claimed = None;
    for offset in 0..slots {
        let slot = start.wrapping_add(offset) % slots;
        let name = format!("{INTERFACE_PREFIX}{slot}");
        match host.add_veth(&name, ACTION_INTERFACE, namespace.as_raw_fd()) {
            Ok(()) => {
                claimed = Some((slot, name));
                break;
            }
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => continue,
            Err(e) => return Err(io::Error::new(e.kind(), format!("creating {name}: {e}"))),
        }
    }
    let Some((slot, name)) = claimed else {
        return Err(io::Error::other(format!(
            "all {slots} sandbox network slots are in use"
        )));
    };
    // At once, so an executor killed from here on leaves an interface
    // the next start-up knows to reclaim.
    let host_index = host
        .set_alias(&name, alias)
        .and_then(|()| host.link_index(&name))
        .map_err(|e| io::Error::new(e.kind(), format!("the index of {name}: {e}")));
    let host_index = match host_index {
        Ok(index) => index,
        Err(e) => {
            let _ = host.delete_link_named(&name);
            return Err(e);
        }
    };
    let gateway = Ipv4Addr::from(base + slot * 4 + 1);
    let address = Ipv4Addr::from(base + slot * 4 + 2);
    let mut addresses = || -> io::Result<()> {
        host.add_address(host_index, gateway, 30)?;
        host.set_up(host_index)?;
        let inner_index = inside.link_index(ACTION_INTERFACE)?;
        inside.add_address(inner_index, address, 30)?;
        inside.set_up(inner_index)?;
        inside.add_default_route(gateway)
    };
    match addresses() {
        Ok(()) => Ok((namespace, host_index)),
        Err(e) => {
            // Deleting the host's end takes the action's with it.
            let _ = host.delete_link(host_index);
            Err(e)
        }
    }
}

/// A failed [`Outbound::connect`] as the action sees it, `what` naming
/// the step: given back for another attempt when the launcher wiring the
/// namespace died with the request, else the executor's failure.
pub fn connect_failure(what: &str, error: io::Error) -> kiln_worker::RunError {
    crate::launcher::failure(format!("{what}: {error}"), &error)
}

/// The alias Kiln gives the interfaces process `pid` owns; None once it
/// is gone.
pub(crate) fn alias_of(pid: u32) -> Option<String> {
    process_identity(pid).map(|identity| format!("{ALIAS_PREFIX}{identity}"))
}

/// Deletes the host's end of a bridged action's pair, `host_index`, and
/// with it the action's end, after checking that it is an interface the
/// executor whose interfaces carry `alias` made (its name and alias).
/// PermissionDenied otherwise, naming it. Blocking: the kernel takes 20-40
/// ms. What a launcher does for the executor (see
/// [`crate::launcher::unwire`]).
pub(crate) fn unwire(host_index: u32, alias: &str) -> io::Result<()> {
    let mut host = Socket::open()?;
    let link = host
        .link(host_index)?
        .ok_or_else(|| io::Error::from_raw_os_error(libc::ENODEV))?;
    if !link.name.starts_with(INTERFACE_PREFIX) || link.alias != alias {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "not deleting interface {} (index {host_index}): not one of this executor's \
                 bridged actions'",
                link.name
            ),
        ));
    }
    host.delete_link(host_index)
}

impl ActionNetwork {
    /// The namespace the action joins (`setns`).
    pub fn namespace(&self) -> RawFd {
        self.namespace.as_raw_fd()
    }

    /// The namespace's path for another program (podman's `--network
    /// ns:PATH`): its descriptor in this process, valid while this lives.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!(
            "/proc/{}/fd/{}",
            std::process::id(),
            self.namespace.as_raw_fd()
        ))
    }
}

/// Waits until interface `host_index`, of the executor whose interfaces
/// carry `alias`, has gone with its closed namespace; one still there
/// after [`DELETION_BOUND`] (something outside the action holds the
/// namespace) is deleted outright, through a launcher where they are
/// installed, else in this process. Blocking.
fn await_deletion(host_index: u32, alias: &str) {
    let deadline = Instant::now() + DELETION_BOUND;
    let gone = || -> io::Result<bool> {
        let mut host = Socket::open()?;
        loop {
            std::thread::sleep(DELETION_CHECK_INTERVAL);
            // Interface indices are handed out in turn, not reused at
            // once; another's at this index means ours is gone.
            match host.link(host_index)? {
                Some(link) if link.alias == alias => {}
                _ => return Ok(true),
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
        }
    };
    match gone() {
        Ok(true) => return,
        Ok(false) => tracing::warn!(
            index = host_index,
            "an ended action's network interface outlived its namespace by {DELETION_BOUND:?}; deleting it"
        ),
        Err(e) => tracing::warn!(index = host_index, error = %e, "watching an ended action's network interface go; deleting it"),
    }
    let deleted = crate::launcher::unwire(host_index).unwrap_or_else(|| unwire(host_index, alias));
    match deleted {
        Err(e) if e.raw_os_error() != Some(libc::ENODEV) => {
            tracing::warn!(index = host_index, error = %e, "deleting an action's network interface")
        }
        _ => {}
    }
}

/// `a.b.c.d/n` with room for at least one /30.
fn parse_cidr(cidr: &str) -> Result<(u32, u8), String> {
    let bad =
        || format!("network_cidr {cidr:?}: expected an IPv4 range like 10.213.0.0/16, at most /30");
    let (address, prefix) = cidr.split_once('/').ok_or_else(bad)?;
    let address: Ipv4Addr = address.parse().map_err(|_| bad())?;
    let prefix: u8 = prefix.parse().map_err(|_| bad())?;
    if !(8..=30).contains(&prefix) {
        return Err(bad());
    }
    let mask = u32::MAX << (32 - prefix);
    Ok((u32::from(address) & mask, prefix))
}

/// `pid:start time` of a live process, or None.
fn process_identity(pid: u32) -> Option<String> {
    // The start time is field 22.
    let fields = kiln_worker::process::stat_fields(pid).ok()?;
    Some(format!("{pid}:{}", fields.get(19)?))
}

/// Turns IPv4 forwarding on (bridged actions are routed by the host).
pub fn enable_forwarding() -> Result<(), String> {
    let path = "/proc/sys/net/ipv4/ip_forward";
    let current = std::fs::read_to_string(path).map_err(|e| format!("reading {path}: {e}"))?;
    if current.trim() != "1" {
        std::fs::write(path, "1").map_err(|e| format!("enabling IPv4 forwarding ({path}): {e}"))?;
        tracing::info!("enabled IPv4 forwarding for bridged action networks");
    }
    Ok(())
}

/// Host-side interfaces Kiln made, with their index and owner
/// (`pid:start time`). Asked over netlink: `/sys/class/net` lists the
/// namespace sysfs was mounted in, which need not be the executor's.
fn kiln_interfaces() -> Vec<(String, u32, String)> {
    let links = match Socket::open().and_then(|mut host| host.links()) {
        Ok(links) => links,
        Err(e) => {
            tracing::warn!("listing network interfaces: {e}");
            return Vec::new();
        }
    };
    links
        .into_iter()
        .filter(|link| link.name.starts_with(INTERFACE_PREFIX))
        .filter_map(|link| {
            let owner = link.alias.strip_prefix(ALIAS_PREFIX)?.to_string();
            Some((link.name, link.index, owner))
        })
        .collect()
}

/// The host-side interfaces of bridged actions that process `pid` runs
/// now (what a test checks is gone once its actions ended).
pub fn interfaces_owned_by(pid: u32) -> Vec<String> {
    let prefix = format!("{pid}:");
    kiln_interfaces()
        .into_iter()
        .filter(|(_, _, owner)| owner.starts_with(&prefix))
        .map(|(name, _, _)| name)
        .collect()
}

/// Interfaces whose owner process is gone; deleting each takes the
/// action's end with it.
fn leftover_interfaces() -> Vec<(String, u32)> {
    kiln_interfaces()
        .into_iter()
        .filter(|(_, _, owner)| {
            let alive = owner
                .split_once(':')
                .and_then(|(pid, _)| pid.parse().ok())
                .and_then(process_identity)
                .is_some_and(|identity| identity == *owner);
            !alive
        })
        .map(|(name, index, _)| (name, index))
        .collect()
}

/// Deletes the interfaces of executors that are gone (what a launcher
/// does for the executor, see [`crate::launcher::reclaim_networks`]).
pub(crate) fn reclaim_leftovers() {
    let leftovers = leftover_interfaces();
    if leftovers.is_empty() {
        return;
    }
    let Ok(mut host) = Socket::open() else { return };
    for (name, index) in leftovers {
        match host.delete_link(index) {
            Ok(()) => {
                tracing::info!(interface = %name, "deleted a sandbox network interface left by an executor that is gone")
            }
            Err(e) => {
                tracing::warn!(interface = %name, error = %e, "deleting a leftover sandbox network interface")
            }
        }
    }
}

/// The rules, replacing any earlier version of the table in one
/// transaction. Executors on one host share the table, so they must agree
/// on the range.
fn ruleset(cidr: &str) -> String {
    outbound_only_ruleset(NFT_TABLE, &format!("\"{INTERFACE_PREFIX}*\""), cidr, &[])
}

/// An nftables table `inet <table>` (replacing any earlier version of it)
/// that gives the actions behind `interfaces` (an nft interface match: a
/// quoted name, or a `"prefix*"` wildcard), whose addresses lie in `cidr`,
/// outbound access only: nothing to the host itself (checked before any
/// DNAT), no IPv6, no spoofed sources, nothing to each other, no
/// connection started into an action from anywhere (the host routes for
/// the actions' range once forwarding is on), the rest masqueraded out.
/// `forward` adds rules to the forward chain. The sandbox's table and the
/// container backends' are made by this one function, so they cannot
/// drift apart.
pub fn outbound_only_ruleset(
    table: &str,
    interfaces: &str,
    cidr: &str,
    forward: &[&str],
) -> String {
    let forward: String = forward.iter().map(|rule| format!("\t\t{rule}\n")).collect();
    format!(
        "table inet {table}\n\
         delete table inet {table}\n\
         table inet {table} {{\n\
         \tchain prerouting {{\n\
         \t\ttype filter hook prerouting priority raw; policy accept;\n\
         \t\tiifname {interfaces} fib daddr type local drop comment \"the host itself, before any DNAT\"\n\
         \t\tiifname {interfaces} meta nfproto ipv6 drop comment \"actions get IPv4 only\"\n\
         \t\tiifname {interfaces} ip saddr != {cidr} drop comment \"spoofed sources\"\n\
         \t}}\n\
         \tchain input {{\n\
         \t\ttype filter hook input priority filter; policy accept;\n\
         \t\tiifname {interfaces} drop\n\
         \t}}\n\
         \tchain forward {{\n\
         \t\ttype filter hook forward priority filter; policy accept;\n\
         \t\tiifname {interfaces} oifname {interfaces} drop comment \"other actions\"\n\
         \t\toifname {interfaces} ct state != {{ established, related }} drop comment \"nothing starts a connection into an action\"\n\
         {forward}\
         \t}}\n\
         \tchain postrouting {{\n\
         \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
         \t\tip saddr {cidr} oifname != {interfaces} masquerade\n\
         \t}}\n\
         }}\n"
    )
}

/// Installs `ruleset` (which replaces table `inet <table>` as a whole) with
/// the nftables command `binary`, in one transaction.
pub fn install_ruleset(binary: &Path, table: &str, ruleset: &str) -> Result<(), String> {
    let mut nft = Command::new(binary)
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            format!(
                "the nftables command `{}` (Debian package nftables) cannot be run: {e}",
                binary.display()
            )
        })?;
    {
        use std::io::Write as _;
        let mut stdin = nft.stdin.take().expect("piped");
        stdin
            .write_all(ruleset.as_bytes())
            .map_err(|e| format!("writing the nftables rules to nft: {e}"))?;
    }
    let output = nft
        .wait_with_output()
        .map_err(|e| format!("running nft: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "nft refused the rules of table inet {table}: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    Ok(())
}

/// Actions see the host's /etc/resolv.conf: a resolver on the host's
/// loopback (systemd-resolved's 127.0.0.53, say) is out of their reach.
fn warn_about_loopback_resolver() {
    let path = Path::new("/etc/resolv.conf");
    let Ok(text) = std::fs::read_to_string(path) else {
        return;
    };
    let loopback: Vec<&str> = text
        .lines()
        .filter_map(|line| line.trim().strip_prefix("nameserver"))
        .map(str::trim)
        .filter(|server| server.starts_with("127.") || *server == "::1")
        .collect();
    if !loopback.is_empty() {
        tracing::warn!(
            nameservers = ?loopback,
            "/etc/resolv.conf names resolvers on the host's loopback, which bridged sandbox actions cannot reach: they resolve names only through its other nameservers"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_range_is_parsed_to_its_network_address() {
        assert_eq!(parse_cidr("10.213.0.0/16"), Ok((0x0ad5_0000, 16)));
        assert_eq!(parse_cidr("10.213.7.9/24"), Ok((0x0ad5_0700, 24)));
        for bad in ["10.213.0.0", "10.213.0.0/31", "x/16", "10.213.0.0/4"] {
            let error = parse_cidr(bad).unwrap_err();
            assert!(error.contains("network_cidr"), "{error}");
        }
    }

    #[test]
    fn this_process_is_alive_under_its_own_identity() {
        let identity = process_identity(std::process::id()).unwrap();
        assert!(identity.starts_with(&format!("{}:", std::process::id())));
        assert!(identity.split(':').nth(1).unwrap().parse::<u64>().is_ok());
    }
}
