//! The flags of `natpunch connect` and `natpunch accept`, the netcat-like clients of the
//! daemon's application API.

use crate::args::Json;
use clap::Args;
use clap::builder::BoolishValueParser;
use libp2p::PeerId;
use natpunch_client::Proto;
use std::path::PathBuf;

/// What the flags shared by `connect` and `accept` name: the daemon's socket, the service and
/// the transport.
#[derive(Debug, Args)]
pub struct Endpoint {
    /// The service: 1 to 64 of A-Z a-z 0-9 . _ - (the remote's `natpunch accept --service`).
    #[arg(
        long,
        env = "NATPUNCH_SERVICE",
        default_value = natpunch_client::defaults::SERVICE,
        value_parser = service
    )]
    pub service: String,
    /// A UDP socket (connected: each read of standard input is one datagram) instead of TCP.
    #[arg(long, env = "NATPUNCH_UDP", value_parser = BoolishValueParser::new())]
    pub udp: bool,
    /// The daemon's socket [default: /run/natpunch/daemon.sock for root,
    /// $XDG_RUNTIME_DIR/natpunch/daemon.sock (or /tmp/natpunch-<uid>/daemon.sock) for others].
    #[arg(long, env = "NATPUNCH_DAEMON_SOCKET", value_name = "PATH")]
    pub socket: Option<PathBuf>,
}

impl Endpoint {
    /// The transport asked for.
    pub fn proto(&self) -> Proto {
        if self.udp { Proto::Udp } else { Proto::Tcp }
    }

    /// The daemon's socket: the one given, or the default for this user.
    pub fn socket_path(&self) -> PathBuf {
        self.socket
            .clone()
            .unwrap_or_else(natpunch_client::default_socket)
    }
}

#[derive(Debug, Args)]
#[command(mut_arg("json", |a| a.help("Write progress and the result as JSON lines on stderr")))]
pub struct ConnectArgs {
    /// The remote daemon's peer ID (12D3KooW…; `natpunch daemon` prints it).
    #[arg(value_parser = peer_id)]
    pub peer: PeerId,
    #[command(flatten)]
    pub endpoint: Endpoint,
    /// Run this command (with sh -c) with the connection as its standard input and output,
    /// instead of copying natpunch's; natpunch exits with its status.
    #[arg(long, env = "NATPUNCH_EXEC", value_name = "CMD")]
    pub exec: Option<String>,
    /// Pass the connected socket to the parent over standard output, which must be a Unix
    /// socket, and exit: for ssh's ProxyUseFdpass=yes (ssh -o ProxyUseFdpass=yes -o
    /// ProxyCommand='natpunch connect PEER --service ssh --fdpass' host).
    #[arg(long, env = "NATPUNCH_FDPASS", value_parser = BoolishValueParser::new())]
    pub fdpass: bool,
    #[command(flatten)]
    pub json: Json,
}

/// What `natpunch connect` does with the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectOutput {
    /// Copy it to and from standard input and output.
    Stdio,
    /// Run the command on it.
    Exec(String),
    /// Pass it over standard output.
    Fdpass,
}

impl ConnectArgs {
    /// What to do with the connection.
    ///
    /// # Errors
    ///
    /// When `--exec` and `--fdpass` are both given (checked here rather than by clap, since
    /// a boolean flag's variable counts as given even when it says false, clap-rs/clap#5591).
    pub fn output(&self) -> Result<ConnectOutput, String> {
        match (&self.exec, self.fdpass) {
            (Some(_), true) => Err(
                "--exec and --fdpass exclude each other: the connection goes to the command or to the parent".to_owned(),
            ),
            (Some(cmd), false) => Ok(ConnectOutput::Exec(cmd.clone())),
            (None, true) => Ok(ConnectOutput::Fdpass),
            (None, false) => Ok(ConnectOutput::Stdio),
        }
    }
}

#[derive(Debug, Args)]
#[command(mut_arg("json", |a| a.help("Write each connection's details as JSON lines on stderr")))]
pub struct AcceptArgs {
    #[command(flatten)]
    pub endpoint: Endpoint,
    /// Run this command (with sh -c) for each connection, with the connection as its standard
    /// input and output; without it, the first connection is copied to and from natpunch's
    /// standard input and output, and natpunch exits when it ends.
    #[arg(long, env = "NATPUNCH_EXEC", value_name = "CMD")]
    pub exec: Option<String>,
    /// With --exec: serve one connection, wait for its command, and exit with its status.
    #[arg(long, env = "NATPUNCH_ONCE", value_parser = BoolishValueParser::new())]
    pub once: bool,
    #[command(flatten)]
    pub json: Json,
}

/// A daemon's peer ID.
pub fn peer_id(s: &str) -> Result<PeerId, String> {
    s.parse()
        .map_err(|e| format!("not a peer ID ({e}); a daemon's starts with 12D3KooW"))
}

/// A service name: 1 to 64 of `A-Z a-z 0-9 . _ -` (`docs/daemon-api.md`).
pub fn service(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(s.to_owned())
    } else {
        Err("a service name has 1 to 64 of A-Z a-z 0-9 . _ -".to_owned())
    }
}

#[cfg(test)]
mod tests {
    use crate::Command;
    use crate::tests::parse;

    use super::*;

    const PEER: &str = "12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN";

    fn connect(args: &[&str]) -> ConnectArgs {
        let line = ["connect", PEER]
            .iter()
            .chain(args)
            .map(Into::into)
            .collect();
        match parse(line) {
            Command::Connect(args) => args,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn connect_takes_a_peer_and_what_to_do_with_the_connection() {
        let args = connect(&[]);
        assert_eq!(args.peer.to_string(), PEER);
        assert_eq!(args.endpoint.service, "default");
        assert_eq!(args.endpoint.proto(), Proto::Tcp);
        assert_eq!(args.output(), Ok(ConnectOutput::Stdio));
        let args = connect(&["--udp", "--service", "game.v2", "--exec", "cat"]);
        assert_eq!(args.endpoint.proto(), Proto::Udp);
        assert_eq!(args.endpoint.service, "game.v2");
        assert_eq!(args.output(), Ok(ConnectOutput::Exec("cat".into())));
        assert_eq!(connect(&["--fdpass"]).output(), Ok(ConnectOutput::Fdpass));
        let both = connect(&["--fdpass", "--exec", "cat"]).output();
        assert!(both.is_err_and(|e| e.contains("exclude each other")));
        assert_eq!(
            connect(&["--socket", "/x/d.sock"]).endpoint.socket_path(),
            PathBuf::from("/x/d.sock")
        );
    }

    #[test]
    fn service_names_are_checked_before_the_daemon_sees_them() {
        assert!(service("ssh").is_ok() && service("a.b_c-9").is_ok());
        for bad in ["", "a b", "ssh/22", &"x".repeat(65)] {
            assert!(service(bad).is_err(), "{bad:?}");
        }
        assert!(service(&"x".repeat(64)).is_ok());
        assert!(peer_id("nope").is_err_and(|e| e.starts_with("not a peer ID")));
        assert!(peer_id(PEER).is_ok());
    }
}
