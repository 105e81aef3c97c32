//! A network namespace standing for a machine outside the host, and the
//! probes the network tests of the sandbox and of the container backends
//! share (included by path from both crates' tests).
#![allow(dead_code)]

use std::net::{Ipv4Addr, TcpListener};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// Host-side interfaces of bridged sandbox (and podman) actions.
const INTERFACE_PREFIX: &str = "kiln-";

pub fn ip(arguments: &[&str]) {
    let output = Command::new("ip")
        .args(arguments)
        .output()
        .expect("running ip (iproute2)");
    assert!(
        output.status.success(),
        "ip {arguments:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A network namespace standing for a machine outside the host, joined to
/// the host by a veth pair in a private /30: the host's end is `.1`, the
/// outside's `.2`. Deleted on drop.
pub struct Outside {
    pub name: String,
    pub host_interface: String,
    pub host_address: Ipv4Addr,
    pub address: Ipv4Addr,
}

impl Outside {
    pub fn new() -> Outside {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        // Per process too: the sandbox's and the containers' tests may run
        // at once.
        let net = 224 + (pid % 32) as u8;
        let outside = Outside {
            name: format!("kiln-test-outside-{pid}-{n}"),
            host_interface: format!("kto{}h{n}", pid % 100_000),
            host_address: Ipv4Addr::new(192, 168, net, (n * 4 % 256 + 1) as u8),
            address: Ipv4Addr::new(192, 168, net, (n * 4 % 256 + 2) as u8),
        };
        let inner = format!("kto{}o{n}", pid % 100_000);
        ip(&["netns", "add", &outside.name]);
        ip(&[
            "link",
            "add",
            &outside.host_interface,
            "type",
            "veth",
            "peer",
            "name",
            &inner,
            "netns",
            &outside.name,
        ]);
        let host_cidr = format!("{}/30", outside.host_address);
        let cidr = format!("{}/30", outside.address);
        ip(&["addr", "add", &host_cidr, "dev", &outside.host_interface]);
        ip(&["link", "set", &outside.host_interface, "up"]);
        ip(&["-n", &outside.name, "addr", "add", &cidr, "dev", &inner]);
        ip(&["-n", &outside.name, "link", "set", &inner, "up"]);
        ip(&["-n", &outside.name, "link", "set", "lo", "up"]);
        outside
    }

    /// `ADDRESS:port` for every address of the host an action might try:
    /// loopback, each global address (eth0's, docker0's, ...) and this
    /// link's host end; sorted, each once.
    pub fn host_targets(&self, port: u16) -> Vec<String> {
        let mut targets = vec![
            format!("127.0.0.1:{port}"),
            format!("{}:{port}", self.host_address),
        ];
        targets.extend(
            host_addresses()
                .into_iter()
                .map(|address| format!("{address}:{port}")),
        );
        targets.sort();
        targets.dedup();
        targets
    }

    /// A listener on the outside address, made inside its namespace (a
    /// socket stays in the namespace it was created in).
    pub fn listen(&self) -> TcpListener {
        let path = PathBuf::from("/run/netns").join(&self.name);
        let address = self.address;
        std::thread::spawn(move || {
            let namespace = std::fs::File::open(path).unwrap();
            // SAFETY: setns on an open namespace file, in a thread that
            // ends right after.
            let joined = unsafe { libc::setns(namespace.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(joined, 0, "{}", std::io::Error::last_os_error());
            TcpListener::bind((address, 0)).unwrap()
        })
        .join()
        .unwrap()
    }
}

impl Drop for Outside {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_interface])
            .output();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// The host's own IPv4 addresses other than loopback and the sandbox's
/// interfaces (eth0's, docker0's, ...).
pub fn host_addresses() -> Vec<Ipv4Addr> {
    let output = Command::new("ip")
        .args(["-4", "-o", "addr", "show", "scope", "global"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|line| {
            !line
                .split_whitespace()
                .nth(1)
                .is_some_and(|name| name.starts_with(INTERFACE_PREFIX))
        })
        .filter_map(|line| {
            let words: Vec<&str> = line.split_whitespace().collect();
            let at = words.iter().position(|w| *w == "inet")?;
            words.get(at + 1)?.split('/').next()?.parse().ok()
        })
        .collect()
}

/// A script that tries a TCP connection to each `ip:port` at once, giving
/// each up to 5 s (dropped packets are never answered), and prints
/// `reached ADDRESS` or `blocked ADDRESS` for each, sorted.
pub fn connect_script(targets: &[String]) -> String {
    let attempts: Vec<String> = targets
        .iter()
        .map(|target| {
            let (address, port) = target.split_once(':').unwrap();
            format!(
                "(if timeout 5 bash -c 'exec 3<>/dev/tcp/{address}/{port}' 2>/dev/null; \
                 then echo reached {target}; else echo blocked {target}; fi) > out.{address}.{port} &"
            )
        })
        .collect();
    format!("{}\nwait\ncat out.* | sort", attempts.join("\n"))
}

/// Whether `listener` has a connection waiting (anything that reached it).
pub fn was_reached(listener: &TcpListener) -> bool {
    listener.set_nonblocking(true).unwrap();
    listener.accept().is_ok()
}
