//! `natpunch stun-server` and `natpunch nat …`: wiring to the natcheck library.

use std::net::{SocketAddr, ToSocketAddrs as _};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::builder::BoolishValueParser;
use clap::{Args, Subcommand};
use natcheck::{CheckOptions, StunServer};

use crate::args::Json;

#[derive(Debug, Args)]
pub(crate) struct StunServerArgs {
    /// Primary address (IP:PORT) that clients ask first.
    #[arg(long, env = "NATPUNCH_STUN_PRIMARY")]
    primary: SocketAddr,
    /// Alternate address: a second IP address of this host and a second port (RFC 5780).
    #[arg(long, env = "NATPUNCH_STUN_ALTERNATE")]
    alternate: SocketAddr,
}

#[derive(Debug, Subcommand)]
pub(crate) enum NatCommand {
    /// Discover the NAT in front of this host with an RFC 5780 STUN server (natpunch stun-server
    /// or coturn with two addresses).
    Check(CheckArgs),
}

#[derive(Debug, Args)]
#[command(mut_arg("json", |a| a.help("Print the report as JSON")))]
pub(crate) struct CheckArgs {
    /// The server's primary address (HOST:PORT).
    #[arg(long, env = "NATPUNCH_STUN_SERVER")]
    server: String,
    #[command(flatten)]
    json: Json,
    /// Also measure the UDP mapping lifetime (takes as long as the lifetime, up to --lifetime-max).
    #[arg(long, env = "NATPUNCH_NAT_LIFETIME", value_parser = BoolishValueParser::new())]
    lifetime: bool,
    /// Longest lifetime to look for, in seconds.
    #[arg(long, env = "NATPUNCH_NAT_LIFETIME_MAX", default_value_t = 180)]
    lifetime_max: u64,
}

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

#[cfg(test)]
mod tests {
    use labrun::args::StunServerArgs as Child;

    use crate::Command;
    use crate::tests::parse;

    #[test]
    fn the_labs_stun_server_command_line_parses_to_its_values() {
        let child = Child {
            primary: "203.0.113.5:3478".parse().expect("addr"),
            alternate: "203.0.113.6:3479".parse().expect("addr"),
        };
        let Command::StunServer(args) = parse(child.to_args()) else {
            panic!("not `stun-server`");
        };
        assert_eq!(
            (args.primary, args.alternate),
            (child.primary, child.alternate)
        );
    }
}
