//! `natpunch connect` and `natpunch accept`: natpunch-client's [`Client`] and bridges wired to
//! the terminal. Progress and results go to stderr (text, or JSON lines with `--json`), so that
//! stdout carries only the connection's bytes.

use std::io::{self, Write as _};
use std::os::fd::AsFd as _;
use std::process::{ExitCode, ExitStatus};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use cli::connect::{AcceptArgs, ConnectArgs, ConnectOutput};
use natpunch_client::{Client, ClientError, Connection, Progress, Socket, bridge};
use serde_json::json;

/// `natpunch connect`.
pub(crate) fn connect(args: ConnectArgs) -> anyhow::Result<ExitCode> {
    let report = Report::new("connect", args.json.json);
    report.outcome(run_connect(&args, &report))
}

fn run_connect(args: &ConnectArgs, report: &Report) -> anyhow::Result<ExitCode> {
    let output = args.output().map_err(anyhow::Error::msg)?;
    if output == ConnectOutput::Fdpass {
        // Before the daemon is asked: a connection that cannot be handed over is wasted.
        bridge::check_passable(io::stdout().as_fd(), "standard output").context("--fdpass")?;
    }
    let mut client = Client::connect(args.endpoint.socket_path())?;
    let started = Instant::now();
    let conn = client.connect_peer(
        &args.peer.to_string(),
        args.endpoint.proto(),
        &args.endpoint.service,
        |p| report.progress(p),
    )?;
    report.connected(&conn, Some(started.elapsed()));
    match output {
        ConnectOutput::Stdio => {
            copy_stdio(conn.socket)?;
            Ok(ExitCode::SUCCESS)
        }
        ConnectOutput::Exec(command) => {
            let status = bridge::exec(&command, conn.socket)?
                .wait()
                .with_context(|| format!("waiting for `{command}`"))?;
            Ok(exit_code(status))
        }
        ConnectOutput::Fdpass => {
            bridge::pass(io::stdout().as_fd(), "standard output", conn.socket)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `natpunch accept`.
pub(crate) fn accept(args: AcceptArgs) -> anyhow::Result<ExitCode> {
    let report = Report::new("accept", args.json.json);
    report.outcome(run_accept(&args, &report))
}

fn run_accept(args: &AcceptArgs, report: &Report) -> anyhow::Result<ExitCode> {
    let client = Client::connect(args.endpoint.socket_path())?;
    let proto = args.endpoint.proto();
    let mut listener = client.listen(&args.endpoint.service, proto)?;
    report.listening(&args.endpoint.service, proto);
    loop {
        let conn = match listener.accept() {
            Ok(conn) => conn,
            // One connection the daemon handed over badly: the others may come right.
            Err(
                e @ (ClientError::MissingFd { .. }
                | ClientError::WrongSocket { .. }
                | ClientError::Unexpected { .. }),
            ) if args.exec.is_some() && !args.once => {
                report.warn(&e);
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        report.connected(&conn, None);
        let Some(command) = &args.exec else {
            copy_stdio(conn.socket)?;
            return Ok(ExitCode::SUCCESS);
        };
        let mut child = bridge::exec(command, conn.socket)?;
        if args.once {
            let status = child
                .wait()
                .with_context(|| format!("waiting for `{command}`"))?;
            return Ok(exit_code(status));
        }
        // Reaped when it ends; the next connection does not wait for it.
        std::thread::spawn(move || child.wait());
    }
}

fn copy_stdio(socket: Socket) -> Result<(), bridge::BridgeError> {
    match socket {
        Socket::Tcp(stream) => bridge::copy_stream(io::stdin(), &mut io::stdout(), stream),
        Socket::Udp(socket) => bridge::copy_datagrams(io::stdin(), &mut io::stdout(), socket),
    }
}

/// A command's status as natpunch's: its code, or 128 + the signal that ended it, as shells do.
fn exit_code(status: ExitStatus) -> ExitCode {
    use std::os::unix::process::ExitStatusExt as _;
    let code = status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1);
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

/// The lines on stderr: `connect: …` for people, or one JSON object per line.
struct Report {
    verb: &'static str,
    json: bool,
}

impl Report {
    fn new(verb: &'static str, json: bool) -> Self {
        Self { verb, json }
    }

    fn line(&self, text: impl std::fmt::Display) {
        // Nothing to do when stderr is gone: the connection's bytes are what matters.
        let _ = writeln!(io::stderr(), "{text}");
    }

    fn progress(&self, p: &Progress) {
        if self.json {
            self.line(json!({
                "event": "progress",
                "technique": p.technique,
                "step": p.step,
                "detail": p.detail,
            }));
        } else {
            self.line(format_args!("{}: {p}", self.verb));
        }
    }

    fn listening(&self, service: &str, proto: natpunch_client::Proto) {
        if self.json {
            self.line(json!({"event": "listening", "service": service, "proto": proto}));
        } else {
            self.line(format_args!(
                "{}: waiting for {proto} connections to service `{service}`",
                self.verb
            ));
        }
    }

    /// A connection is there; `took` is how long connecting took, for `connect`.
    fn connected(&self, conn: &Connection, took: Option<Duration>) {
        let ms = took.map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX));
        if self.json {
            let mut v = json!({
                "event": "connected",
                "technique": conn.technique,
                "direct": conn.direct,
                "remote": conn.remote,
                "rtt_ms": conn.rtt_ms,
            });
            if let (Some(ms), Some(fields)) = (ms, v.as_object_mut()) {
                fields.insert("elapsed_ms".into(), ms.into());
            }
            self.line(v);
        } else if let Some(ms) = ms {
            self.line(format_args!(
                "{}: connected {} in {ms} ms",
                self.verb,
                conn.describe("to")
            ));
        } else {
            self.line(format_args!(
                "{}: connection {}",
                self.verb,
                conn.describe("from")
            ));
        }
    }

    fn warn(&self, e: &ClientError) {
        if self.json {
            self.line(json!({"event": "warning", "message": e.to_string()}));
        } else {
            self.line(format_args!("{}: {e}", self.verb));
        }
    }

    /// With `--json`, an error is a JSON line and exit status 1; without, main prints it.
    fn outcome(&self, result: anyhow::Result<ExitCode>) -> anyhow::Result<ExitCode> {
        match result {
            Err(e) if self.json => {
                let mut v = json!({"event": "error", "message": format!("{e:#}")});
                let code = e.downcast_ref::<ClientError>().and_then(ClientError::code);
                if let (Some(code), Some(fields)) = (code, v.as_object_mut()) {
                    fields.insert("code".into(), code.into());
                }
                self.line(v);
                Ok(ExitCode::FAILURE)
            }
            other => other,
        }
    }
}
