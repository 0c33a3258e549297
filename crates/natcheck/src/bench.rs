//! Binding throughput of a STUN server under closed-loop load: `clients` sockets, each with one
//! request in flight, for a fixed time. Used by `natpunch bench stun` to compare servers in
//! one run.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::net::UdpSocket;
use tokio::task::JoinSet;
use tokio::time::timeout;

/// What one load run measured.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Load {
    /// Requests sent.
    pub sent: u64,
    /// Answers received.
    pub answered: u64,
    /// Answered requests per second.
    pub per_sec: f64,
    /// Median round trip, in microseconds.
    pub p50_us: u64,
    /// 99th percentile round trip, in microseconds.
    pub p99_us: u64,
}

/// How long a client waits for an answer before it sends the next request.
const LOST_AFTER: Duration = Duration::from_millis(200);

/// Loads `server` with `clients` closed-loop clients for `duration`.
pub async fn binding_load(
    server: SocketAddr,
    clients: usize,
    duration: Duration,
) -> std::io::Result<Load> {
    let deadline = Instant::now() + duration;
    let mut tasks = JoinSet::new();
    for c in 0..clients.max(1) {
        let sock = UdpSocket::bind("127.0.0.1:0").await?;
        tasks.spawn(async move {
            let mut buf = [0u8; 1500];
            let mut rtts = Vec::new();
            let mut sent = 0u64;
            let mut n = 0u64;
            while Instant::now() < deadline {
                n += 1;
                let mut id = [0u8; 12];
                id[..8].copy_from_slice(&n.to_be_bytes());
                id[8..].copy_from_slice(&(c as u32).to_be_bytes());
                let request = stun::binding_request(id, None, None);
                let start = Instant::now();
                if sock.send_to(&request, server).await.is_err() {
                    break;
                }
                sent += 1;
                while let Ok(Ok((len, _))) = timeout(LOST_AFTER, sock.recv_from(&mut buf)).await {
                    if stun::parse_binding_response(&buf[..len])
                        .is_ok_and(|r| r.transaction_id == id)
                    {
                        rtts.push(start.elapsed());
                        break;
                    }
                }
            }
            (sent, rtts)
        });
    }
    let started = Instant::now();
    let mut sent = 0;
    let mut rtts = Vec::new();
    while let Some(Ok((s, r))) = tasks.join_next().await {
        sent += s;
        rtts.extend(r);
    }
    let elapsed = started.elapsed().max(duration).as_secs_f64();
    rtts.sort();
    let pct = |p: f64| {
        rtts.get(((rtts.len() as f64 - 1.0) * p).round() as usize)
            .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
    };
    Ok(Load {
        sent,
        answered: rtts.len() as u64,
        per_sec: rtts.len() as f64 / elapsed,
        p50_us: pct(0.5),
        p99_us: pct(0.99),
    })
}
