//! `natpunch peer listen|dial`: a libp2p peer that hole-punches through a relay.

use std::process::ExitCode;

use p2p::peer::{Mode, Peer, PeerEvent};
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
