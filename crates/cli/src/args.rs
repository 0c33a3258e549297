//! Flag groups that several subcommands share, each flattened into them: `--json`, the
//! telemetry port (`--telemetry-host`, `--telemetry-port`) and the key file (`--identity`).
//!
//! The telemetry and identity groups keep each role's own environment variables, defaults and
//! help: a role's flags struct flattens `Telemetry<Self>` or `Identity<Self>`, and its
//! [`TelemetryRole`] or [`IdentityRole`] implementation below names them, every role's in one
//! place.

use clap::builder::BoolishValueParser;
use clap::error::ErrorKind;
use clap::{Arg, ArgMatches, Args, Command, FromArgMatches};
use std::marker::PhantomData;
use std::net::IpAddr;
use std::path::PathBuf;

/// `--json` (a subcommand whose output is not "Print JSON." says so with `mut_arg`).
#[derive(Debug, Clone, Copy, Args)]
pub struct Json {
    /// Print JSON.
    #[arg(long, env = "NATPUNCH_JSON", value_parser = BoolishValueParser::new())]
    pub json: bool,
}

/// What one role's telemetry flags are called and default to.
pub trait TelemetryRole {
    /// The variable for `--telemetry-host`.
    const HOST_ENV: &'static str;
    /// The variable for `--telemetry-port`.
    const PORT_ENV: &'static str;
    /// The default host.
    const HOST: &'static str = "127.0.0.1";
    /// The default port.
    const PORT: &'static str;
    /// Whether the host may be a name (resolved at start) rather than an IP address.
    const NAMES: bool = false;
}

/// The telemetry port (`/metrics`, `/health`) of a long-running role.
#[derive(Debug, Clone)]
pub struct Telemetry<R> {
    pub host: String,
    pub port: u16,
    role: PhantomData<R>,
}

impl TelemetryRole for crate::relay::RelayArgs {
    const HOST_ENV: &'static str = "NATPUNCH_TELEMETRY_HOST";
    const PORT_ENV: &'static str = "NATPUNCH_TELEMETRY_PORT";
    const PORT: &'static str = "9464";
}

impl TelemetryRole for crate::honeypot::HoneypotArgs {
    const HOST_ENV: &'static str = "NATPUNCH_HONEYPOT_TELEMETRY_HOST";
    const PORT_ENV: &'static str = "NATPUNCH_HONEYPOT_TELEMETRY_PORT";
    const PORT: &'static str = "11001";
}

impl TelemetryRole for crate::client::ClientArgs {
    const HOST_ENV: &'static str = "NATPUNCH_CLIENT_TELEMETRY_HOST";
    const PORT_ENV: &'static str = "NATPUNCH_CLIENT_TELEMETRY_PORT";
    const PORT: &'static str = "12001";
}

impl TelemetryRole for crate::daemon::DaemonArgs {
    const HOST_ENV: &'static str = "NATPUNCH_DAEMON_TELEMETRY_HOST";
    const PORT_ENV: &'static str = "NATPUNCH_DAEMON_TELEMETRY_PORT";
    const PORT: &'static str = "13001";
}

impl TelemetryRole for crate::server::ServerArgs {
    const HOST_ENV: &'static str = "NATPUNCH_SERVER_TELEMETRY_HOST";
    const PORT_ENV: &'static str = "NATPUNCH_SERVER_TELEMETRY_PORT";
    const HOST: &'static str = "localhost";
    const PORT: &'static str = "10001";
    const NAMES: bool = true;
}

const TELEMETRY_HOST: &str = "telemetry_host";

const TELEMETRY_PORT: &str = "telemetry_port";

impl<R: TelemetryRole> Args for Telemetry<R> {
    fn augment_args(cmd: Command) -> Command {
        let host = Arg::new(TELEMETRY_HOST)
            .long("telemetry-host")
            .value_name("TELEMETRY_HOST")
            .env(R::HOST_ENV)
            .default_value(R::HOST)
            .help("Host of the telemetry port (/metrics, /health)");
        let host = if R::NAMES {
            host
        } else {
            host.value_parser(|s: &str| s.parse::<IpAddr>().map(|_| s.to_owned()))
        };
        let port = Arg::new(TELEMETRY_PORT)
            .long("telemetry-port")
            .value_name("TELEMETRY_PORT")
            .env(R::PORT_ENV)
            .default_value(R::PORT)
            .value_parser(clap::value_parser!(u16))
            .help("Telemetry port; 0 turns it off");
        cmd.arg(host).arg(port)
    }

    fn augment_args_for_update(cmd: Command) -> Command {
        Self::augment_args(cmd)
    }
}

