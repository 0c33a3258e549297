//! Bounded session tables: what a router with `max_sessions` does when the table is full.
//!
//! A session is one TCP or UDP flow from the router's LAN out of its WAN: one conntrack entry,
//! holding one NAT mapping (under endpoint-independent mapping, several flows of one socket
//! share a mapping). ICMP and hairpinned flows are not counted.
//!
//! * `drop`: the kernel does it. The router's forward chain counts new outbound flows with
//!   `ct count over N` and drops the flow that would be number N + 1 ([`crate::nft::render`]).
//! * `evict-oldest`: no kernel feature evicts conntrack entries, so an evictor does it. In the
//!   router's namespace an iptables rule queues the first packets of new outbound flows
//!   (`FORWARD -i lan -o wan --ctstate NEW -j NFQUEUE`, which runs before the NAT) to a thread
//!   that keeps the live flows oldest first. When a new flow makes them more than N, it
//!   prunes flows whose conntrack entry is gone (`conntrack -L`), then deletes the oldest flow's
//!   entry (`conntrack -D`) and its entries in the lab's mapping tables
//!   ([`crate::nft::forget_mapping`]), and only then lets the new flow's packet go on. The old
//!   external port then reaches nobody, and the old socket's next packet is a new flow with a
//!   new mapping.
//!
//! Both count a flow until its conntrack entry is gone (its idle timeout, or a flush); TCP
//! flows in TIME_WAIT or CLOSE no longer count, as the kernel's connlimit does not count them.
//! The evictor's rule uses `--queue-bypass`: if the evictor is not running, flows pass
//! unbounded rather than not at all (the self-test would show the table missing).

use std::collections::{HashSet, VecDeque};
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use nfq::{Queue, Verdict};

use crate::defaults;
use crate::nat::{NatConfig, SessionOverflow};
use crate::netns;
use crate::nft;
use crate::queue::{QueueWorker, StartError, Worker};
use crate::topology::{LAN_BRIDGE, NodePlan};

/// Bytes of each queued packet the evictor needs: an IPv4 header with options (at most 60)
/// and the two ports after it.
const COPY_RANGE: u16 = 64;
/// How long the evictor sleeps when no packet waits (nfq exposes no file descriptor to wait
/// on); the first packet of a new flow waits at most this long on top of the eviction.
const IDLE_TICK: Duration = Duration::from_millis(2);

/// Transport protocol of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// UDP.
    Udp,
    /// TCP.
    Tcp,
}

impl Protocol {
    /// The name conntrack and nft use.
    pub fn name(self) -> &'static str {
        match self {
            Self::Udp => "udp",
            Self::Tcp => "tcp",
        }
    }

    fn from_number(n: u8) -> Option<Self> {
        match n {
            6 => Some(Self::Tcp),
            17 => Some(Self::Udp),
            _ => None,
        }
    }
}

/// A session by its original-direction tuple, as the router's LAN side sees it (before NAT).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Flow {
    /// TCP or UDP.
    pub protocol: Protocol,
    /// The LAN endpoint.
    pub internal: SocketAddrV4,
    /// The endpoint on the other side of the router.
    pub remote: SocketAddrV4,
}

/// The flow of an IPv4 packet, read from its IP header on (as NFQUEUE hands packets over).
/// `None` for anything but TCP or UDP, for later fragments (they carry no ports) and for
/// packets too short to say. Never panics, whatever the bytes.
pub fn flow_of_packet(packet: &[u8]) -> Option<Flow> {
    let first = *packet.first()?;
    if first >> 4 != 4 {
        return None;
    }
    let header_len = usize::from(first & 0x0f) * 4;
    if header_len < 20 {
        return None;
    }
    let fragment_offset = u16::from_be_bytes([*packet.get(6)?, *packet.get(7)?]) & 0x1fff;
    if fragment_offset != 0 {
        return None;
    }
    let protocol = Protocol::from_number(*packet.get(9)?)?;
    let addr = |at: usize| -> Option<Ipv4Addr> {
        let b = packet.get(at..at + 4)?;
        Some(Ipv4Addr::new(b[0], b[1], b[2], b[3]))
    };
    let port = |at: usize| -> Option<u16> {
        let b = packet.get(at..at + 2)?;
        Some(u16::from_be_bytes([b[0], b[1]]))
    };
    Some(Flow {
        protocol,
        internal: SocketAddrV4::new(addr(12)?, port(header_len)?),
        remote: SocketAddrV4::new(addr(16)?, port(header_len + 2)?),
    })
}

