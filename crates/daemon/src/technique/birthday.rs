//! Birthday probing and port prediction for the daemon's UDP punch: the easy side's probes from
//! the daemon's shared UDP port, and the hard side's sockets, around the sans-IO half in
//! [`p2p::birthday`] (the arithmetic, the prober, the datagrams, the hard side's sockets),
//! which natpunch's libp2p engine shares for its QUIC punch.

use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use p2p::birthday::{Datagram, HardEnd, Kind, open_hard};
pub use p2p::birthday::{
    EasyProber, HEADROOM, PORTS, Plan, Prediction, Probe, Probing, Settings, TARGET, choose,
    probes_needed, success_probability,
};

use super::{Punched, TechniqueError};

/// What an easy side's attempt did.
#[derive(Debug)]
pub struct Probed {
    /// The socket, connected to the hard side's port that answered.
    pub punched: Punched<std::net::UdpSocket>,
    /// Probes sent.
    pub probes: usize,
    /// The port that answered was in the predicted window.
    pub predicted: bool,
}

/// The easy side: probes ports of `hard` from `local` (shared with SO_REUSEPORT; its NAT maps it
/// endpoint-independently, so the hard side knows where to send), the predicted window first if
/// there is one, then random ports, as `probing` says, until one is answered or `deadline`.
///
/// # Errors
///
/// [`TechniqueError::Timeout`] (with the probes sent) when nothing answered; the socket's.
pub async fn easy_side(
    local: SocketAddr,
    hard: IpAddr,
    token: [u8; 16],
    probing: Probing,
    deadline: tokio::time::Instant,
) -> Result<Probed, TechniqueError> {
    let socket = tokio::net::UdpSocket::from_std(
        natcheck::reflector::shared(local.port(), socket2::Type::DGRAM, socket2::Protocol::UDP)?
            .into(),
    )?;
    let mut prober = EasyProber::new(
        Instant::now(),
        hard,
        token,
        probing.budget,
        probing.rate,
        rand::random(),
    );
    if let Some(prediction) = probing.prediction {
        prober = prober.predicted(prediction);
    }
    let mut buf = [0u8; 64];
    let mut last = None;
    loop {
        while let Some(p) = prober.poll_probe(Instant::now()) {
            if let Err(e) = socket.send_to(&p.datagram.encode(), p.to).await {
                last = Some(format!("sending to {}: {e}", p.to));
            }
        }
        if let Some(remote) = prober.outcome() {
            // The easy side picks the pair: several of the hard side's sockets may have heard
            // a probe (a predicted window reaches many at once), and the first datagram here
            // may be a socket's own, let in by a probe that reached its NAT before it had sent.
            // An ack, which only this end's choice sends, tells that socket it won (twice,
            // against a loss).
            let won = Datagram {
                kind: Kind::Ack,
                token,
                seq: u32::try_from(prober.sent()).unwrap_or(u32::MAX),
            }
            .encode();
            for _ in 0..2 {
                socket.send_to(&won, remote).await?;
            }
            socket.connect(remote).await?;
            let socket = socket.into_std()?;
            socket.set_nonblocking(false)?;
            return Ok(Probed {
                punched: Punched {
                    socket,
                    remote,
                    rtt: None,
                },
                probes: prober.sent(),
                predicted: prober.hit_predicted(),
            });
        }
        let now = tokio::time::Instant::now();
        if now >= deadline {
            return Err(TechniqueError::Timeout {
                tried: prober.sent(),
                last,
            });
        }
        // Past the budget, wait for late answers until the deadline.
        let wake = prober.poll_timeout().map_or(deadline, |t| {
            tokio::time::Instant::from_std(t).min(deadline)
        });
        tokio::select! {
            received = socket.recv_from(&mut buf) => {
                if let Ok((n, from)) = received {
                    prober.handle_input(from, buf.get(..n).unwrap_or_default());
                }
            }
            () = tokio::time::sleep_until(wake) => {}
        }
    }
}

/// What a hard side's attempt did.
#[derive(Debug)]
pub struct Opened {
    /// The socket, connected to the easy side's address that probed it.
    pub punched: Punched<std::net::UdpSocket>,
    /// Sockets opened.
    pub sockets: usize,
    /// The easy side's count of probes when it picked this socket.
    pub probe: u32,
}

/// The hard side: [`open_hard`]'s sockets towards `easy`, answering probes with acks; the one
/// the easy side acknowledges (its pick of the answers) is the punched socket, connected to the
/// easy side.
///
/// # Errors
///
/// [`TechniqueError::Timeout`] when no probe came by `deadline`; binding the sockets.
pub async fn hard_side(
    sockets: usize,
    easy: SocketAddr,
    token: [u8; 16],
    deadline: tokio::time::Instant,
) -> Result<Opened, TechniqueError> {
    let sockets = sockets.max(1);
    match open_hard(sockets, easy, token, deadline, HardEnd::Ack).await? {
        Some(won) => {
            won.socket.connect(won.from).await?;
            let socket = won.socket.into_std()?;
            socket.set_nonblocking(false)?;
            Ok(Opened {
                punched: Punched {
                    socket,
                    remote: won.from,
                    rtt: None,
                },
                sockets,
                probe: won.seq,
            })
        }
        None => Err(TechniqueError::Timeout {
            tried: sockets,
            last: Some(format!(
                "no probe from {} reached any of {sockets} sockets",
                easy.ip()
            )),
        }),
    }
}
