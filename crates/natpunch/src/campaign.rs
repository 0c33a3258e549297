//! `natpunch lab campaign`: the measurement system end to end in the lab, summed up from its
//! database, with an HTML report.

use std::io::{IsTerminal as _, Write as _};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use labrun::campaign::{self, CampaignConfig, Progress};

use cli::campaign::CampaignArgs;

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