/// One TCP or UDP entry of `conntrack -L` (or `-D`) output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConntrackEntry {
    /// The original-direction tuple.
    pub flow: Flow,
    /// The reply direction's destination port: the external port of a translated flow.
    pub reply_port: u16,
    /// A TCP flow in TIME_WAIT or CLOSE, which the session table no longer counts.
    pub closed: bool,
}

/// Reads one line of conntrack's default output format, e.g.
/// `udp 17 29 src=192.168.1.2 dst=11.99.0.11 sport=40000 dport=3478 src=11.99.0.11
/// dst=11.99.0.10 sport=3478 dport=20000 [ASSURED] mark=0 use=1`. `None` for other protocols
/// and for lines of another shape.
pub fn parse_conntrack_line(line: &str) -> Option<ConntrackEntry> {
    let mut words = line.split_whitespace();
    let protocol = match words.next()? {
        "udp" => Protocol::Udp,
        "tcp" => Protocol::Tcp,
        _ => return None,
    };
    const KEYS: [&str; 4] = ["src", "dst", "sport", "dport"];
    let mut closed = false;
    // The original direction's src, dst, sport and dport, then the reply's.
    let mut fields: Vec<&str> = Vec::with_capacity(8);
    for word in words {
        if matches!(word, "TIME_WAIT" | "CLOSE") {
            closed = true;
        }
        if let Some((key, value)) = word.split_once('=')
            && fields.len() < 8
            && key == KEYS[fields.len() % 4]
        {
            fields.push(value);
        }
    }
    let [src, dst, sport, dport, _, _, _, reply_dport] = fields[..] else {
        return None;
    };
    Some(ConntrackEntry {
        flow: Flow {
            protocol,
            internal: SocketAddrV4::new(src.parse().ok()?, sport.parse().ok()?),
            remote: SocketAddrV4::new(dst.parse().ok()?, dport.parse().ok()?),
        },
        reply_port: reply_dport.parse().ok()?,
        closed,
    })
}

/// The live sessions of one router, oldest first: the evictor's state, without any I/O.
#[derive(Debug)]
pub(crate) struct LiveFlows {
    max: usize,
    flows: VecDeque<Flow>,
    known: HashSet<Flow>,
}

impl LiveFlows {
    pub(crate) fn new(max: u32) -> Self {
        Self {
            max: usize::try_from(max).unwrap_or(usize::MAX),
            flows: VecDeque::new(),
            known: HashSet::new(),
        }
    }

    /// Records a flow whose first packet was just seen; `false` if it is known already (a
    /// flow stays "new" to conntrack until its first reply, so its packets come again).
    pub(crate) fn admit(&mut self, flow: Flow) -> bool {
        if !self.known.insert(flow) {
            return false;
        }
        self.flows.push_back(flow);
        true
    }

    /// Whether more flows are recorded than the table holds.
    pub(crate) fn is_over(&self) -> bool {
        self.flows.len() > self.max
    }

    /// Forgets the flows that are not in `live` (conntrack's listing), except `newest`, which
    /// conntrack lists only once its first packet has left the router.
    pub(crate) fn retain_live(&mut self, live: &HashSet<Flow>, newest: Flow) {
        self.flows.retain(|f| *f == newest || live.contains(f));
        self.known.retain(|f| *f == newest || live.contains(f));
    }

    /// Removes and returns the oldest flows beyond the table's size.
    pub(crate) fn overflow(&mut self) -> Vec<Flow> {
        let mut evicted = Vec::new();
        while self.flows.len() > self.max {
            let Some(oldest) = self.flows.pop_front() else {
                break;
            };
            self.known.remove(&oldest);
            evicted.push(oldest);
        }
        evicted
    }

