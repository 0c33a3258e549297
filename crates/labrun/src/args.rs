//! The command lines of the `natpunch` roles the lab starts, as typed values.
//!
//! Each struct holds the flags labrun gives one role and renders them with `to_args`. The
//! `natpunch` crate parses every one of them with its own command-line parser in a test and
//! checks that the values come back, so a renamed or retyped flag fails a plain `cargo test`
//! rather than a root-only lab run.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;

/// Builds an argument list flag by flag.
#[derive(Debug)]
struct Line(Vec<OsString>);

impl Line {
    fn new(words: &[&str]) -> Self {
        Self(words.iter().map(OsString::from).collect())
    }

    /// `--name value`.
    fn flag(mut self, name: &str, value: impl Into<OsString>) -> Self {
        self.0.push(name.into());
        self.0.push(value.into());
        self
    }

    /// `--name value` when there is a value.
    fn maybe<T: Into<OsString>>(self, name: &str, value: Option<T>) -> Self {
        match value {
            Some(v) => self.flag(name, v),
            None => self,
        }
    }

    /// `--name` when `on`.
    fn switch(mut self, name: &str, on: bool) -> Self {
        if on {
            self.0.push(name.into());
        }
        self
    }
}

/// `natpunch relay` as a lab runs it: every trial comes from the same few NAT addresses, so the
/// per-IP and per-peer rates are off, and circuits may be long and large.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayArgs {
    /// `--identity`.
    pub identity: PathBuf,
    /// `--port`.
    pub port: u16,
    /// `--max-circuit-secs`.
    pub max_circuit_secs: u64,
    /// `--max-circuit-bytes`.
    pub max_circuit_bytes: u64,
}

impl RelayArgs {
    /// The lab's relay: key in `identity`, TCP and QUIC on `port`, circuits of up to ten
    /// minutes and 64 MiB.
    pub fn lab(identity: PathBuf, port: u16) -> Self {
        Self {
            identity,
            port,
            max_circuit_secs: 600,
            max_circuit_bytes: 64 << 20,
        }
    }

    /// The command line, without the program: events as JSON, no telemetry port, every
    /// request rate off.
    pub fn to_args(&self) -> Vec<OsString> {
        let mut line = Line::new(&["relay", "--json"])
            .flag("--telemetry-port", "0")
            .flag("--identity", &self.identity);
        for rate in [
            "--reservation-rate-per-ip",
            "--reservation-rate-per-peer",
            "--circuit-rate-per-ip",
            "--circuit-rate-per-peer",
        ] {
            line = line.flag(rate, "off");
        }
        line.flag("--max-circuit-secs", self.max_circuit_secs.to_string())
            .flag("--max-circuit-bytes", self.max_circuit_bytes.to_string())
            .flag("--port", self.port.to_string())
            .0
    }
}

/// What a peer does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerMode {
    /// `peer listen`: reserve on the relay and accept hole punches.
    Listen,
    /// `peer dial PEER_ID`: punch once.
    Dial {
        /// The peer to reach.
        peer_id: String,
    },
}

/// `natpunch peer listen|dial`, events as JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerArgs {
    /// Listen or dial.
    pub mode: PeerMode,
    /// `--relay`, with `/p2p/<relay id>`.
    pub relay: String,
    /// `--transport`: `tcp`, `quic` or `both`.
    pub transport: Option<String>,
    /// `--engine`: `natpunch` or `stock`.
    pub engine: Option<String>,
    /// `--candidates`: `observed` or `stock`.
    pub candidates: Option<String>,
    /// `--attempt-timeout-ms`.
    pub attempt_timeout_ms: Option<u64>,
    /// `--identity`.
    pub identity: Option<PathBuf>,
    /// `--dht-bootstrap`.
    pub dht_bootstrap: Option<String>,
    /// `--dht-protocol`.
    pub dht_protocol: Option<String>,
    /// `--no-punch`.
    pub no_punch: bool,
    /// `--perf-bytes` (dial only).
    pub perf_bytes: Option<u64>,
}

impl PeerArgs {
    /// A peer in `mode` on `relay`, every other flag at natpunch's default.
    pub fn new(mode: PeerMode, relay: impl Into<String>) -> Self {
        Self {
            mode,
            relay: relay.into(),
            transport: None,
            engine: None,
            candidates: None,
            attempt_timeout_ms: None,
            identity: None,
            dht_bootstrap: None,
            dht_protocol: None,
            no_punch: false,
            perf_bytes: None,
        }
    }

