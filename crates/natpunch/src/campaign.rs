//! `natpunch lab campaign`: the measurement system end to end in the lab, summed up from its
//! database, with an HTML report.

use std::io::{IsTerminal as _, Write as _};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use clap::builder::BoolishValueParser;
use labrun::campaign::{self, CampaignConfig, Progress};
use natlab::Preset;

use crate::args::Json;

#[derive(Debug, Args)]
#[command(
    after_help = "The lab: a relay, a DHT bootstrap node, a node with the honeypot and the \
server, and behind each preset a target that reserves on the relay and joins the DHT, and a \
client with --hosts-per-client hosts. The clients stop when the budget is spent, deliver their \
reports and the summary is read from the database.",
    mut_arg("json", |a| a.help("Print the summary as JSON"))
)]
pub(crate) struct CampaignArgs {
    /// How long the clients punch: 90s, 3m, 1h [default: 3m, unless --punches is given].
    #[arg(
        long,
        env = "NATPUNCH_CAMPAIGN_DURATION",
        value_parser = parse_duration,
        conflicts_with = "punches"
    )]
    duration: Option<Duration>,
    /// Stop after this many punches in all.
    #[arg(long, env = "NATPUNCH_CAMPAIGN_PUNCHES")]
    punches: Option<u64>,
    /// Presets to put targets and clients behind (comma-separated) [default: all].
    #[arg(
        long,
        env = "NATPUNCH_CAMPAIGN_PRESETS",
        value_delimiter = ',',
        value_parser = crate::matrix::parse_preset
    )]
    presets: Vec<Preset>,
    /// Hosts per client.
    #[arg(long, env = "NATPUNCH_CAMPAIGN_HOSTS_PER_CLIENT", default_value_t = 2)]
    hosts_per_client: usize,
    /// No extra client behind a port-restricted router that maps ports (miniupnpd), punching
    /// with --port-mapping.
    #[arg(
        long,
        env = "NATPUNCH_CAMPAIGN_NO_PORT_MAPPED_CLIENT",
        value_parser = BoolishValueParser::new()
    )]
    no_port_mapped_client: bool,
    /// Host-to-host round trip through the lab's internet, in ms.
    #[arg(long, env = "NATPUNCH_CAMPAIGN_RTT_MS", default_value_t = 100)]
    rtt_ms: u32,
    /// The database [default: sqlite://WORK_DIR/campaign.db]. The lab's nodes have no network
    /// path to this machine's loopback: reach PostgreSQL over its Unix socket,
    /// postgres://USER@localhost/DB?host=/run/postgresql.
    #[arg(long, env = "NATPUNCH_DATABASE_URL")]
    database_url: Option<String>,
    /// Use a private PostgreSQL server, started for the run and removed after (the summary and
    /// report keep the figures).
    #[arg(long, env = "NATPUNCH_CAMPAIGN_POSTGRES", value_parser = BoolishValueParser::new())]
    postgres: bool,
    /// Where keys, the database and the clients' spools go [default: a new
    /// natpunch-campaign-UNIXTIME directory here].
    #[arg(long, env = "NATPUNCH_CAMPAIGN_WORK_DIR")]
    work_dir: Option<PathBuf>,
    /// Kill the server (SIGKILL) AT after the clients start and start it again DOWN later, as
    /// AT:DOWN (e.g. 10s:30s): the clients must lose nothing.
    #[arg(long, env = "NATPUNCH_CAMPAIGN_SERVER_OUTAGE", value_parser = parse_outage)]
    server_outage: Option<(Duration, Duration)>,
    /// Also write a self-contained HTML report with plots to this file.
    #[arg(long, env = "NATPUNCH_CAMPAIGN_REPORT")]
    report: Option<PathBuf>,
    #[command(flatten)]
    json: Json,
}

