//! cli: natpunch's command line as types: every subcommand's flags (with their help, defaults
//! and `NATPUNCH_*` variables), the flag groups several roles share (`--json`, the telemetry
//! port, `--identity`), the value parsers, and the conversion of a role's flags into its
//! library's configuration.
//!
//! The `natpunch` binary parses [`Cli`] and hands each subcommand to its wiring. labrun builds
//! the command lines of the roles it starts as processes from the same types ([`write`]): a
//! field renamed or removed fails to compile there, and a renamed flag follows by itself. Tests
//! here check that every flag has its variable, and that what [`write`] writes parses back to
//! the same values.
//!
//! What it does not do: run anything, read files, or print; that is the binary's and the
//! libraries'.

#![allow(
    rustdoc::broken_intra_doc_links,
    rustdoc::invalid_html_tags,
    reason = "the fields' doc comments are clap's help text, written for a terminal"
)]

pub mod args;
pub mod bench;
pub mod campaign;
pub mod client;
pub mod connect;
pub mod daemon;
pub mod honeypot;
pub mod lab;
pub mod map;
pub mod matrix;
pub mod nat;
pub mod peer;
pub mod relay;
pub mod server;
pub mod write;

use clap::{Parser, Subcommand};

/// Direct connections between computers behind NATs, and measurements of how well that works.
#[derive(Debug, Parser)]
#[command(
    name = "natpunch",
    version,
    propagate_version = true,
    max_term_width = 100
)]
pub struct Cli {
    /// Log filter for diagnostics on stderr (e.g. `info`, `natlab=debug`).
    #[arg(long, global = true, env = "NATPUNCH_LOG", default_value = "warn")]
    pub log: String,
    #[command(subcommand)]
    pub command: Command,
}

/// natpunch's subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// NAT lab: build NAT topologies in network namespaces, run programs in them, self-test.
    #[command(subcommand, display_order = 10)]
    Lab(lab::LabCommand),
    /// NAT discovery: what NAT is this host behind, and can it be hole-punched?
    #[command(subcommand, display_order = 20)]
    Nat(nat::NatCommand),
    /// Run an RFC 5780 STUN server on two addresses × two ports (for `nat check`).
    #[command(display_order = 21)]
    StunServer(nat::StunServerArgs),
    /// Port mapping on the local router: PCP, NAT-PMP or UPnP IGD (probe, list, add, delete).
    #[command(subcommand, display_order = 30)]
    Map(map::MapCommand),
    /// Run a libp2p circuit relay v2 server (with identify, ping and AutoNAT v2) for hole punching.
    #[command(display_order = 40)]
    Relay(relay::RelayArgs),
    /// A libp2p peer that hole-punches through a relay (DCUtR over TCP and QUIC).
    #[command(subcommand, display_order = 41)]
    Peer(peer::PeerCommand),
    /// A Kademlia DHT server that records the peers connecting to it into the measurement store.
    #[command(display_order = 51)]
    Honeypot(honeypot::HoneypotArgs),
    /// libp2p hosts that take peers from a measurement server, hole-punch them and report.
    #[command(display_order = 52)]
    Client(client::ClientArgs),
    /// The measurement server: punchr-compatible gRPC API on SQLite or PostgreSQL.
    #[command(display_order = 50)]
    Server(server::ServerArgs),
    /// The connectivity daemon: hands applications a connected socket, direct when the NATs
    /// allow it and relayed when they do not (API: docs/daemon-api.md).
    #[command(display_order = 59)]
    Daemon(daemon::DaemonArgs),
    /// A connection to a service of another natpunch daemon, through this host's daemon: copied
    /// to and from stdin/stdout (like netcat), given to a command, or passed to ssh.
    #[command(display_order = 60)]
    Connect(connect::ConnectArgs),
    /// Take connections to a service from other daemons, through this host's daemon: the first
    /// copied to and from stdin/stdout (like netcat), or each given to a command.
    #[command(display_order = 61)]
    Accept(connect::AcceptArgs),
    /// Benchmarks, each against a baseline in the same run.
    #[command(subcommand, display_order = 90)]
    Bench(bench::BenchCommand),
}

/// A libp2p protocol name from the command line (it starts with `/`).
pub fn stream_protocol(s: &str) -> Result<libp2p::StreamProtocol, String> {
    libp2p::StreamProtocol::try_from_owned(s.to_owned())
        .map_err(|e| format!("{e} (a protocol name starts with /, e.g. /ipfs/kad/1.0.0)"))
}

