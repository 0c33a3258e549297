//! Writing a command line back from its types, for the roles labrun starts as processes.
//!
//! A role's flags struct lists its fields once, in [`write_args!`], which destructures the
//! struct without `..`: a field added, renamed or removed fails to compile until the list
//! follows. Each field's flag (`--long`), whether it is a switch or takes a value, and whether
//! it is positional are read from the clap definition itself, so a renamed flag follows by
//! itself. Every field is written, defaults included, so the child depends neither on its
//! defaults nor on its environment.

use std::ffi::OsString;
use std::fmt::Display;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use clap::{ArgAction, Args, Command, FromArgMatches};
use libp2p::{Multiaddr, PeerId, StreamProtocol};

/// A field's value as the texts of its occurrences on the command line (none: left out).
pub trait ArgValue {
    /// The texts.
    fn texts(&self) -> Vec<OsString>;
}

/// Values whose text form is what their parser reads.
macro_rules! display_values {
    ($($t:ty),* $(,)?) => {
        $(impl ArgValue for $t {
            fn texts(&self) -> Vec<OsString> {
                vec![self.to_string().into()]
            }
        })*
    };
}

display_values!(
    u16,
    u32,
    u64,
    usize,
    f64,
    String,
    IpAddr,
    std::net::Ipv4Addr,
    SocketAddr,
    behaviour::Mapping,
    behaviour::Filtering,
    behaviour::PortAllocation,
    Multiaddr,
    PeerId,
    StreamProtocol,
    api::server::Filters,
);

impl ArgValue for bool {
    /// A switch: given when true.
    fn texts(&self) -> Vec<OsString> {
        if *self {
            vec!["true".into()]
        } else {
            Vec::new()
        }
    }
}

impl ArgValue for PathBuf {
    fn texts(&self) -> Vec<OsString> {
        vec![self.clone().into_os_string()]
    }
}

impl<T: ArgValue> ArgValue for Option<T> {
    fn texts(&self) -> Vec<OsString> {
        self.as_ref().map(ArgValue::texts).unwrap_or_default()
    }
}

impl<T: ArgValue> ArgValue for Vec<T> {
    fn texts(&self) -> Vec<OsString> {
        self.iter().flat_map(ArgValue::texts).collect()
    }
}

/// The text of a `clap::ValueEnum` value, as the command line names it.
pub fn value_name(v: &impl clap::ValueEnum) -> Vec<OsString> {
    v.to_possible_value()
        .map(|p| vec![OsString::from(p.get_name())])
        .unwrap_or_default()
}

/// The value of a `clap::ValueEnum` type that the command line names `name`.
///
/// # Errors
///
/// No value has that name.
pub fn named<T: clap::ValueEnum>(name: &str) -> Result<T, String> {
    T::from_str(name, false)
}

/// The text of a value shown with `Display`.
pub fn display(v: &impl Display) -> Vec<OsString> {
    vec![v.to_string().into()]
}

/// A flags struct (or a group flattened into one) that writes its fields.
pub trait WriteArgs {
    /// Writes every field into `w`.
    fn write(&self, w: &mut Writer);
}

/// Lists a flags struct's fields for [`WriteArgs`]: `write_args!(Type { plain, fields;
/// flatten groups })`. The fields are destructured without `..`, so the list must name them
/// all.
#[macro_export]
macro_rules! write_args {
    ($ty:ty { $($field:ident),* $(,)? $(; $($group:ident),* $(,)?)? }) => {
        impl $crate::write::WriteArgs for $ty {
            fn write(&self, w: &mut $crate::write::Writer) {
                let Self { $($field,)* $($($group,)*)? } = self;
                $( w.field(stringify!($field), $crate::write::ArgValue::texts($field)); )*
                $($( $crate::write::WriteArgs::write($group, w); )*)?
            }
        }
    };
}

/// Collects a command line from fields, against the clap definition of `T`.
#[derive(Debug)]
pub struct Writer {
    command: Command,
    flags: Vec<OsString>,
    positionals: Vec<OsString>,
}