    /// Whether a recorded flow uses the same mapping as `flow` (possible under endpoint-
    /// independent and address-dependent mapping), which must then stay.
    pub(crate) fn shares_mapping(&self, nat: &NatConfig, flow: &Flow) -> bool {
        let key = nft::mapping_key(nat, flow.internal, flow.remote);
        self.flows.iter().any(|f| {
            f.protocol == flow.protocol && nft::mapping_key(nat, f.internal, f.remote) == key
        })
    }
}

/// The iptables rules (arguments after `iptables -t filter`) that feed a router's evictor.
pub fn rules(node: &NodePlan) -> Vec<Vec<String>> {
    let queue = defaults::EVICTOR_QUEUE.to_string();
    ["udp", "tcp"]
        .into_iter()
        .map(|p| {
            [
                "-A",
                "FORWARD",
                "-i",
                LAN_BRIDGE,
                "-o",
                node.uplink.iface.as_str(),
                "-p",
                p,
                "-m",
                "conntrack",
                "--ctstate",
                "NEW",
                "-j",
                "NFQUEUE",
                "--queue-num",
                queue.as_str(),
                "--queue-bypass",
            ]
            .map(str::to_owned)
            .to_vec()
        })
        .collect()
}

/// A running evictor for one router. Dropping it removes its iptables rules and stops it.
#[derive(Debug)]
pub struct Evictor {
    _worker: QueueWorker,
}

/// An evictor that could not be started.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EvictorError {
    /// The router has no table to evict from.
    #[error("router {0} has no session table with evict-oldest overflow")]
    NotEvicting(String),
    /// The queue could not be opened or bound.
    #[error("session evictor in {netns}: nfqueue")]
    Queue {
        /// The namespace.
        netns: String,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The iptables rules could not be installed.
    #[error("session evictor in {netns}")]
    Rules {
        /// The namespace.
        netns: String,
        /// The failed command.
        #[source]
        source: netns::CommandError,
    },
}

impl Evictor {
    /// Starts the evictor of router `node`, which must have `max_sessions` with
    /// `evict-oldest` overflow.
    pub fn start(node: &NodePlan) -> Result<Self, EvictorError> {
        let not_evicting = || EvictorError::NotEvicting(node.name.clone());
        let nat = node.router.as_ref().ok_or_else(not_evicting)?.nat;
        let (Some(max), SessionOverflow::EvictOldest) = (nat.max_sessions, nat.session_overflow)
        else {
            return Err(not_evicting());
        };
        let worker = QueueWorker::start(Worker {
            netns: node.netns.clone(),
            thread: format!("evictor {}", node.name),
            what: "session evictor",
            table: "filter",
            rules: rules(node),
            flush: &["-w", "-t", "filter", "-F", "FORWARD"],
            body: move |stop: &AtomicBool, ready: &mpsc::SyncSender<io::Result<()>>| {
                let result = run(&nat, max, stop, ready);
                if let Err(e) = &result {
                    tracing::error!(
                        "session evictor failed: {e}; new flows now pass without a bound"
                    );
                }
                result
            },
        })
        .map_err(|e| match e {
            StartError::Queue(source) => EvictorError::Queue {
                netns: node.netns.clone(),
                source,
            },
            StartError::Rules(source) => EvictorError::Rules {
                netns: node.netns.clone(),
                source,
            },
        })?;
        Ok(Self { _worker: worker })
    }
}