#[cfg(test)]
mod tests {
    use clap::{ArgAction, CommandFactory as _, Parser as _};

    use super::Cli;

    /// Calls `f` with every command of the tree (built, so that global flags appear in each
    /// subcommand) and its path, e.g. `natpunch lab up`.
    fn walk(cmd: &clap::Command, path: &str, f: &mut impl FnMut(&str, &clap::Command)) {
        f(path, cmd);
        for sub in cmd.get_subcommands() {
            walk(sub, &format!("{path} {}", sub.get_name()), f);
        }
    }

    /// The subcommand `args` (a command line written for a child, without the program)
    /// parses to.
    pub(crate) fn parse(args: Vec<std::ffi::OsString>) -> super::Command {
        let line = std::iter::once("natpunch".into()).chain(args);
        match Cli::try_parse_from(line) {
            Ok(cli) => cli.command,
            Err(e) => panic!("natpunch refuses the command line written for a child: {e}"),
        }
    }

    fn built() -> clap::Command {
        let mut cmd = Cli::command();
        cmd.build();
        cmd
    }

    /// The README promises a `NATPUNCH_*` environment variable for every flag.
    #[test]
    fn every_flag_has_a_natpunch_env_var() {
        Cli::command().debug_assert();
        let mut missing = Vec::new();
        let mut foreign = Vec::new();
        let mut flags = 0;
        walk(&built(), "natpunch", &mut |path, cmd| {
            for arg in cmd.get_arguments() {
                let exempt = matches!(
                    arg.get_action(),
                    ArgAction::Help
                        | ArgAction::HelpShort
                        | ArgAction::HelpLong
                        | ArgAction::Version
                );
                if arg.is_positional() || exempt {
                    continue;
                }
                flags += 1;
                let flag = match arg.get_long() {
                    Some(long) => format!("--{long}"),
                    None => format!("{:?}", arg.get_id()),
                };
                match arg.get_env().map(|e| e.to_string_lossy().into_owned()) {
                    None => missing.push(format!("{path} {flag}")),
                    Some(env) if !env.starts_with("NATPUNCH_") => {
                        foreign.push(format!("{path} {flag}: {env}"));
                    }
                    Some(_) => {}
                }
            }
        });
        assert!(flags > 100, "the walk found only {flags} flags");
        assert!(
            missing.is_empty() && foreign.is_empty(),
            "flags without an environment variable (add env = \"NATPUNCH_…\"):\n  {}\n\
             environment variables not named NATPUNCH_*:\n  {}",
            missing.join("\n  "),
            foreign.join("\n  ")
        );
    }

    /// One variable may not set two flags of the same command.
    #[test]
    fn env_vars_are_unique_within_a_command() {
        let mut clashes = Vec::new();
        walk(&built(), "natpunch", &mut |path, cmd| {
            let mut seen = std::collections::HashMap::new();
            for arg in cmd.get_arguments() {
                let Some(env) = arg.get_env() else { continue };
                if let Some(first) = seen.insert(env.to_owned(), arg.get_id().clone()) {
                    clashes.push(format!(
                        "{path}: {} sets both {first} and {}",
                        env.to_string_lossy(),
                        arg.get_id()
                    ));
                }
            }
        });
        assert!(clashes.is_empty(), "{}", clashes.join("\n"));
    }

    /// clap takes a boolean flag's variable for the flag given even when it says `false`
    /// (clap-rs/clap#5591): `NATPUNCH_CAMPAIGN_POSTGRES=false` would clash with
    /// `--database-url`. Such flags stay out of clap's conflicts; the commands check them.
    #[test]
    fn env_booleans_take_no_part_in_conflicts() {
        let env_bool =
            |a: &clap::Arg| a.get_env().is_some() && matches!(a.get_action(), ArgAction::SetTrue);
        let mut booleans = 0;
        let mut clashes = Vec::new();
        walk(&built(), "natpunch", &mut |path, cmd| {
            for arg in cmd.get_arguments() {
                booleans += usize::from(env_bool(arg));
                for other in cmd.get_arg_conflicts_with(arg) {
                    if env_bool(arg) || env_bool(other) {
                        clashes.push(format!(
                            "{path}: {} conflicts with {}",
                            arg.get_id(),
                            other.get_id()
                        ));
                    }
                }
            }
        });
        assert!(
            booleans > 10,
            "the walk found only {booleans} boolean flags"
        );
        assert!(clashes.is_empty(), "{}", clashes.join("\n"));
    }
}
