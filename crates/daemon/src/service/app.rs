//! One application's connection to the API socket: its requests, each in a task of its own, and
//! the events they send back, written in order (an `ok` with its descriptor).

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd as _, OwnedFd};
use std::sync::Arc;

use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinSet};

use super::session::Target;
use super::{Counted, Ctx, Listener, MAX_LISTENERS, MAX_REQUESTS, PendingOffer, session};
use crate::api::{self, ErrorCode, Event, LineReader, Op, Reply, Request};
use crate::signal;

/// An event for the application, with the descriptor its `ok` hands over.
pub(super) struct Outgoing {
    pub(super) reply: Reply,
    pub(super) fd: Option<OwnedFd>,
}

impl Outgoing {
    pub(super) fn event(id: &str, event: Event) -> Self {
        Self {
            reply: Reply {
                id: id.to_owned(),
                event,
            },
            fd: None,
        }
    }

    pub(super) fn error(id: &str, code: ErrorCode, message: impl Into<String>) -> Self {
        Self::event(
            id,
            Event::Error {
                code,
                message: message.into(),
            },
        )
    }
}

/// Serves application `app` on `conn` until it closes; its requests end with it.
pub(super) async fn serve(ctx: Arc<Ctx>, app: u64, conn: UnixStream) {
    let (tx, mut rx) = mpsc::channel::<Outgoing>(64);
    let mut reader = LineReader::default();
    let mut tasks: JoinSet<()> = JoinSet::new();
    let mut running: HashMap<String, AbortHandle> = HashMap::new();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        tokio::select! {
            readable = conn.readable() => {
                if readable.is_err() {
                    break;
                }
                match conn.try_read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        let mut answers = Vec::new();
                        for line in reader.push(buf.get(..n).unwrap_or_default()) {
                            let answer = match line {
                                api::Line::Text(text) => match api::parse_request(&text) {
                                    Ok(request) => {
                                        start(&ctx, app, request, &tx, &mut tasks, &mut running)
                                            .map(|o| o.reply)
                                    }
                                    Err(rejected) => Some(rejected.reply()),
                                },
                                api::Line::TooLong => api::rejection(&line).map(|r| r.reply()),
                            };
                            answers.extend(answer);
                        }
                        let mut failed = false;
                        for reply in answers {
                            if write(&conn, Outgoing { reply, fd: None }).await.is_err() {
                                failed = true;
                                break;
                            }
                        }
                        if failed {
                            break;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(_) => break,
                }
            }
            Some(out) = rx.recv() => {
                if write(&conn, out).await.is_err() {
                    break;
                }
            }
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {
                running.retain(|_, h| !h.is_finished());
            }
        }
    }
    tasks.abort_all();
    if let Ok(mut offers) = ctx.offers.lock() {
        offers.retain(|_, o| o.app != app);
    }
    if let Ok(mut listeners) = ctx.listeners.lock() {
        for list in listeners.values_mut() {
            list.retain(|l| l.app != app);
        }
        listeners.retain(|_, l| !l.is_empty());
    }
}

