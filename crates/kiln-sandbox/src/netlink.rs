//! Just enough rtnetlink to wire an action's network namespace: create a
//! veth pair across two namespaces, address it, bring it up, add a default
//! route, delete it. Spoken directly over an `AF_NETLINK` socket, because
//! running `ip` for each step costs a process start (a millisecond or more)
//! each, and the whole wiring must stay within a few milliseconds.
//!
//! A socket talks to the network namespace of the thread that opened it,
//! for as long as it lives: that is how one thread configures both sides.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

const NLMSG_HEADER_BYTES: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;

const RTM_NEWLINK: u16 = 16;
const RTM_DELLINK: u16 = 17;
const RTM_NEWADDR: u16 = 20;
const RTM_NEWROUTE: u16 = 24;

const IFLA_IFNAME: u16 = 3;
const IFLA_LINKINFO: u16 = 18;
const IFLA_IFALIAS: u16 = 20;
const IFLA_NET_NS_FD: u16 = 28;
const IFLA_INFO_KIND: u16 = 1;
const IFLA_INFO_DATA: u16 = 2;
const VETH_INFO_PEER: u16 = 1;
const NLA_F_NESTED: u16 = 0x8000;

const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const RTA_GATEWAY: u16 = 5;
const RT_TABLE_MAIN: u8 = 254;
const RTPROT_BOOT: u8 = 3;
const RT_SCOPE_UNIVERSE: u8 = 0;
const RTN_UNICAST: u8 = 1;

/// One request being built: the header, a fixed family header, attributes.
struct Message {
    bytes: Vec<u8>,
}

