//! The flags of `natpunch lab campaign`: the measurement system end to end in the lab.

use crate::args::Json;
use clap::Args;
use clap::builder::BoolishValueParser;
use natlab::Preset;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Args)]
#[command(
    after_help = "The lab: a relay, a DHT bootstrap node, a node with the honeypot and the \
server, and behind each preset a target that reserves on the relay and joins the DHT, and a \
client with --hosts-per-client hosts. The clients stop when the budget is spent, deliver their \
reports and the summary is read from the database.",
    mut_arg("json", |a| a.help("Print the summary as JSON"))
)]
pub struct CampaignArgs {
    /// How long the clients punch: 90s, 3m, 1h [default: 3m, unless --punches is given].
    #[arg(
        long,
        env = "NATPUNCH_CAMPAIGN_DURATION",
        value_parser = parse_duration,
        conflicts_with = "punches"
    )]
    pub duration: Option<Duration>,
    /// Stop after this many punches in all.
    #[arg(long, env = "NATPUNCH_CAMPAIGN_PUNCHES")]
    pub punches: Option<u64>,
    /// Presets to put targets and clients behind (comma-separated) [default: open, full-cone,
    /// restricted-cone, port-restricted, symmetric, cgnat].
    #[arg(
        long,
        env = "NATPUNCH_CAMPAIGN_PRESETS",
        value_delimiter = ',',
        value_parser = crate::matrix::parse_preset
    )]
    pub presets: Vec<Preset>,
    /// Hosts per client.
    #[arg(long, env = "NATPUNCH_CAMPAIGN_HOSTS_PER_CLIENT", default_value_t = 2)]
    pub hosts_per_client: usize,
    /// No extra client behind a port-restricted router that maps ports (miniupnpd), punching
    /// with --port-mapping.
    #[arg(
        long,
        env = "NATPUNCH_CAMPAIGN_NO_PORT_MAPPED_CLIENT",
        value_parser = BoolishValueParser::new()
    )]
    pub no_port_mapped_client: bool,
    /// Host-to-host round trip through the lab's internet, in ms.
    #[arg(long, env = "NATPUNCH_CAMPAIGN_RTT_MS", default_value_t = 100)]
    pub rtt_ms: u32,
    /// The database [default: sqlite://WORK_DIR/campaign.db]. The lab's nodes have no network
    /// path to this machine's loopback: reach PostgreSQL over its Unix socket,
    /// postgres://USER@localhost/DB?host=/run/postgresql.
    #[arg(long, env = "NATPUNCH_DATABASE_URL")]
    pub database_url: Option<String>,
    /// Use a private PostgreSQL server, started for the run and removed after (the summary and
    /// report keep the figures).
    #[arg(long, env = "NATPUNCH_CAMPAIGN_POSTGRES", value_parser = BoolishValueParser::new())]
    pub postgres: bool,
    /// Where keys, the database and the clients' spools go [default: a new
    /// natpunch-campaign-UNIXTIME directory here].
    #[arg(long, env = "NATPUNCH_CAMPAIGN_WORK_DIR")]
    pub work_dir: Option<PathBuf>,
    /// Kill the server (SIGKILL) AT after the clients start and start it again DOWN later, as
    /// AT:DOWN (e.g. 10s:30s): the clients must lose nothing.
    #[arg(long, env = "NATPUNCH_CAMPAIGN_SERVER_OUTAGE", value_parser = parse_outage)]
    pub server_outage: Option<(Duration, Duration)>,
    /// Also write a self-contained HTML report with plots to this file.
    #[arg(long, env = "NATPUNCH_CAMPAIGN_REPORT")]
    pub report: Option<PathBuf>,
    #[command(flatten)]
    pub json: Json,
}

/// `90s`, `3m`, `1h`, or plain seconds. clap shows the value with the error, so the message
/// names only what is wrong with it.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (n, unit) = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or((s, "s"), |i| s.split_at(i));
    let n: f64 = n
        .parse()
        .map_err(|_| "not a duration: expected e.g. 90s, 3m, 1h".to_owned())?;
    let secs = match unit {
        "s" | "" => n,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        other => return Err(format!("unknown unit `{other}` (s, m, h)")),
    };
    if !secs.is_finite() || secs <= 0.0 {
        return Err("a duration must be above 0".to_owned());
    }
    Ok(Duration::from_secs_f64(secs))
}

pub fn parse_outage(s: &str) -> Result<(Duration, Duration), String> {
    let (at, down) = s.split_once(':').ok_or("not AT:DOWN, e.g. 10s:30s")?;
    let part = |p: &str| parse_duration(p).map_err(|e| format!("`{p}`: {e}"));
    Ok((part(at)?, part(down)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_like_people_write_them() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("3m"), Ok(Duration::from_secs(180)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("45"), Ok(Duration::from_secs(45)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("3 weeks").is_err());
        assert_eq!(
            parse_outage("10s:30s"),
            Ok((Duration::from_secs(10), Duration::from_secs(30)))
        );
        assert!(parse_outage("10s").is_err());
    }
}
