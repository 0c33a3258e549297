//! The command lines of the `natpunch` roles the lab starts, built from the binary's own flag
//! types (the `cli` crate) and written by `cli::write`: every flag comes from the clap
//! definition the binary parses, so a flag renamed there follows by itself, and a field
//! renamed or retyped fails to compile here.
//!
//! Each builder starts from the role's defaults (the environment ignored, so a `NATPUNCH_*`
//! of the caller never reaches a child) and sets what the lab needs.

use std::ffi::OsString;
use std::path::PathBuf;

use cli::args::Identity;
use cli::write::{defaults, to_args};

pub use cli::client::ClientArgs;
pub use cli::daemon::DaemonArgs;
pub use cli::honeypot::HoneypotArgs;
pub use cli::nat::StunServerArgs;
pub use cli::peer::{Common as PeerArgs, DialArgs};
pub use cli::relay::RelayArgs;
pub use cli::server::ServerArgs;
pub use cli::write::named;

/// `natpunch relay` as a lab runs it: events as JSON, no telemetry port; every trial comes
/// from the same few NAT addresses, so the per-IP and per-peer rates are off, and circuits may
/// last ten minutes and carry 64 MiB. With `database_url`, it records where reserving peers
/// connect from (a vantage point for the remote's NAT).
///
/// # Errors
///
/// The role's flags do not parse on their own (a mistake in `cli`).
pub fn relay(
    identity: PathBuf,
    port: u16,
    database_url: Option<&str>,
) -> Result<Vec<OsString>, String> {
    let mut r: RelayArgs = defaults(&[])?;
    r.identity = Identity::new(Some(identity));
    r.port = port;
    r.database_url = database_url.map(str::to_owned);
    r.max_circuit_secs = 600;
    r.max_circuit_bytes = 64 << 20;
    for rate in [
        &mut r.reservation_rate_per_ip,
        &mut r.reservation_rate_per_peer,
        &mut r.circuit_rate_per_ip,
        &mut r.circuit_rate_per_peer,
    ] {
        rate.0 = None;
    }
    r.telemetry.port = 0;
    r.json.json = true;
    Ok(to_args(&["relay"], &r))
}

/// A peer on `relay` (with `/p2p/<relay id>`), events as JSON, every other flag at its default.
///
/// # Errors
///
/// `relay` is not a multiaddr.
pub fn peer(relay: &str) -> Result<PeerArgs, String> {
    let mut p: PeerArgs = defaults(&[("relay", relay)])?;
    p.json.json = true;
    Ok(p)
}

/// `natpunch peer listen` with `peer`'s flags.
pub fn listen(peer: &PeerArgs) -> Vec<OsString> {
    to_args(&["peer", "listen"], peer)
}

/// `natpunch peer dial PEER_ID` with `peer`'s flags, sending `perf_bytes` after the punch.
///
/// # Errors
///
/// `peer_id` is not a peer ID.
pub fn dial(
    peer_id: &str,
    peer: PeerArgs,
    perf_bytes: Option<u64>,
) -> Result<Vec<OsString>, String> {
    let dial = DialArgs {
        peer_id: peer_id
            .parse()
            .map_err(|e| format!("peer {peer_id}: {e}"))?,
        perf_bytes,
        common: peer,
    };
    Ok(to_args(&["peer", "dial"], &dial))
}

/// `natpunch honeypot` on `port` with the key in `identity` and the DHT `protocol`, events as
/// JSON; a plain DHT server (`--no-record`) until given a database.
///
/// # Errors
///
/// `protocol` is not a protocol name.
pub fn honeypot(port: u16, identity: PathBuf, protocol: &str) -> Result<HoneypotArgs, String> {
    let mut h: HoneypotArgs = defaults(&[("protocol", protocol)])?;
    h.port = port;
    h.identity = Identity::new(Some(identity));
    h.no_record = true;
    h.json.json = true;
    Ok(h)
}

/// `natpunch server` on `port` with `database_url`, events as JSON, no telemetry port.
///
/// # Errors
///
/// The role's flags do not parse on their own (a mistake in `cli`).
pub fn server(port: u16, database_url: &str) -> Result<ServerArgs, String> {
    let mut s: ServerArgs = defaults(&[])?;
    s.port = port;
    s.database_url = database_url.to_owned();
    s.telemetry.port = 0;
    s.json.json = true;
    Ok(s)
}

/// `natpunch client` of `server` with `api_key`, events as JSON.
///
/// # Errors
///
/// The role's flags do not parse on their own (a mistake in `cli`).
pub fn client(server: &str, api_key: &str) -> Result<ClientArgs, String> {
    let mut c: ClientArgs = defaults(&[])?;
    c.server = server.to_owned();
    c.api_key = Some(api_key.to_owned());
    c.json.json = true;
    Ok(c)
}

/// `natpunch daemon` on `relay` with its API socket at `socket` and its key in `identity`, events
/// as JSON, no telemetry port; told its NAT's behaviour when `nat` is given (as `natpunch nat
/// check` would have found it behind that preset).
///
/// # Errors
///
/// `relay` is not a multiaddr.
pub fn daemon(
    relay: &str,
    socket: &std::path::Path,
    identity: &std::path::Path,
    nat: Option<natlab::Preset>,
) -> Result<Vec<OsString>, String> {
    let mut d: DaemonArgs = defaults(&[("relay", relay)])?;
    d.socket = Some(socket.to_owned());
    d.identity = Identity::new(Some(identity.to_owned()));
    d.telemetry.port = 0;
    d.json.json = true;
    if let Some(p) = nat {
        match p.config() {
            Some(c) => {
                d.mapping = Some(c.mapping);
                d.filtering = Some(c.filtering);
            }
            None => {
                d.mapping = Some(behaviour::Mapping::None);
                d.filtering = Some(behaviour::Filtering::None);
            }
        }
    }
    Ok(to_args(&["daemon"], &d))
}

/// The peer ID a listener's `reserved` line gives (its relayed address ends in `/p2p/<id>`).
pub fn reserved_peer(line: &str) -> Option<String> {
    match serde_json::from_str(line).ok()? {
        p2p::peer::PeerEvent::Reserved { address } => address.rsplit('/').next().map(str::to_owned),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reserved_line_gives_the_listeners_peer_id() {
        let event = p2p::peer::PeerEvent::Reserved {
            address: "/ip4/203.0.113.1/tcp/4001/p2p/12D3KooWRelay/p2p-circuit/p2p/12D3KooWPeer"
                .into(),
        };
        let line = serde_json::to_string(&event).expect("json");
        assert_eq!(reserved_peer(&line).as_deref(), Some("12D3KooWPeer"));
        assert_eq!(reserved_peer(r#"{"event":"relay-connected"}"#), None);
        assert_eq!(reserved_peer("not json"), None);
    }
}
