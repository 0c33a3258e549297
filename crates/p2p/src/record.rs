//! The record of one hole punch, as each side saw it.
//!
//! Outcome and attempt names are punchr's (the field's vocabulary, see `MEASUREMENT.md`); the
//! rest is what natpunch adds: which side this is, the engine and candidate source in use, the
//! addresses exchanged, per-attempt timings and errors, the transport that won, the time from
//! the relayed connection to the direct one, and the direct RTT after the punch.

use serde::{Deserialize, Serialize};

/// How a hole punch ended (punchr's `HolePunchOutcome`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Outcome {
    /// Not known (the run was cut short).
    Unknown,
    /// The remote could not be reached even through the relay.
    NoConnection,
    /// The relayed connection was up, but no hole-punch stream came within the wait.
    NoStream,
    /// The remote connected to us directly without a punch.
    ConnectionReversed,
    /// Stopped before it ended.
    Cancelled,
    /// Every attempt failed.
    Failed,
    /// An attempt gave a direct connection.
    Success,
}

/// How one attempt (one CONNECT/SYNC round and its dials) ended (punchr's
/// `HolePunchAttemptOutcome`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum AttemptOutcome {
    /// Not known.
    Unknown,
    /// A direct dial without a punch.
    DirectDial,
    /// The handshake broke the protocol (or the remote does not speak it).
    ProtocolError,
    /// Stopped, e.g. because a direct connection already existed.
    Cancelled,
    /// No answer within the attempt's time.
    Timeout,
    /// The dials failed.
    Failed,
    /// This attempt gave the direct connection.
    Success,
}

/// Which end of the relayed connection this peer is (the DCUtR spec's A and B).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Side {
    /// A: dialed the remote through the relay (`natpunch peer dial`).
    Dialer,
    /// B: was dialed through the relay (`natpunch peer listen`); it drives the handshake.
    Listener,
}

/// One dial that failed, with its error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DialFailure {
    /// The address dialed.
    pub addr: String,
    /// The error.
    pub error: String,
}

/// One attempt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Attempt {
    /// 1, 2, 3 …
    pub number: u32,
    /// When it started, ms after the relayed connection.
    pub started_ms: f64,
    /// The CONNECT round trip the listener measured (it sets the SYNC timing).
    pub rtt_ms: Option<f64>,
    /// A reversed attempt: the listener dialed as the connection's dialer and the dialer only
    /// waited, or dialed as the listener to open its own NAT's filter (natpunch's second
    /// attempt between natpunch peers, for a TCP punch whose simultaneous open failed because
    /// only one side's packets get through; the first when both mapping classes say so).
    pub reversed: bool,
    /// When this side dialed, ms after the relayed connection.
    pub dialed_ms: Option<f64>,
    /// What this side dialed.
    pub dialed: Vec<String>,
    /// The addresses the remote sent in its CONNECT.
    pub remote_addrs: Vec<String>,
    /// How it ended.
    pub outcome: AttemptOutcome,
    /// Why, when it did not succeed.
    pub error: Option<String>,
    /// Per-address dial errors.
    pub dial_errors: Vec<DialFailure>,
    /// When it ended, ms after the relayed connection.
    pub ended_ms: f64,
    /// What birthday probing did in this attempt, if it probed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub birthday: Option<AttemptBirthday>,
}

/// A side's part in birthday probing ([`crate::birthday`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BirthdayRole {
    /// Its NAT maps endpoint-independently: it probed ports of the remote's address.
    Easy,
    /// Its NAT picks a port per destination: it opened sockets towards the remote.
    Hard,
}

/// What birthday probing did in one attempt, on one side.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttemptBirthday {
    /// This side's part.
    pub role: BirthdayRole,
    /// Sockets opened (the hard side).
    pub sockets: Option<u32>,
    /// The easy side: probes sent. The hard side: the easy side's count of probes when the one
    /// it heard went out.
    pub probes: Option<u32>,
    /// The hard side's mapped port the probe reached (the easy side, which dials it).
    pub port: Option<u16>,
    /// A probe reached one of the hard side's sockets.
    pub hit: bool,
    /// The direct connection came through the pair the probe found.
    pub direct: bool,
    /// Port prediction: the first port of the window the easy side probed before random
    /// ports (the hard side: the port it announced), when the hard side's NAT allocates in
    /// order.
    #[serde(default)]
    pub predicted: Option<u16>,
    /// The probe that hit went to the predicted window.
    #[serde(default)]
    pub in_window: bool,
    /// What went wrong, if anything did.
    pub error: Option<String>,
}