impl Message {
    fn new(kind: u16, flags: u16) -> Message {
        let mut bytes = vec![0; NLMSG_HEADER_BYTES];
        bytes[4..6].copy_from_slice(&kind.to_ne_bytes());
        bytes[6..8].copy_from_slice(&(flags | NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
        Message { bytes }
    }

    /// `struct ifinfomsg`: family, type, index, flags, change mask.
    fn link_header(&mut self, index: i32, flags: u32, change: u32) {
        self.bytes
            .extend_from_slice(&[libc::AF_UNSPEC as u8, 0, 0, 0]);
        self.bytes.extend_from_slice(&index.to_ne_bytes());
        self.bytes.extend_from_slice(&flags.to_ne_bytes());
        self.bytes.extend_from_slice(&change.to_ne_bytes());
    }

    fn attribute(&mut self, kind: u16, data: &[u8]) {
        let length = 4 + data.len();
        self.bytes.extend_from_slice(&(length as u16).to_ne_bytes());
        self.bytes.extend_from_slice(&kind.to_ne_bytes());
        self.bytes.extend_from_slice(data);
        self.pad();
    }

    fn string(&mut self, kind: u16, value: &str) {
        let mut data = value.as_bytes().to_vec();
        data.push(0);
        self.attribute(kind, &data);
    }

    /// Starts a nested attribute; [`Message::end_nest`] sets its length.
    fn nest(&mut self, kind: u16) -> usize {
        let start = self.bytes.len();
        self.bytes.extend_from_slice(&[0, 0]);
        self.bytes
            .extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
        start
    }

    fn end_nest(&mut self, start: usize) {
        let length = (self.bytes.len() - start) as u16;
        self.bytes[start..start + 2].copy_from_slice(&length.to_ne_bytes());
    }

    fn pad(&mut self) {
        while !self.bytes.len().is_multiple_of(4) {
            self.bytes.push(0);
        }
    }

    fn finish(mut self, sequence: u32) -> Vec<u8> {
        let length = self.bytes.len() as u32;
        self.bytes[0..4].copy_from_slice(&length.to_ne_bytes());
        self.bytes[8..12].copy_from_slice(&sequence.to_ne_bytes());
        self.bytes
    }
}

/// A `NETLINK_ROUTE` socket bound to the network namespace of the thread
/// that opened it.
pub(crate) struct Socket {
    fd: OwnedFd,
    sequence: u32,
}

impl Socket {
    pub fn open() -> io::Result<Socket> {
        // SAFETY: socket has no memory preconditions; the result is checked.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Socket { fd, sequence: 0 })
    }

    /// Sends `message` and waits for the kernel's acknowledgement.
    fn request(&mut self, message: Message) -> io::Result<()> {
        self.sequence = self.sequence.wrapping_add(1);
        let bytes = message.finish(self.sequence);
        // SAFETY: sends a buffer of its own length.
        let sent =
            unsafe { libc::send(self.fd.as_raw_fd(), bytes.as_ptr().cast(), bytes.len(), 0) };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut reply = [0u8; 4096];
        // Replies to earlier requests were all read; bounded by the
        // kernel's answers to this one (an error or an ack).
        for _ in 0..16 {
            // SAFETY: receives into a buffer of its own length.
            let received = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    reply.as_mut_ptr().cast(),
                    reply.len(),
                    0,
                )
            };
            if received < 0 {
                let error = io::Error::last_os_error();
                if error.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(error);
            }
            let reply = &reply[..received as usize];
            if reply.len() < NLMSG_HEADER_BYTES + 4 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "a short netlink reply",
                ));
            }
            let kind = u16::from_ne_bytes([reply[4], reply[5]]);
            let sequence = u32::from_ne_bytes([reply[8], reply[9], reply[10], reply[11]]);
            if kind != NLMSG_ERROR || sequence != self.sequence {
                continue;
            }
            let code = i32::from_ne_bytes([reply[16], reply[17], reply[18], reply[19]]);
            return match code {
                0 => Ok(()),
                negative => Err(io::Error::from_raw_os_error(-negative)),
            };
        }
        Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "no netlink acknowledgement",
        ))
    }

    /// Creates a veth pair: `name` in this socket's namespace, `peer_name`
    /// in the namespace `peer_namespace` refers to. Fails with `EEXIST` if
    /// `name` is taken, so a name is a claim.
    pub fn add_veth(
        &mut self,
        name: &str,
        peer_name: &str,
        peer_namespace: RawFd,
    ) -> io::Result<()> {
        let mut message = Message::new(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL);
        message.link_header(0, 0, 0);
        message.string(IFLA_IFNAME, name);
        let info = message.nest(IFLA_LINKINFO);
        message.string(IFLA_INFO_KIND, "veth");
        let data = message.nest(IFLA_INFO_DATA);
        let peer = message.nest(VETH_INFO_PEER);
        message.link_header(0, 0, 0);
        message.string(IFLA_IFNAME, peer_name);
        message.attribute(IFLA_NET_NS_FD, &(peer_namespace as u32).to_ne_bytes());
        message.end_nest(peer);
        message.end_nest(data);
        message.end_nest(info);
        self.request(message)
    }

    /// Deletes link `index` (a veth's peer goes with it).
    pub fn delete_link(&mut self, index: u32) -> io::Result<()> {
        let mut message = Message::new(RTM_DELLINK, 0);
        message.link_header(index as i32, 0, 0);
        self.request(message)
    }

    /// Deletes link `name`.
    pub fn delete_link_named(&mut self, name: &str) -> io::Result<()> {
        let mut message = Message::new(RTM_DELLINK, 0);
        message.link_header(0, 0, 0);
        message.string(IFLA_IFNAME, name);
        self.request(message)
    }

    pub fn set_up(&mut self, index: u32) -> io::Result<()> {
        let up = libc::IFF_UP as u32;
        let mut message = Message::new(RTM_NEWLINK, 0);
        message.link_header(index as i32, up, up);
        self.request(message)
    }

    /// Sets the alias of link `name` (the kernel ignores one given when
    /// the link is created).
    pub fn set_alias(&mut self, name: &str, alias: &str) -> io::Result<()> {
        let mut message = Message::new(RTM_NEWLINK, 0);
        message.link_header(0, 0, 0);
        message.string(IFLA_IFNAME, name);
        message.string(IFLA_IFALIAS, alias);
        self.request(message)
    }

    pub fn add_address(&mut self, index: u32, address: Ipv4Addr, prefix: u8) -> io::Result<()> {
        let mut message = Message::new(RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL);
        // struct ifaddrmsg: family, prefix length, flags, scope, index.
        message
            .bytes
            .extend_from_slice(&[libc::AF_INET as u8, prefix, 0, RT_SCOPE_UNIVERSE]);
        message.bytes.extend_from_slice(&index.to_ne_bytes());
        message.attribute(IFA_LOCAL, &address.octets());
        message.attribute(IFA_ADDRESS, &address.octets());
        self.request(message)
    }

    pub fn add_default_route(&mut self, gateway: Ipv4Addr) -> io::Result<()> {
        let mut message = Message::new(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL);
        // struct rtmsg: family, dst/src length, tos, table, protocol,
        // scope, type, flags.
        message.bytes.extend_from_slice(&[
            libc::AF_INET as u8,
            0,
            0,
            0,
            RT_TABLE_MAIN,
            RTPROT_BOOT,
            RT_SCOPE_UNIVERSE,
            RTN_UNICAST,
        ]);
        message.bytes.extend_from_slice(&0u32.to_ne_bytes());
        message.attribute(RTA_GATEWAY, &gateway.octets());
        self.request(message)
    }
}
