//! `natpunch map …`: port mappings on the local router over PCP, NAT-PMP or UPnP IGD. The
//! record of this host's mappings and the renew policy live in `portmap`.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use portmap::client::{self, Gateway, MapRequest, Mapped};
use portmap::hold::{HoldConfig, Holder, Update};
use portmap::keeper::Want;
use portmap::record::{self, Record};
use portmap::upnp::Igd;

use cli::map::{AddArgs, Common, DeleteArgs, KeepArgs, MapCommand};

pub(crate) fn run(cmd: MapCommand) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        match cmd {
            MapCommand::Probe(a) => probe(a.common).await,
            MapCommand::List(a) => list(a.common).await,
            MapCommand::Add(a) => add(a).await,
            MapCommand::Delete(a) => delete(a).await,
            MapCommand::Keep(a) => keep(a).await,
        }
    })
}

/// What the shared `map` flags open: the router, its wait, this host's record.
trait Router {
    fn gateway(&self) -> anyhow::Result<Gateway>;

    fn wait(&self) -> Duration;

    fn record(&self) -> anyhow::Result<Record>;

    /// The router, how long to wait for it, and this host's record of its mappings.
    fn open(&self) -> anyhow::Result<(Gateway, Duration, Record)>;
}

impl Router for Common {
    fn gateway(&self) -> anyhow::Result<Gateway> {
        Gateway::find(self.gateway).context("finding the router")
    }

    fn wait(&self) -> Duration {
        Duration::from_millis(self.wait_ms.max(1))
    }

    fn record(&self) -> anyhow::Result<Record> {
        let path = match &self.state {
            Some(p) => p.clone(),
            None => crate::state_dir()?.join("mappings.json"),
        };
        Ok(Record::load(path)?)
    }

    fn open(&self) -> anyhow::Result<(Gateway, Duration, Record)> {
        Ok((self.gateway()?, self.wait(), self.record()?))
    }
}

async fn probe(common: Common) -> anyhow::Result<ExitCode> {
    let gw = common.gateway()?;
    eprintln!(
        "map probe: asking {} (from {}) over PCP, NAT-PMP and UPnP",
        gw.addr, gw.local
    );
    let report = client::probe(gw, common.wait()).await;
    if common.json.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{report}");
    }
    Ok(if report.methods().is_empty() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

async fn list(common: Common) -> anyhow::Result<ExitCode> {
    let gw = common.gateway()?;
    let record = common.record()?;
    let ours: Vec<&Mapped> = record.on(gw).collect();
    let upnp = match Igd::discover(gw.local, common.wait()).await {
        Ok(igd) => Some(
            igd.list()
                .await
                .context("reading the router's UPnP table")?,
        ),
        Err(_) => None,
    };
    if common.json.json {
        let report = serde_json::json!({"gateway": gw, "recorded": ours, "upnp": upnp});
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "mappings this host made on {} ({}):",
        gw.addr,
        record.path().display()
    );
    if ours.is_empty() {
        println!("  none");
    }
    for m in &ours {
        println!("  {m}");
    }
    match upnp {
        Some(entries) => {
            println!("the router's UPnP table:");
            if entries.is_empty() {
                println!("  empty");
            }
            for e in entries {
                println!("  {e}");
            }
        }
        None => println!("the router answers no UPnP search"),
    }
    Ok(ExitCode::SUCCESS)
}

async fn add(args: AddArgs) -> anyhow::Result<ExitCode> {
    let common = &args.common;
    let (gw, wait, mut record) = common.open()?;
    let say = |m: &str| eprintln!("map add: {m}");
    let methods = record::methods(args.lease.via.only(), gw, wait, &say).await?;
    let request = MapRequest {
        protocol: args.proto.into(),
        internal_port: args.internal_port,
        external_port: args.external_port,
        lifetime_secs: args.lease.lifetime,
    };
    let m = record.add(gw, &methods, request, wait).await?;
    if common.json.json {
        println!("{}", serde_json::to_string_pretty(&m)?);
    } else {
        println!("mapped {m}");
    }
    Ok(ExitCode::SUCCESS)
}

async fn keep(args: KeepArgs) -> anyhow::Result<ExitCode> {
    let common = &args.common;
    let (gw, wait, mut record) = common.open()?;
    let say = |m: &str| eprintln!("map keep: {m}");
    let method = record::methods(args.lease.via.only(), gw, wait, &say).await?[0];
    let wants: Vec<Want> = args
        .ports
        .iter()
        .map(|s| Want {
            protocol: s.proto.unwrap_or(args.proto).into(),
            internal_port: s.internal,
            external_port: s.external,
            lifetime: Duration::from_secs(u64::from(args.lease.lifetime)),
        })
        .collect();
    let prior: Vec<Option<Mapped>> = wants
        .iter()
        .map(|w| record.find(gw, w.protocol, w.internal_port).cloned())
        .collect();
    let config = HoldConfig {
        method,
        wait,
        check_interval: Duration::from_secs(args.check_secs),
    };
    let mut holder = Holder::new(gw, config, wants, &prior)?;
    eprintln!(
        "map keep: holding {} mapping(s) on {} via {method}, checking every {} s; Ctrl-C \
         deletes them",
        args.ports.len(),
        gw.addr,
        args.check_secs
    );
    let start = std::time::Instant::now();
    let json = common.json.json;
    let mut report = |u: Update| {
        let elapsed = start.elapsed().as_secs_f64();
        if json {
            let mut value = serde_json::to_value(&u).unwrap_or_default();
            if let Some(obj) = value.as_object_mut() {
                obj.insert("elapsed_secs".into(), serde_json::json!(elapsed));
            }
            println!("{value}");
        } else {
            println!("[{elapsed:8.1} s] {u}");
        }
        if let Err(e) = record.apply(&u) {
            eprintln!("map keep: {:#}", anyhow::Error::from(e));
        }
    };
    let stop = crate::stop_signal();
    for p in holder.problems() {
        eprintln!("map keep: {p}");
    }
    holder.run(stop, &mut report).await;
    eprintln!("map keep: stopping; deleting the mappings");
    holder.release(&mut report).await;
    Ok(ExitCode::SUCCESS)
}

async fn delete(args: DeleteArgs) -> anyhow::Result<ExitCode> {
    let common = &args.common;
    let (gw, wait, mut record) = common.open()?;
    let m = record
        .delete(gw, args.proto.into(), args.port, wait)
        .await?;
    if common.json.json {
        println!("{}", serde_json::json!({"deleted": m}));
    } else {
        println!("deleted {m}");
    }
    Ok(ExitCode::SUCCESS)
}