    /// The command line, without the program.
    pub fn to_args(&self) -> Vec<OsString> {
        let line = match &self.mode {
            PeerMode::Listen => Line::new(&["peer", "listen"]),
            PeerMode::Dial { peer_id } => Line::new(&["peer", "dial", peer_id]),
        };
        line.switch("--json", true)
            .flag("--relay", &self.relay)
            .maybe("--transport", self.transport.as_ref())
            .maybe("--engine", self.engine.as_ref())
            .maybe("--candidates", self.candidates.as_ref())
            .maybe(
                "--attempt-timeout-ms",
                self.attempt_timeout_ms.map(|t| t.to_string()),
            )
            .maybe("--identity", self.identity.as_ref())
            .maybe("--dht-bootstrap", self.dht_bootstrap.as_ref())
            .maybe("--dht-protocol", self.dht_protocol.as_ref())
            .switch("--no-punch", self.no_punch)
            .maybe("--perf-bytes", self.perf_bytes.map(|b| b.to_string()))
            .0
    }
}

/// `natpunch honeypot`, events as JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HoneypotArgs {
    /// `--port`.
    pub port: u16,
    /// `--identity`.
    pub identity: PathBuf,
    /// `--protocol`: the DHT's protocol name.
    pub protocol: String,
    /// `--bootstrap`: the peer to join the DHT through (`None`: the first node).
    pub bootstrap: Option<String>,
    /// `--crawler-count`.
    pub crawler_count: Option<usize>,
    /// `--crawl-secs`.
    pub crawl_secs: Option<u64>,
    /// `--database-url`, or `None` with `--no-record` (a plain DHT server).
    pub database_url: Option<String>,
}

impl HoneypotArgs {
    /// The command line, without the program.
    pub fn to_args(&self) -> Vec<OsString> {
        Line::new(&["honeypot", "--json"])
            .switch("--no-record", self.database_url.is_none())
            .flag("--port", self.port.to_string())
            .flag("--identity", &self.identity)
            .flag("--protocol", &self.protocol)
            .maybe("--bootstrap", self.bootstrap.as_ref())
            .maybe("--crawler-count", self.crawler_count.map(|n| n.to_string()))
            .maybe("--crawl-secs", self.crawl_secs.map(|s| s.to_string()))
            .maybe("--database-url", self.database_url.as_ref())
            .0
    }
}

/// `natpunch server`, start and stop as JSON, no telemetry port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerArgs {
    /// `--port`.
    pub port: u16,
    /// `--database-url`.
    pub database_url: String,
    /// `--protocol-filters`.
    pub protocol_filters: Option<String>,
    /// `--dedup-secs`.
    pub dedup_secs: Option<u64>,
    /// `--per-remote`.
    pub per_remote: Option<u32>,
}

impl ServerArgs {
    /// The command line, without the program.
    pub fn to_args(&self) -> Vec<OsString> {
        Line::new(&["server", "--json"])
            .flag("--port", self.port.to_string())
            .flag("--telemetry-port", "0")
            .flag("--database-url", &self.database_url)
            .maybe("--protocol-filters", self.protocol_filters.as_ref())
            .maybe("--dedup-secs", self.dedup_secs.map(|s| s.to_string()))
            .maybe("--per-remote", self.per_remote.map(|n| n.to_string()))
            .0
    }
}

/// `natpunch client`, events as JSON.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientArgs {
    /// `--server`.
    pub server: String,
    /// `--api-key`.
    pub api_key: String,
    /// `--host-count`.
    pub host_count: usize,
    /// `--idle-secs`.
    pub idle_secs: f64,
    /// `--keys-dir`.
    pub keys_dir: PathBuf,
    /// `--stun-server`.
    pub stun_server: Option<SocketAddr>,
    /// `--port-mapping`.
    pub port_mapping: bool,
    /// `--punches`.
    pub punches: Option<u64>,
}

impl ClientArgs {
    /// The command line, without the program.
    pub fn to_args(&self) -> Vec<OsString> {
        Line::new(&["client", "--json"])
            .flag("--server", &self.server)
            .flag("--api-key", &self.api_key)
            .flag("--host-count", self.host_count.to_string())
            .flag("--idle-secs", self.idle_secs.to_string())
            .flag("--keys-dir", &self.keys_dir)
            .maybe("--stun-server", self.stun_server.map(|s| s.to_string()))
            .switch("--port-mapping", self.port_mapping)
            .maybe("--punches", self.punches.map(|n| n.to_string()))
            .0
    }
}

/// `natpunch stun-server`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StunServerArgs {
    /// `--primary`.
    pub primary: SocketAddr,
    /// `--alternate`.
    pub alternate: SocketAddr,
}

impl StunServerArgs {
    /// The command line, without the program.
    pub fn to_args(&self) -> Vec<OsString> {
        Line::new(&["stun-server"])
            .flag("--primary", self.primary.to_string())
            .flag("--alternate", self.alternate.to_string())
            .0
    }
}
