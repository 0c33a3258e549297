//! `natpunch lab …`: wiring between the command line and the natlab library.

use std::process::{Command, ExitCode};

use anyhow::{Context as _, bail};
use natlab::lab::{self, LabSummary, Removal};
use natlab::{Lab, LabOptions, Preset, Topology, holder, selftest};

use cli::lab::{DownArgs, ExecArgs, LabCommand, ListArgs, SelftestArgs, UpArgs};

pub(crate) fn run(cmd: LabCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        LabCommand::Up(args) => up(args),
        LabCommand::Matrix(args) => crate::matrix::run(args),
        LabCommand::ConnectMatrix(args) => crate::matrix::connect(args),
        LabCommand::Campaign(args) => crate::campaign::run(args),
        LabCommand::Exec(args) => exec(args),
        LabCommand::Down(args) => down(args),
        LabCommand::List(args) => list(args),
        LabCommand::Selftest(args) => run_selftest(args),
        LabCommand::Sweep => {
            let removed = lab::sweep();
            println!(
                "removed {} stale item(s){}",
                removed.len(),
                fmt_list(&removed)
            );
            Ok(ExitCode::SUCCESS)
        }
        LabCommand::Reboot(args) => {
            let state = lab::load_state(&args.lab)?;
            let downtime = std::time::Duration::try_from_secs_f64(args.down_secs)
                .context("--down-secs must be a non-negative number of seconds")?;
            // A restarted miniupnpd outlives this process, as the lab does.
            drop(lab::reboot_router(&state.plan, &args.router, downtime)?);
            println!(
                "rebooted {} in lab {} ({} s dark)",
                args.router, args.lab, args.down_secs
            );
            Ok(ExitCode::SUCCESS)
        }
        LabCommand::Renumber(args) => {
            let mut state = lab::load_state(&args.lab)?;
            let old = state
                .plan
                .node(&args.router)
                .map(|n| n.addr())
                .with_context(|| format!("lab {} has no node {}", args.lab, args.router))?;
            let new = lab::renumber_router(&mut state, &args.router, args.ip)?;
            if args.json.json {
                let report = serde_json::json!({"router": args.router, "old": old, "new": new});
                println!("{report}");
            } else {
                println!("{}: external address {old} -> {new}", args.router);
            }
            Ok(ExitCode::SUCCESS)
        }
        LabCommand::Hold { name } => {
            holder::hold(&name)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn fmt_list(items: &[String]) -> String {
    if items.is_empty() {
        String::new()
    } else {
        format!(": {}", items.join(", "))
    }
}

fn up(args: UpArgs) -> anyhow::Result<ExitCode> {
    let text = std::fs::read_to_string(&args.file)
        .with_context(|| format!("cannot read topology file {}", args.file.display()))?;
    let topology = Topology::from_toml(&text).with_context(|| args.file.display().to_string())?;
    let name = match args.name {
        Some(n) => n,
        None => args
            .file
            .file_stem()
            .and_then(|s| s.to_str())
            .map(|s| s.to_lowercase().replace('_', "-"))
            .context("cannot derive a lab name from the file name: pass --name")?,
    };
    let options = LabOptions {
        name: Some(name.clone()),
        seed: args.seed,
        external_delay_lines: true,
    };
    let built = Lab::build(&topology, options)?;
    let needs_holder = built.plan().needs_holder();
    let plan = built.detach()?;
    if needs_holder && let Err(e) = start_holder(&plan.lab) {
        let _ = lab::down(&plan.lab);
        return Err(e.context("starting the delay lines"));
    }
    if args.json.json {
        println!("{}", serde_json::to_string_pretty(&plan)?);
    } else {
        print!("{plan}");
        println!(
            "\nrun a command in a node:  natpunch lab exec {} NODE -- COMMAND",
            plan.lab
        );
        println!("remove the lab:           natpunch lab down {}", plan.lab);
    }
    Ok(ExitCode::SUCCESS)
}

/// Starts `natpunch lab hold NAME` detached from this process and waits until it is ready.
fn start_holder(name: &str) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("locating the natpunch executable")?;
    let mut command = Command::new(exe);
    command.args(["lab", "hold", name]);
    Ok(holder::start(command)?)
}

fn exec(args: ExecArgs) -> anyhow::Result<ExitCode> {
    let state = lab::load_state(&args.lab)?;
    let node = state.plan.node(&args.node).with_context(|| {
        let known: Vec<&str> = state.plan.nodes.iter().map(|n| n.name.as_str()).collect();
        format!(
            "lab `{}` has no node `{}` (nodes: {})",
            args.lab,
            args.node,
            known.join(", ")
        )
    })?;
    let status = Command::new("ip")
        .args(["netns", "exec", &node.netns])
        .args(&args.command)
        .status()
        .context("running ip netns exec")?;
    Ok(match status.code() {
        Some(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        None => ExitCode::FAILURE,
    })
}

fn down(args: DownArgs) -> anyhow::Result<ExitCode> {
    // Checked here, not by clap: clap counts NATPUNCH_LAB_ALL=false as --all given
    // (clap-rs/clap#5591), which would turn `lab down` without a name into removing every lab.
    match (&args.lab, args.all) {
        (None, false) => bail!("name the lab to remove, or give --all"),
        (Some(_), true) => bail!("give a lab name or --all, not both"),
        _ => {}
    }
    let Some(name) = args.lab else {
        let mut removed = 0;
        let swept = lab::down_all(&mut |r| match r {
            Removal::Kept { lab, owner } => {
                println!("kept lab {lab}: owned by running process {owner}");
            }
            Removal::Removed(lab) => {
                println!("removed lab {lab}");
                removed += 1;
            }
        })?;
        if !swept.is_empty() {
            println!("removed stale {}", swept.join(", "));
        }
        if removed == 0 && swept.is_empty() {
            println!("no labs to remove");
        }
        return Ok(ExitCode::SUCCESS);
    };
    lab::down(&name)?;
    println!("removed lab {name}");
    Ok(ExitCode::SUCCESS)
}

fn list(args: ListArgs) -> anyhow::Result<ExitCode> {
    let labs: Vec<LabSummary> = lab::list().iter().map(LabSummary::from).collect();
    if args.json.json {
        println!("{}", serde_json::to_string_pretty(&labs)?);
        return Ok(ExitCode::SUCCESS);
    }
    if labs.is_empty() {
        println!("no labs");
        return Ok(ExitCode::SUCCESS);
    }
    println!("{:<24} {:>5}  {:<18} NODES", "LAB", "NODES", "KIND");
    for s in &labs {
        println!(
            "{:<24} {:>5}  {:<18} {}",
            s.name,
            s.nodes.len(),
            s.kind(),
            s.nodes.join(" ")
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn run_selftest(args: SelftestArgs) -> anyhow::Result<ExitCode> {
    let presets = if args.presets.is_empty() {
        Preset::ALL.to_vec()
    } else {
        args.presets
    };
    let progress = |msg: &str| eprintln!("selftest: {msg}");
    let options = selftest::SelftestOptions {
        max_sessions: args.max_sessions,
        session_overflow: args.session_overflow,
    };
    let report = selftest::run_with(&presets, &options, &progress)?;
    if args.json.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{report}");
    }
    Ok(if report.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