impl Writer {
    /// A writer for the flags of `T`.
    pub fn new<T: Args>() -> Self {
        Self {
            command: T::augment_args(Command::new("natpunch")),
            flags: Vec::new(),
            positionals: Vec::new(),
        }
    }

    /// Writes the field whose argument id is `id` with the texts of its value.
    ///
    /// # Panics
    ///
    /// If `id` is no argument of the struct: [`write_args!`] names only the struct's fields,
    /// so that is a mistake in this crate, which its tests catch.
    pub fn field(&mut self, id: &str, texts: Vec<OsString>) {
        let Some(arg) = self.command.get_arguments().find(|a| a.get_id() == id) else {
            panic!("`{id}` is not an argument of {}", self.command.get_name());
        };
        if arg.is_positional() {
            self.positionals.extend(texts);
            return;
        }
        let Some(long) = arg.get_long() else {
            panic!("`{id}` has no long flag");
        };
        let flag = OsString::from(format!("--{long}"));
        if matches!(arg.get_action(), ArgAction::SetTrue) {
            if !texts.is_empty() {
                self.flags.push(flag);
            }
            return;
        }
        for text in texts {
            self.flags.push(flag.clone());
            self.flags.push(text);
        }
    }

    /// The command line: `words` (the subcommand), the flags, the positional values.
    pub fn finish(self, words: &[&str]) -> Vec<OsString> {
        words
            .iter()
            .map(OsString::from)
            .chain(self.flags)
            .chain(self.positionals)
            .collect()
    }
}

/// `value` as the command line `words …` that parses back to it.
pub fn to_args<T: Args + WriteArgs>(words: &[&str], value: &T) -> Vec<OsString> {
    let mut w = Writer::new::<T>();
    value.write(&mut w);
    w.finish(words)
}

/// The value of `T` with every argument at its default, as a command line without flags gives
/// it, the environment ignored (a parent's `NATPUNCH_*` must not reach its child's command
/// line). `required` gives the required arguments, as `(id, text)`.
///
/// # Errors
///
/// clap's, as text: a required argument missing from `required`, or a bad value.
pub fn defaults<T: Args + FromArgMatches>(required: &[(&str, &str)]) -> Result<T, String> {
    let command = T::augment_args(Command::new("natpunch")).mut_args(|a| a.env(None::<&str>));
    let mut line = vec![OsString::from("natpunch")];
    for (id, text) in required {
        let arg = command
            .get_arguments()
            .find(|a| a.get_id() == *id)
            .ok_or_else(|| format!("`{id}` is not an argument"))?;
        match arg.get_long() {
            Some(long) if !arg.is_positional() => line.push(format!("--{long}").into()),
            _ => {}
        }
        line.push((*text).into());
    }
    let matches = command
        .try_get_matches_from(line)
        .map_err(|e| e.to_string())?;
    T::from_arg_matches(&matches).map_err(|e| e.to_string())
}

