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
