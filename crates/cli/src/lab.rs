//! The flags of `natpunch lab …`: topologies in namespaces, programs in them, the self-test.

use crate::args::Json;
use clap::builder::BoolishValueParser;
use clap::{Args, Subcommand};
use natlab::{Preset, SessionOverflow};
use std::path::PathBuf;

#[derive(Debug, Subcommand)]
pub enum LabCommand {
    /// Build a lab from a topology file and leave it running; prints its nodes and addresses.
    Up(UpArgs),
    /// Run a command inside a node of a running lab (with the terminal attached).
    Exec(ExecArgs),
    /// Remove a running lab: its namespaces with their veths and nft tables, and every process
    /// still running inside them.
    Down(DownArgs),
    /// List running labs.
    List(ListArgs),
    /// Build every NAT preset, measure it from a host behind it, and compare with its configuration.
    Selftest(SelftestArgs),
    /// Remove labs left behind by crashed runs (detached labs are kept).
    Sweep,
    /// Power-cycle a router: it goes dark, forgets its NAT and port mappings, and comes back
    /// with a fresh miniupnpd (epoch from zero) if it maps ports.
    Reboot(RebootArgs),
    /// Give a router a new external address (its NAT rules follow; miniupnpd announces it).
    Renumber(RenumberArgs),
    /// Hole punches between every pair of NAT presets (fresh peers and NAT state per trial):
    /// success rate, outcomes, time to direct, attempts needed, per transport.
    Matrix(crate::matrix::MatrixArgs),
    /// Applications connected by two daemons behind every pair of NAT presets (fresh daemons
    /// and NAT state per trial): sockets that carried 1 MiB each way, direct ones, winning
    /// technique, time to socket, per transport.
    ConnectMatrix(crate::matrix::ConnectMatrixArgs),
    /// The measurement system end to end: relay, DHT, honeypot, server, and a target and a
    /// client behind every preset; outcome mix, rates and the NAT-pair matrix from the database.
    Campaign(crate::campaign::CampaignArgs),
    /// Run the delay lines of a detached lab until terminated (started by `lab up`).
    #[command(hide = true)]
    Hold {
        /// Lab name.
        name: String,
    },
}

#[derive(Debug, Args)]
#[command(mut_arg("json", |a| a.help("Print the lab plan as JSON")))]
pub struct UpArgs {
    /// Topology file (TOML; see docs/lab.md and examples/labs/).
    pub file: PathBuf,
    /// Lab name [default: the file name without extension].
    #[arg(long, env = "NATPUNCH_LAB_NAME")]
    pub name: Option<String>,
    /// Seed for link jitter and loss.
    #[arg(long, env = "NATPUNCH_LAB_SEED", default_value_t = 1)]
    pub seed: u64,
    #[command(flatten)]
    pub json: Json,
}

#[derive(Debug, Args)]
pub struct ExecArgs {
    /// Lab name.
    pub lab: String,
    /// Node name.
    pub node: String,
    /// The command and its arguments (after `--`).
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

#[derive(Debug, Args)]
pub struct DownArgs {
    /// Lab name (or --all).
    pub lab: Option<String>,
    /// Remove every detached or stale lab on this machine (labs owned by running programs stay).
    #[arg(long, env = "NATPUNCH_LAB_ALL", value_parser = BoolishValueParser::new())]
    pub all: bool,
}

#[derive(Debug, Args)]
pub struct RebootArgs {
    /// Lab name.
    pub lab: String,
    /// Router name.
    pub router: String,
    /// How long the router stays dark, in seconds.
    #[arg(long, env = "NATPUNCH_LAB_DOWN_SECS", default_value_t = natlab::defaults::REBOOT_DOWNTIME.as_secs_f64())]
    pub down_secs: f64,
}

#[derive(Debug, Args)]
#[command(mut_arg("json", |a| a.help("Print `{\"router\":…,\"old\":…,\"new\":…}` as JSON")))]
pub struct RenumberArgs {
    /// Lab name.
    pub lab: String,
    /// Router name.
    pub router: String,
    /// The new address [default: the highest free address of the router's uplink network].
    #[arg(long, env = "NATPUNCH_LAB_IP")]
    pub ip: Option<std::net::Ipv4Addr>,
    #[command(flatten)]
    pub json: Json,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    #[command(flatten)]
    pub json: Json,
}

#[derive(Debug, Args)]
#[command(mut_arg("json", |a| a.help("Print `{\"presets\":[…]}` as JSON instead of a table")))]
pub struct SelftestArgs {
    #[command(flatten)]
    pub json: Json,
    /// Test only these presets: open, full-cone, restricted-cone, port-restricted, symmetric,
    /// symmetric-sequential, cgnat (comma-separated or repeated) [default: all].
    #[arg(long = "preset", env = "NATPUNCH_LAB_PRESETS", value_delimiter = ',')]
    pub presets: Vec<Preset>,
    /// Give every router of the tested presets a session table of N sessions (16 to 256) and
    /// measure it first: N + 8 new UDP flows, how many are answered and which keep their
    /// mappings.
    #[arg(long, env = "NATPUNCH_LAB_MAX_SESSIONS", value_name = "N")]
    pub max_sessions: Option<u32>,
    /// What a full session table does with a new flow: `drop` it, or `evict-oldest` (the new
    /// flow goes through and the oldest live flow loses its mapping).
    #[arg(
        long,
        env = "NATPUNCH_LAB_SESSION_OVERFLOW",
        default_value = "drop",
        requires = "max_sessions"
    )]
    pub session_overflow: SessionOverflow,
}