/// `line` (as [`to_args`] wrote it for `T`) with the flags of `extra` in place of the ones of
/// the same name: `--flag=value`, `--flag value` or a bare switch, each a flag of `T`.
///
/// # Errors
///
/// A word of `extra` is no flag of `T`.
pub fn replace_flags<T: Args>(
    line: Vec<OsString>,
    extra: &[String],
) -> Result<Vec<OsString>, String> {
    let command = T::augment_args(Command::new("natpunch"));
    let takes_value = |long: &str| {
        command
            .get_arguments()
            .find(|a| a.get_long() == Some(long))
            .map(|a| a.get_action().takes_values())
    };
    let mut named = Vec::new();
    let mut words = extra.iter().peekable();
    while let Some(word) = words.next() {
        let Some(flag) = word.strip_prefix("--") else {
            return Err(format!("`{word}` is not a flag (--name or --name=value)"));
        };
        let long = flag.split_once('=').map_or(flag, |(name, _)| name);
        let Some(valued) = takes_value(long) else {
            return Err(format!("unknown flag --{long}"));
        };
        named.push(long.to_owned());
        if valued && !flag.contains('=') {
            words.next();
        }
    }
    let mut out = Vec::with_capacity(line.len() + extra.len());
    let mut line = line.into_iter();
    while let Some(word) = line.next() {
        let long = word
            .to_str()
            .and_then(|w| w.strip_prefix("--"))
            .map(|f| f.split_once('=').map_or(f, |(name, _)| name).to_owned());
        match long {
            Some(long) if named.contains(&long) => {
                let inline = word.to_str().is_some_and(|w| w.contains('='));
                if takes_value(&long) == Some(true) && !inline {
                    line.next();
                }
            }
            _ => out.push(word),
        }
    }
    out.extend(extra.iter().map(OsString::from));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Command;
    use crate::args::Identity;
    use crate::client::ClientArgs;
    use crate::honeypot::HoneypotArgs;
    use crate::nat::StunServerArgs;
    use crate::peer::{CandidatesArg, Common, DialArgs, EngineArg, PeerCommand, TransportArg};
    use crate::relay::{RateArg, RelayArgs};
    use crate::server::ServerArgs;
    use crate::tests::parse;

    const RELAY: &str =
        "/ip4/203.0.113.1/tcp/4001/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN";
    const PEER: &str = "12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN";

    fn text(line: &[OsString]) -> String {
        line.iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Writes `value`, parses it as natpunch does, writes what came back: the same line.
    fn round_trip<T: Args + WriteArgs>(
        words: &[&str],
        value: &T,
        back: impl FnOnce(Command) -> Option<T>,
    ) -> String {
        let line = to_args(words, value);
        let parsed = back(parse(line.clone())).unwrap_or_else(|| panic!("{}", text(&line)));
        assert_eq!(text(&to_args(words, &parsed)), text(&line));
        text(&line)
    }

    #[test]
    fn every_role_the_lab_starts_parses_back_to_what_was_written() {
        let mut relay: RelayArgs = defaults(&[]).expect("relay");
        relay.port = 4101;
        relay.external = vec!["/ip4/203.0.113.1/tcp/4101".parse().expect("addr")];
        relay.reservation_rate_per_peer = RateArg(Some("3/60".parse().expect("rate")));
        relay.circuit_rate_per_ip = RateArg(None);
        relay.identity = Identity::new(Some("relay.key".into()));
        relay.telemetry.port = 0;
        relay.json.json = true;
        let line = round_trip(&["relay"], &relay, |c| match c {
            Command::Relay(a) => Some(a),
            _ => None,
        });
        assert!(line.contains("--reservation-rate-per-peer 3/60"), "{line}");
        assert!(line.contains("--circuit-rate-per-ip off"), "{line}");
        assert!(line.contains("--identity relay.key") && line.contains("--json"));

        let mut dial: DialArgs = defaults(&[("peer_id", PEER), ("relay", RELAY)]).expect("dial");
        dial.perf_bytes = Some(1 << 20);
        dial.common.transport = TransportArg::Quic;
        dial.common.engine = EngineArg::Stock;
        dial.common.candidates = CandidatesArg::Stock;
        dial.common.no_punch = true;
        dial.common.dht_bootstrap = vec![RELAY.parse().expect("addr")];
        let line = round_trip(&["peer", "dial"], &dial, |c| match c {
            Command::Peer(PeerCommand::Dial(d)) => Some(d),
            _ => None,
        });
        assert!(line.starts_with("peer dial --perf-bytes 1048576"), "{line}");
        assert!(line.ends_with(PEER), "the peer is positional: {line}");
        assert!(line.contains("--transport quic --engine stock --candidates stock"));
        assert!(
            !line.contains("--identity") && !line.contains("--json"),
            "{line}"
        );

        let listen: Common = defaults(&[("relay", RELAY)]).expect("listen");
        round_trip(&["peer", "listen"], &listen, |c| match c {
            Command::Peer(PeerCommand::Listen(l)) => Some(l),
            _ => None,
        });

        let mut honeypot: HoneypotArgs = defaults(&[]).expect("honeypot");
        honeypot.bootstrap = vec![RELAY.parse().expect("addr")];
        honeypot.no_record = true;
        round_trip(&["honeypot"], &honeypot, |c| match c {
            Command::Honeypot(a) => Some(a),
            _ => None,
        });

        let mut server: ServerArgs = defaults(&[]).expect("server");
        server.protocol_filters = "ip4/tcp:1,ip4/quic-v1:1.5,none:0".parse().expect("filters");
        server.tls_cert = Some("cert.pem".into());
        server.tls_key = Some("key.pem".into());
        let line = round_trip(&["server"], &server, |c| match c {
            Command::Server(a) => Some(a),
            _ => None,
        });
        assert!(
            line.contains("--protocol-filters 4/6:1,4/461:1.5,none:0"),
            "{line}"
        );

        let mut client: ClientArgs = defaults(&[]).expect("client");
        client.api_key = Some("lab".into());
        client.idle_secs = 0.5;
        client.stun_server = Some("203.0.113.4:3478".parse().expect("addr"));
        round_trip(&["client"], &client, |c| match c {
            Command::Client(a) => Some(a),
            _ => None,
        });

        let stun: StunServerArgs = defaults(&[
            ("primary", "203.0.113.5:3478"),
            ("alternate", "203.0.113.6:3479"),
        ])
        .expect("stun");
        let line = round_trip(&["stun-server"], &stun, |c| match c {
            Command::StunServer(a) => Some(a),
            _ => None,
        });
        assert_eq!(
            line,
            "stun-server --primary 203.0.113.5:3478 --alternate 203.0.113.6:3479"
        );
    }

    #[test]
    fn defaults_ignore_the_environment_and_name_what_is_missing() {
        // The parent's variable would make the child's telemetry port 9999.
        #[expect(unsafe_code, reason = "no other test reads this variable")]
        // SAFETY: no other thread of this test binary reads NATPUNCH_TELEMETRY_PORT.
        unsafe {
            std::env::set_var("NATPUNCH_TELEMETRY_PORT", "9999");
        }
        let relay: RelayArgs = defaults(&[]).expect("relay");
        assert_eq!(relay.telemetry.port, 9464);
        let e = defaults::<Common>(&[]).expect_err("--relay is required");
        assert!(e.contains("--relay"), "{e}");
    }

    #[test]
    fn extra_flags_replace_the_written_ones_of_the_same_name() {
        let r: RelayArgs = defaults(&[]).expect("defaults");
        let line = to_args(&["relay"], &r);
        let written = |line: &[OsString], flag: &str| {
            line.iter().filter(|w| w.to_str() == Some(flag)).count()
        };
        assert_eq!(written(&line, "--port"), 1, "{line:?}");
        let replaced =
            replace_flags::<RelayArgs>(line.clone(), &["--port=4100".into(), "--json".into()])
                .expect("flags of the relay");
        assert_eq!(written(&replaced, "--port"), 0, "{replaced:?}");
        assert!(replaced.ends_with(&["--port=4100".into(), "--json".into()]));
        // The rest stays, in order; the line still parses.
        assert_eq!(
            replaced.len(),
            line.len() - 2 + 2 - written(&line, "--json")
        );
        let spaced = replace_flags::<RelayArgs>(line, &["--port".into(), "4200".into()])
            .expect("flags of the relay");
        assert!(spaced.ends_with(&["--port".into(), "4200".into()]));
        let err = replace_flags::<RelayArgs>(Vec::new(), &["--dance".into()]).expect_err("no flag");
        assert!(err.contains("--dance"), "{err}");
        assert!(replace_flags::<RelayArgs>(Vec::new(), &["port".into()]).is_err());
    }
}