/// `90s`, `3m`, `1h`, or plain seconds. clap shows the value with the error, so the message
/// names only what is wrong with it.
fn parse_duration(s: &str) -> Result<Duration, String> {
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

fn parse_outage(s: &str) -> Result<(Duration, Duration), String> {
    let (at, down) = s.split_once(':').ok_or("not AT:DOWN, e.g. 10s:30s")?;
    let part = |p: &str| parse_duration(p).map_err(|e| format!("`{p}`: {e}"));
    Ok((part(at)?, part(down)?))
}

pub(crate) fn run(args: CampaignArgs) -> anyhow::Result<ExitCode> {
    // Checked here, not by clap: clap counts NATPUNCH_CAMPAIGN_POSTGRES=false as --postgres
    // given (clap-rs/clap#5591).
    anyhow::ensure!(
        !(args.postgres && args.database_url.is_some()),
        "--postgres starts its own database: it cannot be used with --database-url (or \
         NATPUNCH_DATABASE_URL)"
    );
    let exe = std::env::current_exe().context("finding the natpunch binary")?;
    let work_dir = match &args.work_dir {
        Some(d) => d.clone(),
        None => {
            let secs = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            PathBuf::from(format!("natpunch-campaign-{secs}"))
        }
    };
    let work_dir = std::path::absolute(&work_dir).unwrap_or(work_dir);
    let mut config = CampaignConfig::new(exe, work_dir.clone(), crate::stop_flag());
    if !args.presets.is_empty() {
        config.presets.clone_from(&args.presets);
    }
    config.hosts_per_client = args.hosts_per_client.max(1);
    config.port_mapped_client = !args.no_port_mapped_client;
    config.rtt_ms = args.rtt_ms;
    config.database_url.clone_from(&args.database_url);
    // Lives until the campaign is summed up.
    let _postgres = if args.postgres {
        let pg = api::postgres::TempPostgres::start().map_err(anyhow::Error::msg)?;
        let url = pg.new_database().map_err(anyhow::Error::msg)?;
        config.database_url = Some(pg.socket_url(&url));
        Some(pg)
    } else {
        None
    };
    config.punches = args.punches;
    config.server_outage = args.server_outage;
    config.duration = match (args.duration, args.punches) {
        (Some(d), _) => Some(d),
        (None, Some(_)) => None,
        (None, None) => config.duration,
    };
    eprintln!(
        "lab campaign: {} presets, {} hosts per client, {}; files in {}",
        config.presets.len(),
        config.hosts_per_client,
        match (config.punches, config.duration) {
            (Some(n), _) => format!("{n} punches"),
            (None, Some(d)) => format!("{:.0} s", d.as_secs_f64()),
            (None, None) => "until stopped".into(),
        },
        work_dir.display()
    );
    let tty = std::io::stderr().is_terminal();
    let mut last_line = std::time::Instant::now();
    let mut progress = |p: Progress| match p {
        Progress::Step(s) => {
            if tty {
                eprint!("\r\x1b[K");
            }
            eprintln!("lab campaign: {s}");
        }
        Progress::Punches {
            done,
            total,
            elapsed,
        } => {
            let bar = |f: f64| {
                let n = (f.clamp(0.0, 1.0) * 30.0) as usize;
                format!("[{}{}]", "#".repeat(n), ".".repeat(30 - n))
            };
            let line = match (total, config.duration) {
                (Some(t), _) => format!(
                    "{} {done}/{t} punches, {:.0} s",
                    bar(done as f64 / t.max(1) as f64),
                    elapsed.as_secs_f64()
                ),
                (None, Some(d)) => format!(
                    "{} {done} punches, {:.0}/{:.0} s",
                    bar(elapsed.as_secs_f64() / d.as_secs_f64()),
                    elapsed.as_secs_f64(),
                    d.as_secs_f64()
                ),
                (None, None) => format!("{done} punches, {:.0} s", elapsed.as_secs_f64()),
            };
            if tty {
                eprint!("\r\x1b[K{line}");
                let _ = std::io::stderr().flush();
            } else if last_line.elapsed() >= Duration::from_secs(10) {
                last_line = std::time::Instant::now();
                eprintln!("lab campaign: {line}");
            }
        }
    };
    let report = campaign::run(&config, &mut progress)?;
    if tty {
        eprintln!();
    }
    if let Some(path) = &args.report {
        let command: Vec<String> = std::env::args().collect();
        std::fs::write(
            path,
            labrun::html::campaign_page(&report, &command.join(" ")),
        )
        .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("lab campaign: report in {}", path.display());
    }
    if args.json.json {
        println!("{}", serde_json::to_string_pretty(&report.to_json())?);
    } else {
        print!("{report}");
    }
    Ok(if report.stored == report.punches {
        ExitCode::SUCCESS
    } else {
        eprintln!(
            "lab campaign: {} punches made but {} in the database",
            report.punches, report.stored
        );
        ExitCode::FAILURE
    })
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
