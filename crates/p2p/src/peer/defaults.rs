//! The peer's limits and timings, each with the reason for its value.

use std::time::Duration;

/// Hole punches in progress at once. A session lives for at most a few attempt timeouts (about
/// 11 s by default), and a rust-libp2p relay lets 16 circuits through at once by default, so a
/// peer far beyond this is being flooded; the excess relayed connections are not punched.
/// Handshake tasks are at most two per session (one driving, one answering), so this bounds
/// them too.
pub const MAX_SESSIONS: usize = 256;

/// Remotes whose side, direct connections and engine are remembered at once. An entry lives
/// while the remote is connected; this is the backstop if a flood of inbound connections keeps
/// more than that many connected (beyond it, a remote is simply not tracked: its simultaneous
/// direct connections are not deduplicated and its engine is assumed to be plain DCUtR).
pub const MAX_REMOTES: usize = 1024;

/// identify's candidate addresses kept for `--candidates stock`. Every remote that sees this
/// peer at a new port adds one (behind a NAT that maps per destination, every remote does);
/// offered all at once, they would soon exceed the 4096-byte CONNECT message
/// ([`crate::wire::MAX_MESSAGE`], about 60 bytes an address), which would stop every punch.
pub const MAX_STOCK_CANDIDATES: usize = 16;

/// Throughput tests received at once. A test is one stream of up to 1 GiB; a second one from
/// the same dialer is already unusual.
pub const MAX_PERF_SINKS: usize = 4;

/// The lifetime asked for mappings of the listen ports; they are renewed at half the lifetime
/// granted. One hour is what the peer always asked for (routers clamp it; miniupnpd's PCP
/// default range is 120 s to 1 day).
pub const PORT_MAPPING_LIFETIME: Duration = Duration::from_secs(3600);

/// How often to ask the router whether it still has the mappings when it announces nothing:
/// `natpunch map keep`'s default.
pub const PORT_MAPPING_CHECK: Duration = Duration::from_secs(30);

/// How long one port-mapping request may take (NAT-PMP and PCP retransmit after 250, 500,
/// 1000 ms within it): `natpunch map`'s default.
pub const PORT_MAPPING_WAIT: Duration = Duration::from_secs(2);

/// Holder reports queued for the event loop. The loop reads them as they come; one burst (a
/// reboot: a loss and a re-mapping per listen port) is a handful, so reports beyond this are
/// dropped and counted. The addresses offered do not depend on them: they follow the holder's
/// state, which is never dropped.
pub const PORT_MAPPING_REPORTS: usize = 64;