impl<R> FromArgMatches for Telemetry<R> {
    fn from_arg_matches(m: &ArgMatches) -> Result<Self, clap::Error> {
        Self::from_arg_matches_mut(&mut m.clone())
    }

    fn from_arg_matches_mut(m: &mut ArgMatches) -> Result<Self, clap::Error> {
        Ok(Self {
            host: take(m, TELEMETRY_HOST)?,
            port: take(m, TELEMETRY_PORT)?,
            role: PhantomData,
        })
    }

    fn update_from_arg_matches(&mut self, m: &ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(m)?;
        Ok(())
    }
}

/// What one role's `--identity` is called and where its key lives by default.
pub trait IdentityRole {
    /// The variable for `--identity`.
    const ENV: &'static str;
    /// The flag's help.
    const HELP: &'static str;
    /// The key file in natpunch's state directory, or `None` for a fresh key each run.
    const FILE: Option<&'static str>;
}

/// A role's key file (`--identity`).
#[derive(Debug, Clone)]
pub struct Identity<R> {
    pub path: Option<PathBuf>,
    role: PhantomData<R>,
}

impl IdentityRole for crate::relay::RelayArgs {
    const ENV: &'static str = "NATPUNCH_RELAY_IDENTITY";
    const HELP: &'static str = "The relay's key file, created on first start [default: \
        $XDG_STATE_HOME/natpunch/relay.key or ~/.local/state/natpunch/relay.key]";
    const FILE: Option<&'static str> = Some("relay.key");
}

impl IdentityRole for crate::honeypot::HoneypotArgs {
    const ENV: &'static str = "NATPUNCH_HONEYPOT_IDENTITY";
    const HELP: &'static str = "The honeypot's key file, created on first start [default: \
        $XDG_STATE_HOME/natpunch/ honeypot.key or ~/.local/state/natpunch/honeypot.key]";
    const FILE: Option<&'static str> = Some("honeypot.key");
}

impl IdentityRole for crate::daemon::DaemonArgs {
    const ENV: &'static str = "NATPUNCH_DAEMON_IDENTITY";
    const HELP: &'static str = "The daemon's key file, created on first start [default: \
        $XDG_STATE_HOME/natpunch/daemon.key or ~/.local/state/natpunch/daemon.key]";
    const FILE: Option<&'static str> = Some("daemon.key");
}

impl IdentityRole for crate::peer::Common {
    const ENV: &'static str = "NATPUNCH_PEER_IDENTITY";
    const HELP: &'static str = "Key file [default: a fresh identity each run]";
    const FILE: Option<&'static str> = None;
}

const IDENTITY: &str = "identity";

impl<R: IdentityRole> Args for Identity<R> {
    fn augment_args(cmd: Command) -> Command {
        cmd.arg(
            Arg::new(IDENTITY)
                .long("identity")
                .value_name("IDENTITY")
                .env(R::ENV)
                .value_parser(clap::value_parser!(PathBuf))
                .help(R::HELP),
        )
    }

    fn augment_args_for_update(cmd: Command) -> Command {
        Self::augment_args(cmd)
    }
}

impl<R> FromArgMatches for Identity<R> {
    fn from_arg_matches(m: &ArgMatches) -> Result<Self, clap::Error> {
        Self::from_arg_matches_mut(&mut m.clone())
    }

    fn from_arg_matches_mut(m: &mut ArgMatches) -> Result<Self, clap::Error> {
        Ok(Self {
            path: m.remove_one(IDENTITY),
            role: PhantomData,
        })
    }

    fn update_from_arg_matches(&mut self, m: &ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(m)?;
        Ok(())
    }
}

/// The value of a flag that has a default.
fn take<T: Clone + Send + Sync + 'static>(m: &mut ArgMatches, id: &str) -> Result<T, clap::Error> {
    m.remove_one(id).ok_or_else(|| {
        clap::Error::raw(
            ErrorKind::MissingRequiredArgument,
            format!("--{} has no value\n", id.replace('_', "-")),
        )
    })
}

crate::write_args!(Json { json });

impl<R> crate::write::WriteArgs for Telemetry<R> {
    fn write(&self, w: &mut crate::write::Writer) {
        w.field(TELEMETRY_HOST, crate::write::display(&self.host));
        w.field(TELEMETRY_PORT, crate::write::display(&self.port));
    }
}

impl<R> crate::write::WriteArgs for Identity<R> {
    fn write(&self, w: &mut crate::write::Writer) {
        w.field(IDENTITY, crate::write::ArgValue::texts(&self.path));
    }
}

impl<R> Identity<R> {
    /// The key in `path`, or (`None`) the role's default.
    pub fn new(path: Option<PathBuf>) -> Self {
        Self {
            path,
            role: PhantomData,
        }
    }
}