async fn write(conn: &UnixStream, out: Outgoing) -> io::Result<()> {
    let line = out.reply.to_line();
    match out.fd {
        Some(fd) => crate::fdpass::write_with_fd(conn, &line, fd.as_fd()).await,
        None => {
            let mut rest: &[u8] = &line;
            while !rest.is_empty() {
                conn.writable().await?;
                match conn.try_write(rest) {
                    Ok(n) => rest = rest.get(n..).unwrap_or_default(),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(())
        }
    }
}

/// Starts `request`; what to answer at once, if anything.
fn start(
    ctx: &Arc<Ctx>,
    app: u64,
    request: Request,
    tx: &mpsc::Sender<Outgoing>,
    tasks: &mut JoinSet<()>,
    running: &mut HashMap<String, AbortHandle>,
) -> Option<Outgoing> {
    let id = request.id;
    running.retain(|_, h| !h.is_finished());
    match request.op {
        Op::Status => Some(Outgoing::event(&id, status(ctx))),
        Op::Cancel { target } => match running.remove(&target) {
            Some(handle) => {
                handle.abort();
                if let Ok(mut listeners) = ctx.listeners.lock() {
                    for list in listeners.values_mut() {
                        list.retain(|l| !(l.app == app && l.id == target));
                    }
                }
                if let Ok(mut offers) = ctx.offers.lock() {
                    offers.retain(|_, o| !(o.app == app && o.id == target));
                }
                Some(Outgoing::error(
                    &target,
                    ErrorCode::Cancelled,
                    "cancelled by the application",
                ))
            }
            None => Some(Outgoing::error(
                &id,
                ErrorCode::BadRequest,
                format!("no request `{target}` is running on this connection"),
            )),
        },
        _ if running.contains_key(&id) => Some(Outgoing::error(
            &id,
            ErrorCode::BadRequest,
            format!("a request with id `{id}` is still running on this connection"),
        )),
        _ if running.len() >= MAX_REQUESTS => Some(Outgoing::error(
            &id,
            ErrorCode::BadRequest,
            format!("at most {MAX_REQUESTS} requests may run at once on one connection"),
        )),
        Op::Listen { service, proto } => {
            let Ok(mut listeners) = ctx.listeners.lock() else {
                return Some(Outgoing::error(
                    &id,
                    ErrorCode::Internal,
                    "the listener table failed",
                ));
            };
            if listeners.values().map(Vec::len).sum::<usize>() >= MAX_LISTENERS {
                return Some(Outgoing::error(
                    &id,
                    ErrorCode::BadRequest,
                    format!("this daemon holds at most {MAX_LISTENERS} listeners"),
                ));
            }
            listeners.entry(service).or_default().push(Listener {
                app,
                id: id.clone(),
                proto,
                out: tx.clone(),
            });
            // The listener lives as long as this placeholder task (cancel aborts it).
            let handle = tasks.spawn(std::future::pending());
            running.insert(id, handle);
            None
        }
        Op::Connect {
            peer,
            proto,
            service,
        } => {
            let target = Target {
                peer,
                proto,
                service,
                token: None,
                via: Vec::new(),
            };
            running.insert(id.clone(), connect(ctx, id, target, tx, tasks));
            None
        }
        Op::Initiate { proto } => {
            let state = ctx.state();
            if state.reservations.is_empty() {
                return Some(Outgoing::error(
                    &id,
                    ErrorCode::NoRelay,
                    "this daemon holds no relay reservation yet, so the other end could not \
                     reach it (see its log, or `status`)",
                ));
            }
            let Ok(mut offers) = ctx.offers.lock() else {
                return Some(Outgoing::error(
                    &id,
                    ErrorCode::Internal,
                    "the offer table failed",
                ));
            };
            offers.retain(|_, o| !o.out.is_closed());
            if offers.len() >= MAX_LISTENERS {
                return Some(Outgoing::error(
                    &id,
                    ErrorCode::BadRequest,
                    format!("this daemon holds at most {MAX_LISTENERS} open offers"),
                ));
            }
            let token: [u8; 16] = rand::random();
            let mut relayed: Vec<String> = state
                .reservations
                .values()
                .map(ToString::to_string)
                .collect();
            relayed.sort();
            relayed.truncate(signal::MAX_CANDIDATES);
            let offer = signal::Offer {
                v: 1,
                peer: ctx.peer_id.to_string(),
                relayed,
                proto,
                token: signal::token_hex(&token),
            };
            offers.insert(
                token,
                PendingOffer {
                    app,
                    id: id.clone(),
                    proto,
                    out: tx.clone(),
                },
            );
            // The request runs while its offer is open (cancel aborts it); the socket comes to
            // its id once the other end responded, and takes the offer.
            let watch = ctx.clone();
            let handle = tasks.spawn(async move {
                loop {
                    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                    if !watch.offers.lock().is_ok_and(|o| o.contains_key(&token)) {
                        return;
                    }
                }
            });
            running.insert(id.clone(), handle);
            Some(Outgoing::event(
                &id,
                Event::Offer {
                    offer: offer.to_text(),
                },
            ))
        }
        Op::Respond { offer } => match signal::Offer::parse(&offer) {
            Err(e) => Some(Outgoing::error(&id, ErrorCode::BadRequest, e.to_string())),
            Ok(offer) => {
                let target = Target {
                    peer: offer.peer,
                    proto: offer.proto,
                    service: signal::OFFER_SERVICE.to_owned(),
                    token: Some(offer.token),
                    via: offer.relayed,
                };
                running.insert(id.clone(), connect(ctx, id, target, tx, tasks));
                None
            }
        },
    }
}

/// Starts a connection to `target` for request `id`, in a task of its own.
fn connect(
    ctx: &Arc<Ctx>,
    id: String,
    target: Target,
    tx: &mpsc::Sender<Outgoing>,
    tasks: &mut JoinSet<()>,
) -> AbortHandle {
    let ctx = ctx.clone();
    let tx = tx.clone();
    tasks.spawn(async move {
        let Ok(permit) = ctx.sessions.clone().try_acquire_owned() else {
            let _ = tx
                .send(Outgoing::error(
                    &id,
                    ErrorCode::Internal,
                    "the daemon is making as many connections as it may; try again",
                ))
                .await;
            return;
        };
        let counted = Counted::new(&ctx.metrics.sessions);
        let out = session::initiate(ctx.clone(), &id, target, &tx).await;
        drop((counted, permit));
        let _ = tx.send(out).await;
    })
}

fn status(ctx: &Ctx) -> Event {
    let state = ctx.state();
    let mut reservations: Vec<String> = state
        .reservations
        .values()
        .map(ToString::to_string)
        .collect();
    reservations.sort();
    let state = ctx.state();
    let nat_source = Some(state.nat_source.to_string());
    let nat = state.nat;
    let nat = match (nat.mapping, nat.filtering) {
        (None, None) => None,
        (m, f) => Some(format!(
            "{}/{}",
            m.map_or("unknown".into(), |m| serde_json::to_value(m)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default()),
            f.map_or("unknown".into(), |f| serde_json::to_value(f)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default()),
        )),
    };
    Event::Status {
        peer: ctx.peer_id.to_string(),
        version: api::VERSION,
        reservations,
        nat,
        nat_source,
        mappings: state.mappings.clone(),
        techniques: ctx.techniques(),
    }
}