/// The record of one hole punch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// This side.
    pub side: Side,
    /// `natpunch` (our DCUtR engine) or `stock` (rust-libp2p's `dcutr` behaviour).
    pub engine: String,
    /// Where the addresses sent in CONNECT came from: `observed` (as the relay saw them) or
    /// `stock` (identify's candidates).
    pub candidates: String,
    /// This peer.
    pub local_peer: String,
    /// The remote peer.
    pub remote_peer: String,
    /// The relay.
    pub relay: String,
    /// Wall clock at the relayed connection, ms since the Unix epoch.
    pub started_unix_ms: u64,
    /// How it ended.
    pub outcome: Outcome,
    /// The transport of the direct connection (`tcp`, `quic`).
    pub transport: Option<String>,
    /// Which side's dial produced the direct connection (`local`, `remote`; a TCP simultaneous
    /// open is `local` on both).
    pub dialed_by: Option<String>,
    /// From the relayed connection to the direct connection, ms.
    pub time_to_direct_ms: Option<f64>,
    /// The round trip to the relay itself (ping), ms.
    #[serde(default)]
    pub to_relay_rtt_ms: Option<f64>,
    /// The relayed connection's round trip (ping), ms.
    pub relay_rtt_ms: Option<f64>,
    /// The direct connection's first ping, ms.
    pub direct_rtt_ms: Option<f64>,
    /// How this side's NAT maps (RFC 4787), if known.
    #[serde(default)]
    pub local_mapping: Option<behaviour::Mapping>,
    /// Where `local_mapping` came from: `flag`, `rfc5780` or `observed`.
    #[serde(default)]
    pub local_mapping_source: Option<crate::punch::MappingSource>,
    /// How the remote's NAT maps, as the remote reported it (`/natpunch/dcutr/1.1.0` only).
    #[serde(default)]
    pub remote_mapping: Option<behaviour::Mapping>,
    /// The addresses this side offered.
    pub local_addrs: Vec<String>,
    /// The addresses the remote offered (from its last CONNECT).
    pub remote_addrs: Vec<String>,
    /// Every attempt, in order.
    pub attempts: Vec<Attempt>,
    /// Direct connections to the remote open at the end (1 after a success).
    pub direct_connections: u32,
    /// Why it ended the way it did, when not a success.
    pub error: Option<String>,
    /// When the record was closed, ms after the relayed connection.
    pub ended_ms: f64,
}

/// One line for people: `hole punch with 12D3… (Initiator side): Success over quic after 180
/// ms, direct rtt 90.2 ms, 1 attempt(s)`, and the error when there is one.
impl std::fmt::Display for Record {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "hole punch with {} ({:?} side): {:?}",
            self.remote_peer, self.side, self.outcome
        )?;
        if let (Some(t), Some(ms)) = (&self.transport, self.time_to_direct_ms) {
            write!(f, " over {t} after {ms:.0} ms")?;
        }
        if let Some(rtt) = self.direct_rtt_ms {
            write!(f, ", direct rtt {rtt:.1} ms")?;
        }
        write!(f, ", {} attempt(s)", self.attempts.len())?;
        if let Some(e) = &self.error {
            write!(f, ": {e}")?;
        }
        Ok(())
    }
}

impl Record {
    /// Whether every field a finished record must have is there: an outcome other than
    /// `UNKNOWN`, each attempt ended with an outcome, and a success with its transport and time.
    pub fn is_complete(&self) -> bool {
        let attempts_done = self
            .attempts
            .iter()
            .all(|a| a.outcome != AttemptOutcome::Unknown && a.ended_ms >= a.started_ms);
        let success_ok = self.outcome != Outcome::Success
            || (self.transport.is_some() && self.time_to_direct_ms.is_some());
        self.outcome != Outcome::Unknown && attempts_done && success_ok
    }
}
