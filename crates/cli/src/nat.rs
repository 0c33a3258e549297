//! The flags of `natpunch stun-server` and `natpunch nat check`.

use crate::args::Json;
use clap::builder::BoolishValueParser;
use clap::{Args, Subcommand};
use std::net::SocketAddr;

#[derive(Debug, Args)]
pub struct StunServerArgs {
    /// Primary address (IP:PORT) that clients ask first.
    #[arg(long, env = "NATPUNCH_STUN_PRIMARY")]
    pub primary: SocketAddr,
    /// Alternate address: a second IP address of this host and a second port (RFC 5780).
    #[arg(long, env = "NATPUNCH_STUN_ALTERNATE")]
    pub alternate: SocketAddr,
}

#[derive(Debug, Subcommand)]
pub enum NatCommand {
    /// Discover the NAT in front of this host with an RFC 5780 STUN server (natpunch stun-server
    /// or coturn with two addresses).
    Check(CheckArgs),
}

#[derive(Debug, Args)]
#[command(mut_arg("json", |a| a.help("Print the report as JSON")))]
pub struct CheckArgs {
    /// The server's primary address (HOST:PORT).
    #[arg(long, env = "NATPUNCH_STUN_SERVER")]
    pub server: String,
    #[command(flatten)]
    pub json: Json,
    /// Also measure the UDP mapping lifetime (takes as long as the lifetime, up to --lifetime-max).
    #[arg(long, env = "NATPUNCH_NAT_LIFETIME", value_parser = BoolishValueParser::new())]
    pub lifetime: bool,
    /// Longest lifetime to look for, in seconds.
    #[arg(long, env = "NATPUNCH_NAT_LIFETIME_MAX", default_value_t = 180)]
    pub lifetime_max: u64,
}

crate::write_args!(StunServerArgs { primary, alternate });
