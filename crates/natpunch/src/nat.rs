//! `natpunch stun-server` and `natpunch nat …`: wiring to the natcheck library.

use std::net::ToSocketAddrs as _;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use natcheck::{CheckOptions, StunServer};

use cli::nat::{CheckArgs, NatCommand, StunServerArgs};

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

pub(crate) fn stun_server(args: StunServerArgs) -> anyhow::Result<ExitCode> {
    runtime()?.block_on(async {
        let software = format!("natpunch {}", env!("CARGO_PKG_VERSION"));
        let server = StunServer::bind(args.primary, args.alternate, &software).await?;
        let endpoints: Vec<String> = server.endpoints().iter().map(ToString::to_string).collect();
        println!("stun-server listening on {}", endpoints.join(", "));
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let running = tokio::spawn(server.run(stop_rx));
        crate::stop_signal().await;
        let _ = stop_tx.send(true);
        let counters = running.await.context("server task")?;
        println!("{}", serde_json::json!({ "counters": counters }));
        Ok(ExitCode::SUCCESS)
    })
}

pub(crate) fn run(cmd: NatCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        NatCommand::Check(args) => check(args),
    }
}

fn check(args: CheckArgs) -> anyhow::Result<ExitCode> {
    let server = args
        .server
        .to_socket_addrs()
        .with_context(|| {
            format!(
                "cannot resolve STUN server `{}` (expected HOST:PORT)",
                args.server
            )
        })?
        .next()
        .with_context(|| format!("`{}` has no address", args.server))?;
    let mut options = CheckOptions::new(server);
    if args.lifetime {
        options.lifetime = Some(Duration::from_secs(args.lifetime_max));
    }
    let progress = |msg: &str| eprintln!("nat check: {msg}");
    let report = match runtime()?.block_on(natcheck::check(&options, &progress)) {
        Ok(r) => r,
        Err(e) => {
            // Scripts get the same error on stdout, with a kind to branch on.
            if args.json.json {
                let error = serde_json::json!({ "error": {
                    "kind": e.kind(),
                    "server": server,
                    "message": e.to_string(),
                }});
                println!("{}", serde_json::to_string_pretty(&error)?);
            }
            return Err(e.into());
        }
    };
    if args.json.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{report}");
    }
    Ok(ExitCode::SUCCESS)
}
