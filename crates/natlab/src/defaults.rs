//! Constants of the lab, each with the reason for its value.

use std::net::Ipv4Addr;
use std::time::Duration;

/// The lab's "internet": a /16 that looks globally routable, because libp2p's identify/AutoNAT
/// and miniupnpd refuse RFC 1918, 100.64/10 and documentation ranges on a WAN. It exists only
/// inside the lab's namespaces; nothing outside them routes to it.
pub const INTERNET_NET: Ipv4Addr = Ipv4Addr::new(11, 99, 0, 0);
/// Prefix length of [`INTERNET_NET`].
pub const INTERNET_PREFIX: u8 = 16;
/// The internet namespace's own address on its bridge: every public node's default gateway.
/// The internet namespace does not forward, so anything sent to a non-lab address ends there.
pub const INTERNET_SINK: Ipv4Addr = Ipv4Addr::new(11, 99, 0, 1);
/// First address handed to nodes on the internet (below it: reserved for the lab itself).
pub const FIRST_PUBLIC_HOST: u32 = 10;

/// Home LANs are `192.168.K.0/24`, K being the router's number.
pub const HOME_LAN_BASE: [u8; 2] = [192, 168];
/// A router with routers behind it (a CGNAT) uses `100.64.K.0/24` inside (RFC 6598 space).
pub const CGNAT_LAN_BASE: [u8; 2] = [100, 64];

/// UDP idle timeout of home presets: RFC 4787 REQ-5 asks for at least 2 minutes.
pub const HOME_UDP_TIMEOUT_SECS: u32 = 120;
/// UDP idle timeout of the symmetric preset: Fortinet's default of 180 s.
pub const ENTERPRISE_UDP_TIMEOUT_SECS: u32 = 180;
/// UDP idle timeout of the CGNAT preset: fixed-line CGNs were measured at a median of about 35 s,
/// and 30 s is the value Tailscale and magicsock plan for.
pub const CGNAT_UDP_TIMEOUT_SECS: u32 = 30;
/// Established TCP idle timeout: RFC 5382 REQ-5 asks for at least 2 h 4 min.
pub const TCP_ESTABLISHED_TIMEOUT_SECS: u32 = 7440;
/// Shortest timeout a router accepts; conntrack counts in seconds and tests need a few of them.
pub const MIN_TIMEOUT_SECS: u32 = 2;
/// Longest timeout a router accepts: conntrack's own default for established TCP (5 days).
pub const MAX_TIMEOUT_SECS: u32 = 432_000;

/// Ports a random or fallback allocation draws from: everything above the privileged range.
pub const RANDOM_PORTS: (u16, u16) = (1024, 65535);
/// First port of a sequential allocator; chosen below Linux's ephemeral range (32768–60999) so
/// that sequential ports are easy to tell from preserved ones.
pub const SEQUENTIAL_FIRST_PORT: u16 = 20000;
/// Number of ports a sequential allocator cycles through before it wraps around.
pub const SEQUENTIAL_PORTS: u16 = 1000;

/// Largest session table a router accepts: the ports of one external address. Real NATs hold
/// from a few thousand sessions (small CPE) to far more (CGNs), but a lab that needs a bigger
/// bound needs none.
pub const MAX_SESSIONS: u32 = 65_535;
/// Queue number of a router's session evictor (the delay line has 0 and 1 in every namespace).
pub const EVICTOR_QUEUE: u16 = 2;

/// Prefix of every namespace the lab creates; a sweep removes stale ones by it.
pub const NETNS_PREFIX: &str = "natlab.";
/// Where the lab keeps one state file per lab (tmpfs: gone after a reboot, like the namespaces).
pub const STATE_DIR: &str = "/run/natpunch/labs";

/// How long a command run in a namespace during lab setup may take.
pub const SETUP_COMMAND_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a probe waits for an answer that should come (a lab RTT is at most a few hundred ms).
pub const PROBE_REPLY_TIMEOUT: Duration = Duration::from_millis(1500);
/// How long a probe waits before it concludes that a filtered packet did not come.
pub const PROBE_SILENCE: Duration = Duration::from_millis(400);
/// Largest queue a delay line lets the kernel hold per direction.
pub const DELAY_QUEUE_MAX_LEN: u32 = 4096;

/// How long miniupnpd may take to start serving on a port-mapping router (it takes a few ms).
pub const PORTMAP_START_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a simulated router reboot keeps the router dark, by default.
pub const REBOOT_DOWNTIME: Duration = Duration::from_secs(1);
