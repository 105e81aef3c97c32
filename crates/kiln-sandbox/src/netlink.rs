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
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;

const RTM_NEWLINK: u16 = 16;
const RTM_DELLINK: u16 = 17;
const RTM_GETLINK: u16 = 18;
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

/// `struct ifinfomsg`'s size.
const IFINFOMSG_BYTES: usize = 16;

/// A link as [`Socket::links`] and [`Socket::link`] describe it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Link {
    pub name: String,
    pub index: u32,
    /// Empty when it has none.
    pub alias: String,
}

impl Link {
    /// The link a reply of `kind` with `body` describes, if it is one.
    fn read(kind: u16, body: &[u8]) -> Option<Link> {
        if kind != RTM_NEWLINK || body.len() < IFINFOMSG_BYTES {
            return None;
        }
        let index = i32::from_ne_bytes([body[4], body[5], body[6], body[7]]);
        let mut link = Link {
            name: String::new(),
            index: index as u32,
            alias: String::new(),
        };
        for (kind, data) in attributes(&body[IFINFOMSG_BYTES..]) {
            let text = || {
                let text = data.split(|&b| b == 0).next().unwrap_or_default();
                String::from_utf8_lossy(text).into_owned()
            };
            match kind {
                IFLA_IFNAME => link.name = text(),
                IFLA_IFALIAS => link.alias = text(),
                _ => {}
            }
        }
        Some(link)
    }
}

/// The attributes (type without flags, data) in `bytes`, up to the first
/// malformed one.
fn attributes(mut bytes: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        let header = bytes.first_chunk::<4>()?;
        let length = u16::from_ne_bytes([header[0], header[1]]) as usize;
        let kind = u16::from_ne_bytes([header[2], header[3]]) & !NLA_F_NESTED;
        if length < 4 || length > bytes.len() {
            return None;
        }
        let data = &bytes[4..length];
        bytes = &bytes[length.next_multiple_of(4).min(bytes.len())..];
        Some((kind, data))
    })
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
        self.exchange(message, |_, _| {})
    }

    /// Sends `message`, hands each reply to it (its type and the bytes
    /// after the netlink header) to `reply`, and returns at the kernel's
    /// acknowledgement, error, or the end of a dump.
    fn exchange(&mut self, message: Message, mut reply: impl FnMut(u16, &[u8])) -> io::Result<()> {
        self.sequence = self.sequence.wrapping_add(1);
        let bytes = message.finish(self.sequence);
        // SAFETY: sends a buffer of its own length.
        let sent =
            unsafe { libc::send(self.fd.as_raw_fd(), bytes.as_ptr().cast(), bytes.len(), 0) };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        // A link's description with its statistics fits; a longer datagram
        // is cut, which loses only attributes after the fixed headers.
        let mut buffer = vec![0u8; 16 << 10];
        // Replies to earlier requests were all read; bounded by the
        // kernel's answers to this one (replies, then an error, an ack or
        // a dump's end). A dump of links takes one datagram per few links.
        for _ in 0..4096 {
            // SAFETY: receives into a buffer of its own length.
            let received = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    buffer.as_mut_ptr().cast(),
                    buffer.len(),
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
            let mut datagram = &buffer[..received as usize];
            while datagram.len() >= NLMSG_HEADER_BYTES {
                let length =
                    u32::from_ne_bytes([datagram[0], datagram[1], datagram[2], datagram[3]])
                        as usize;
                let kind = u16::from_ne_bytes([datagram[4], datagram[5]]);
                let sequence =
                    u32::from_ne_bytes([datagram[8], datagram[9], datagram[10], datagram[11]]);
                let end = length.clamp(NLMSG_HEADER_BYTES, datagram.len());
                let body = &datagram[NLMSG_HEADER_BYTES..end];
                datagram = &datagram[end.next_multiple_of(4).min(datagram.len())..];
                if sequence != self.sequence {
                    continue;
                }
                if kind != NLMSG_ERROR && kind != NLMSG_DONE {
                    reply(kind, body);
                    continue;
                }
                let Some(code) = body.first_chunk::<4>() else {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "a short netlink reply",
                    ));
                };
                return match i32::from_ne_bytes(*code) {
                    0 => Ok(()),
                    negative => Err(io::Error::from_raw_os_error(-negative)),
                };
            }
        }
        Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "no netlink acknowledgement",
        ))
    }

    /// Every link of this socket's namespace: name, index and alias.
    pub fn links(&mut self) -> io::Result<Vec<Link>> {
        let mut message = Message::new(RTM_GETLINK, NLM_F_DUMP);
        message.link_header(0, 0, 0);
        let mut links = Vec::new();
        self.exchange(message, |kind, body| links.extend(Link::read(kind, body)))?;
        Ok(links)
    }

    /// Link `index` of this socket's namespace; None when there is none.
    pub fn link(&mut self, index: u32) -> io::Result<Option<Link>> {
        let mut message = Message::new(RTM_GETLINK, 0);
        message.link_header(index as i32, 0, 0);
        let mut link = None;
        match self.exchange(message, |kind, body| link = Link::read(kind, body)) {
            Ok(()) => Ok(link),
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The index of link `name` in this socket's namespace (which, unlike
    /// `/sys/class/net`, need not be the namespace sysfs was mounted in).
    pub fn link_index(&mut self, name: &str) -> io::Result<u32> {
        let mut message = Message::new(RTM_GETLINK, 0);
        message.link_header(0, 0, 0);
        message.string(IFLA_IFNAME, name);
        let mut index = None;
        self.exchange(message, |kind, body| {
            // struct ifinfomsg: family, pad, type (2), index (4), ...
            if let (RTM_NEWLINK, Some(header)) = (kind, body.first_chunk::<8>()) {
                index = Some(i32::from_ne_bytes([
                    header[4], header[5], header[6], header[7],
                ]));
            }
        })?;
        match index {
            Some(index) if index > 0 => Ok(index as u32),
            _ => Err(io::Error::other(format!(
                "no index for link {name} in the reply"
            ))),
        }
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