fn run(
    nat: &NatConfig,
    max: u32,
    stop: &AtomicBool,
    ready: &mpsc::SyncSender<io::Result<()>>,
) -> io::Result<()> {
    let queue = defaults::EVICTOR_QUEUE;
    let setup = || -> io::Result<Queue> {
        let mut q = Queue::open()?;
        q.bind(queue)?;
        q.set_copy_range(queue, COPY_RANGE)?;
        q.set_queue_max_len(queue, defaults::DELAY_QUEUE_MAX_LEN)?;
        // A full queue lets packets through instead of dropping them.
        q.set_fail_open(queue, true)?;
        q.set_nonblocking(true);
        Ok(q)
    };
    let mut q = crate::queue::open(ready, setup)?;
    let mut table = LiveFlows::new(max);
    while !stop.load(Ordering::Relaxed) {
        match q.recv() {
            Ok(msg) => {
                if let Some(flow) = flow_of_packet(msg.get_payload())
                    && table.admit(flow)
                    && table.is_over()
                {
                    make_room(nat, &mut table, flow);
                }
                crate::queue::release(&mut q, msg, Verdict::Accept)?;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => thread::sleep(IDLE_TICK),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Brings the table back to its size after `newest` came in: forgets flows conntrack no
/// longer has, then evicts the oldest until the rest fit. Commands run in the calling
/// thread's namespace (the router's).
fn make_room(nat: &NatConfig, table: &mut LiveFlows, newest: Flow) {
    match netns::run(None, "conntrack", &["-L"], None) {
        Ok(listing) => {
            let live: HashSet<Flow> = listing
                .lines()
                .filter_map(parse_conntrack_line)
                .filter(|e| !e.closed)
                .map(|e| e.flow)
                .collect();
            table.retain_live(&live, newest);
        }
        Err(e) => tracing::warn!("listing conntrack: {}", crate::chain(&e)),
    }
    for victim in table.overflow() {
        evict(nat, table, &victim);
    }
}

/// Deletes `victim`'s conntrack entry and, unless a live flow shares it, its mapping.
fn evict(nat: &NatConfig, table: &LiveFlows, victim: &Flow) {
    let (sport, dport) = (victim.internal.port(), victim.remote.port());
    let args = [
        "-D".to_owned(),
        "-p".to_owned(),
        victim.protocol.name().to_owned(),
        "-s".to_owned(),
        victim.internal.ip().to_string(),
        "--sport".to_owned(),
        sport.to_string(),
        "-d".to_owned(),
        victim.remote.ip().to_string(),
        "--dport".to_owned(),
        dport.to_string(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    // conntrack prints what it deleted, with the reply tuple and so the external port; it
    // fails when the entry is gone already, and then there is nothing of it to forget.
    let external_port = match netns::run(None, "conntrack", &args, None) {
        Ok(deleted) => deleted
            .lines()
            .filter_map(parse_conntrack_line)
            .find(|e| e.flow == *victim)
            .map(|e| e.reply_port),
        Err(e) => {
            tracing::debug!("evicting {victim:?}: {}", crate::chain(&e));
            None
        }
    };
    let Some(external_port) = external_port else {
        return;
    };
    if table.shares_mapping(nat, victim) {
        return;
    }
    for command in nft::forget_mapping(
        nat,
        victim.protocol.name(),
        victim.internal,
        victim.remote,
        external_port,
    ) {
        // An entry may have expired or never been learnt (a flow without a reply yet).
        if let Err(e) = netns::run(None, "nft", &[&command], None) {
            tracing::debug!("{command}: {}", crate::chain(&e));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nat::Preset;

    fn flow(port: u16) -> Flow {
        Flow {
            protocol: Protocol::Udp,
            internal: SocketAddrV4::new(Ipv4Addr::new(192, 168, 1, 2), port),
            remote: SocketAddrV4::new(Ipv4Addr::new(11, 99, 0, 11), 3478),
        }
    }

    /// IPv4 + UDP from 192.168.1.2:40000 to 11.99.0.11:3478 (checksums zero: nobody checks).
    const UDP_PACKET: [u8; 28] = [
        0x45, 0x00, 0x00, 0x1c, // version 4, IHL 5, length 28
        0x12, 0x34, 0x40, 0x00, // id, don't fragment, offset 0
        0x40, 0x11, 0x00, 0x00, // TTL 64, protocol 17 (UDP), checksum
        192, 168, 1, 2, // source
        11, 99, 0, 11, // destination
        0x9c, 0x40, 0x0d, 0x96, // ports 40000 → 3478
        0x00, 0x08, 0x00, 0x00, // UDP length 8, checksum
    ];

    #[test]
    fn a_packet_gives_its_flow_and_odd_bytes_give_none() {
        assert_eq!(flow_of_packet(&UDP_PACKET), Some(flow(40000)));
        let mut tcp = UDP_PACKET;
        tcp[9] = 6;
        assert_eq!(
            flow_of_packet(&tcp).map(|f| f.protocol),
            Some(Protocol::Tcp)
        );
        let mut icmp = UDP_PACKET;
        icmp[9] = 1;
        assert_eq!(flow_of_packet(&icmp), None);
        let mut fragment = UDP_PACKET;
        fragment[7] = 0x10;
        assert_eq!(
            flow_of_packet(&fragment),
            None,
            "later fragments carry no ports"
        );
        let mut options = UDP_PACKET;
        options[0] = 0x4f; // a 60-byte header: the ports lie beyond the bytes given
        assert_eq!(flow_of_packet(&options), None);
        for len in 0..UDP_PACKET.len() - 4 {
            assert_eq!(flow_of_packet(&UDP_PACKET[..len]), None, "{len} bytes");
        }
        assert_eq!(flow_of_packet(&[0x65; 40]), None, "IPv6 is not read");
    }

    #[test]
    fn conntrack_lines_give_the_original_tuple_and_the_external_port() {
        let udp = "udp      17 29 src=192.168.1.2 dst=11.99.0.11 sport=40000 dport=3478 \
                   src=11.99.0.11 dst=11.99.0.10 sport=3478 dport=20005 [ASSURED] mark=0 use=1";
        assert_eq!(
            parse_conntrack_line(udp),
            Some(ConntrackEntry {
                flow: flow(40000),
                reply_port: 20005,
                closed: false
            })
        );
        let tcp = "tcp      6 118 TIME_WAIT src=192.168.1.2 dst=11.99.0.11 sport=40001 \
                   dport=3478 src=11.99.0.11 dst=11.99.0.10 sport=3478 dport=20006 [ASSURED] \
                   mark=0 use=1";
        let entry = parse_conntrack_line(tcp).expect("tcp line");
        assert!(entry.closed);
        assert_eq!(entry.flow.protocol, Protocol::Tcp);
        let unreplied = "udp      17 29 src=192.168.1.2 dst=11.99.0.11 sport=40000 dport=3478 \
                         [UNREPLIED] src=11.99.0.11 dst=11.99.0.10 sport=3478 dport=20005 \
                         mark=0 use=1";
        assert_eq!(
            parse_conntrack_line(unreplied).map(|e| e.reply_port),
            Some(20005)
        );
        for odd in [
            "",
            "icmp     1 29 src=192.168.1.2 dst=11.99.0.11 type=8 code=0 id=1 src=11.99.0.11",
            "udp 17 29 src=192.168.1.2 dst=11.99.0.11 sport=40000",
            "udp 17 29 src=x dst=11.99.0.11 sport=1 dport=2 src=a dst=b sport=3 dport=4",
            "conntrack v1.4.7 (conntrack-tools): 3 flow entries have been shown.",
        ] {
            assert_eq!(parse_conntrack_line(odd), None, "{odd}");
        }
    }

    #[test]
    fn a_full_table_gives_up_its_oldest_live_flows() {
        let mut t = LiveFlows::new(3);
        for p in 1..=3 {
            assert!(t.admit(flow(p)));
        }
        assert!(!t.admit(flow(2)), "a flow counts once");
        assert!(!t.is_over());
        assert!(t.admit(flow(4)));
        assert!(t.is_over());
        assert_eq!(t.overflow(), [flow(1)]);
        assert!(!t.is_over());
        // Flow 2 expired: the next new flow fits without evicting anything.
        let live: HashSet<Flow> = [flow(3), flow(4)].into();
        assert!(t.admit(flow(5)));
        t.retain_live(&live, flow(5));
        assert!(t.overflow().is_empty());
        assert!(t.admit(flow(6)));
        assert_eq!(t.overflow(), [flow(3)]);
        assert!(
            t.admit(flow(1)),
            "an evicted flow that comes back is a new flow"
        );
    }

    #[test]
    fn flows_of_one_socket_share_an_endpoint_independent_mapping() {
        let mut t = LiveFlows::new(4);
        let other_remote = Flow {
            remote: SocketAddrV4::new(Ipv4Addr::new(11, 99, 0, 12), 3478),
            ..flow(1)
        };
        t.admit(other_remote);
        let eim = Preset::PortRestricted.config().expect("router preset");
        let apdm = Preset::Symmetric.config().expect("router preset");
        assert!(t.shares_mapping(&eim, &flow(1)));
        assert!(!t.shares_mapping(&apdm, &flow(1)));
        assert!(!t.shares_mapping(&eim, &flow(2)));
    }
}
