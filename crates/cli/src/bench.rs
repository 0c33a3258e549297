//! The flags of `natpunch bench …`: the punch, STUN and server benchmarks.

use crate::args::Json;
use clap::builder::BoolishValueParser;
use clap::{Args, Subcommand};

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Binding throughput of natpunch's STUN server against coturn's, on loopback, in turns.
    Stun(StunArgs),
    /// Time to a direct connection, natpunch's DCUtR engine against stock rust-libp2p, between
    /// two port-restricted homes in the lab, each as a ratio to the floor.
    Punch(PunchArgs),
    /// Time to a socket from the daemon (TCP, UDP, and relayed where no punch can work) against
    /// the libp2p engine's time to direct, between two port-restricted homes in the lab.
    Connect(ConnectBenchArgs),
    /// The measurement server under concurrent clients: reports/s and latency on SQLite and on
    /// PostgreSQL, beside each database's limit (the same rows stored straight into it, 1,000
    /// reports per transaction) and natpunch / limit.
    Server(ServerBenchArgs),
}

#[derive(Debug, Args)]
pub struct PunchArgs {
    /// Hole punches per engine and transport.
    #[arg(long, env = "NATPUNCH_BENCH_TRIALS", default_value_t = 10)]
    pub trials: u32,
    /// Host-to-host round trip through the lab's internet, in ms.
    #[arg(long, env = "NATPUNCH_BENCH_RTT_MS", default_value_t = 100)]
    pub rtt_ms: u32,
    /// MiB sent per throughput test (relayed circuit against the direct connection, over TCP).
    #[arg(long, env = "NATPUNCH_BENCH_PERF_MIB", default_value_t = 8)]
    pub perf_mib: u64,
    /// Throughput tests per connection kind (0: none).
    #[arg(long, env = "NATPUNCH_BENCH_PERF_TRIALS", default_value_t = 3)]
    pub perf_trials: u32,
    #[command(flatten)]
    pub json: Json,
}

#[derive(Debug, Args)]
#[command(mut_arg("json", |a| a.help("Print the figures as JSON")))]
pub struct ConnectBenchArgs {
    /// Connections per arm (and hole punches per transport for the libp2p engine).
    #[arg(long, env = "NATPUNCH_BENCH_TRIALS", default_value_t = 10)]
    pub trials: u32,
    /// Host-to-host round trip through the lab's internet, in ms.
    #[arg(long, env = "NATPUNCH_BENCH_RTT_MS", default_value_t = 100)]
    pub rtt_ms: u32,
    #[command(flatten)]
    pub json: Json,
}

#[derive(Debug, Args)]
pub struct StunArgs {
    /// Seconds of load per turn.
    #[arg(long, env = "NATPUNCH_BENCH_SECS", default_value_t = 3)]
    pub secs: u64,
    /// Turns per server (natpunch and coturn alternate).
    #[arg(long, env = "NATPUNCH_BENCH_ROUNDS", default_value_t = 3)]
    pub rounds: usize,
    /// Concurrent clients, each with one request in flight.
    #[arg(long, env = "NATPUNCH_BENCH_CLIENTS", default_value_t = 16)]
    pub clients: usize,
    /// The coturn server binary.
    #[arg(long, env = "NATPUNCH_BENCH_COTURN", default_value = "turnserver")]
    pub coturn: String,
    #[command(flatten)]
    pub json: Json,
}

#[derive(Debug, Args)]
#[command(mut_arg("json", |a| a.help("Print the figures as JSON")))]
pub struct ServerBenchArgs {
    /// Concurrent clients, each on its own connection.
    #[arg(long, env = "NATPUNCH_BENCH_SERVER_CLIENTS", default_value_t = 32)]
    pub clients: usize,
    /// Reports per backend.
    #[arg(long, env = "NATPUNCH_BENCH_REPORTS", default_value_t = 4000)]
    pub reports: u64,
    /// PostgreSQL database to fill (tables are created, rows added) [default: a private
    /// server started for the run, removed after].
    #[arg(long, env = "NATPUNCH_BENCH_POSTGRES_URL")]
    pub postgres_url: Option<String>,
    /// Skip PostgreSQL (no ratio then).
    #[arg(long, env = "NATPUNCH_BENCH_SQLITE_ONLY", value_parser = BoolishValueParser::new())]
    pub sqlite_only: bool,
    #[command(flatten)]
    pub json: Json,
}
