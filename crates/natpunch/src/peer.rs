//! `natpunch peer listen|dial`: a libp2p peer that hole-punches through a relay.

use std::process::ExitCode;

use p2p::peer::{LocalMapping, MappingSource, Mode, Peer, PeerEvent};
use p2p::record::Outcome;

use crate::args::LoadKey as _;
use cli::peer::PeerCommand;

pub(crate) fn run(cmd: PeerCommand) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let (common, mode) = match &cmd {
            PeerCommand::Listen(c) => (c, Mode::Listen),
            PeerCommand::Dial(d) => (&d.common, Mode::Dial(d.peer_id)),
        };
        let key = common.identity.load()?.key;
        let mut config = common.config();
        if let PeerCommand::Dial(d) = &cmd {
            config.perf_bytes = d.perf_bytes;
        }
        if config.local_mapping.is_none()
            && let Some(server) = common.stun_server
        {
            config.local_mapping = check_mapping(server).await;
        }
        let mut peer = Peer::new(key, config)?;
        eprintln!("peer: {}", peer.peer_id());
        let json = common.json.json;
        let mut report = |e: PeerEvent| {
            if json {
                println!("{}", serde_json::to_string(&e).unwrap_or_default());
            } else {
                println!("{e}");
            }
        };
        let outcome = peer.run(mode, crate::stop_signal(), &mut report).await;
        peer.unmap().await;
        let outcome = outcome?;
        if common.no_punch && outcome == Some(Outcome::Cancelled) {
            return Ok(ExitCode::SUCCESS);
        }
        Ok(match outcome {
            Some(Outcome::Success | Outcome::ConnectionReversed) | None => ExitCode::SUCCESS,
            Some(_) => ExitCode::FAILURE,
        })
    })
}

/// This end's mapping class from an RFC 5780 check against `server` (the mapping test only);
/// `None`, with a word on stderr, when the server cannot tell.
async fn check_mapping(server: std::net::SocketAddr) -> Option<LocalMapping> {
    let mut options = natcheck::client::CheckOptions::new(server);
    options.mapping_only = true;
    match natcheck::client::check(&options, &|_: &str| {}).await {
        Ok(report) => {
            if report.mapping.is_none() {
                eprintln!("peer: {server} could not tell how this NAT maps; going on without");
            }
            report.mapping.map(|mapping| LocalMapping {
                mapping,
                source: MappingSource::Rfc5780,
            })
        }
        Err(e) => {
            eprintln!(
                "peer: checking the NAT with {server} failed ({:#}); going on without",
                anyhow::Error::from(e)
            );
            None
        }
    }
}
