//! The honeypot's defaults and bounds, each with the reason for its value. Everything the
//! network feeds (connections, sightings waiting for the store, peers remembered) has one.

use std::time::Duration;

/// punchr's honeypot port.
pub const PORT: u16 = 11000;
/// punchr's crawler count: random walks at once in a crawl.
pub const CRAWLER_COUNT: usize = 10;
/// Time between the start of two crawls: often enough to stay in the DHT's routing tables
/// (whose entries go stale after an hour without contact), rarely enough to be a small load.
pub const CRAWL_INTERVAL: Duration = Duration::from_secs(600);
/// Idle connections stay open this long, so that relayed peers' identify pushes (their new
/// relay addresses) reach the honeypot; [`MAX_CONNECTIONS`] bounds what that costs.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(1800);

/// Connections open at once, both directions: each costs tens of KiB (noise and yamux
/// buffers), so the honeypot's connection state stays in the tens of MiB while 30-minute idle
/// connections pile up; a full honeypot refuses new peers and counts them.
pub const MAX_CONNECTIONS: u32 = 1024;
/// Connections one peer may hold: TCP and QUIC, one our crawl dialled, and one left half-open
/// behind a NAT that dropped its mapping while the peer reconnected.
pub const MAX_CONNECTIONS_PER_PEER: u32 = 4;
/// Inbound handshakes in flight (each holds a socket and noise state): new peers arrive a few
/// a second, so this only bites on a flood of connections that never finish their handshake.
pub const MAX_PENDING_INCOMING: u32 = 128;
/// The share of [`MAX_CONNECTIONS`] inbound peers may not take (1/8): the crawl's own dials
/// keep room, so that a full honeypot still walks the DHT and stays known in it.
pub const OUTBOUND_RESERVE_DIVISOR: u32 = 8;

/// Peers whose last reported addresses are remembered (the least recently seen are forgotten
/// first). A forgotten peer is recorded once more when it next identifies, as after a restart;
/// an entry costs about 200 bytes, so the map stays under ~7 MiB.
pub const REPORTED_PEERS: usize = 32 * 1024;

/// Sightings waiting for the store. While the store is down, newer sightings are dropped (and
/// counted) once this is full: minutes of a public-DHT honeypot's arrivals, a few MiB at
/// most (identify caps what a peer sends at 4 KiB, a few KiB once written out as text).
pub const SIGHTING_QUEUE: usize = 1024;
/// First pause before a failed write is tried again; it doubles with every failure.
pub const RETRY_FIRST: Duration = Duration::from_millis(200);
/// Longest pause between tries: the store's return is noticed within seconds, and a dead
/// store costs at most a dozen tries a minute.
pub const RETRY_MAX: Duration = Duration::from_secs(5);
/// A sighting the store has failed to take for this long is dropped (and counted): a database
/// restart takes seconds, so this is a long outage or a sighting the store will never take, and
/// holding it would stall the whole queue behind it.
pub const GIVE_UP_AFTER: Duration = Duration::from_secs(60);
/// One write that takes longer counts as failed: more than the store's own pool timeout (10 s),
/// so a store that accepts connections but never answers cannot stall the writer forever.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a stopping honeypot keeps writing what is queued: within the 10 s that service
/// managers (docker's default) wait after SIGTERM before they kill.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
