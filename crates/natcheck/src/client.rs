//! `nat check`: RFC 5780 discovery against one server with two addresses.
//!
//! The tests, in order: mapping (RFC 5780 §4.3, one socket to three server addresses), filtering
//! (§4.4, a fresh socket asking for answers from changed addresses), port allocation (fresh
//! sockets, local against mapped port), hairpinning (a Binding request sent to one's own mapped
//! address), and with `lifetime` the UDP mapping lifetime (§4.6: many mappings made at once,
//! each probed once after a growing idle time through RESPONSE-PORT). Classification is the
//! `stun::classify` functions; anything a lost test leaves open is reported as unknown.

use std::collections::BTreeSet;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use behaviour::{Filtering, Mapping, PortAllocation};
use serde::Serialize;
use stun::BindingResponse;
use stun::classify::{self, Verdict};
use tokio::net::UdpSocket;
use tokio::time::{sleep_until, timeout_at};

/// How to run a check.
#[derive(Debug, Clone)]
pub struct CheckOptions {
    /// The server's primary address.
    pub server: SocketAddr,
    /// First retransmission timeout; doubled on each retry.
    pub rto: Duration,
    /// Sends per transaction before giving up.
    pub attempts: u32,
    /// Fresh sockets for the port-allocation test.
    pub port_samples: usize,
    /// Measure the mapping lifetime, up to this long (it takes about that long).
    pub lifetime: Option<Duration>,
    /// Stop after the mapping test (a few round trips): filtering, port allocation,
    /// hairpinning and lifetime are left unknown. For a peer that needs only its mapping class
    /// at start, where the filtering tests' unanswered probes would cost seconds.
    pub mapping_only: bool,
}

impl CheckOptions {
    /// Defaults for `server`: 200 ms first RTO, 3 sends (1.4 s until a test counts as
    /// unanswered), 5 port samples, no lifetime test.
    pub fn new(server: SocketAddr) -> Self {
        Self {
            server,
            rto: Duration::from_millis(200),
            attempts: 3,
            port_samples: 5,
            lifetime: None,
            mapping_only: false,
        }
    }
}

/// The UDP mapping lifetime, bracketed by probes.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Lifetime {
    /// Longest idle time after which a mapping still answered.
    pub alive_secs: Option<f64>,
    /// Shortest idle time after which a mapping was gone (`None`: none died within the limit).
    pub gone_secs: Option<f64>,
    /// The middle of the bracket, when both ends are known.
    pub estimate_secs: Option<f64>,
}

/// What `nat check` found. `None` means unknown.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NatReport {
    /// The server asked.
    pub server: SocketAddr,
    /// Whether the server supports RFC 5780 (sent OTHER-ADDRESS).
    pub rfc5780: bool,
    /// The local address used towards the server.
    pub local_address: Option<SocketAddr>,
    /// Every public IP address the server saw.
    pub public_addresses: Vec<IpAddr>,
    /// Whether a NAT translates this host's traffic.
    pub nat: Option<bool>,
    /// Mapping behaviour.
    pub mapping: Option<Mapping>,
    /// Filtering behaviour.
    pub filtering: Option<Filtering>,
    /// Port allocation.
    pub port_allocation: Option<PortAllocation>,
    /// Step between consecutive mappings, for sequential allocation.
    pub port_delta: Option<i32>,
    /// Whether one's own mapped address reaches back in (hairpinning).
    pub hairpin: Option<bool>,
    /// Mapping lifetime, with `--lifetime`.
    pub mapping_lifetime: Option<Lifetime>,
    /// The server answered STUN over TCP but not over UDP: this network blocks UDP.
    pub udp_blocked: bool,
    /// The one-word verdict.
    pub verdict: Verdict,
    /// The verdict for people.
    pub summary: &'static str,
}

impl NatReport {
    /// The report for a server that answers over TCP only: UDP does not get through, and
    /// nothing else can be measured.
    fn udp_blocked(server: SocketAddr) -> Self {
        let verdict = classify::verdict(false, None, None, None);
        Self {
            server,
            rfc5780: false,
            local_address: None,
            public_addresses: Vec::new(),
            nat: None,
            mapping: None,
            filtering: None,
            port_allocation: None,
            port_delta: None,
            hairpin: None,
            mapping_lifetime: None,
            udp_blocked: true,
            verdict,
            summary: verdict.sentence(),
        }
    }
}

/// The report for people: one `name  value` row per finding, unknowns said as such, the
/// verdict last.
impl std::fmt::Display for NatReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        fn or_unknown<T: ToString>(v: Option<T>) -> String {
            v.map_or_else(|| "unknown".to_owned(), |v| v.to_string())
        }
        fn yes_no(v: Option<bool>, yes: &str, no: &str) -> String {
            v.map_or("unknown".into(), |v| if v { yes.into() } else { no.into() })
        }
        let public: Vec<String> = self
            .public_addresses
            .iter()
            .map(ToString::to_string)
            .collect();
        let delta = self
            .port_delta
            .map(|d| format!(", delta {d:+}"))
            .unwrap_or_default();
        let mut rows = vec![
            (
                "server",
                format!(
                    "{} (RFC 5780: {})",
                    self.server,
                    if self.rfc5780 { "yes" } else { "no" }
                ),
            ),
            ("local address", or_unknown(self.local_address)),
            (
                "public address",
                if public.is_empty() {
                    "unknown".into()
                } else {
                    public.join(", ")
                },
            ),
            ("NAT", yes_no(self.nat, "present", "none")),
            (
                "mapping",
                self.mapping
                    .map_or("unknown".into(), |m| format!("{m} ({})", m.abbreviation())),
            ),
            (
                "filtering",
                self.filtering
                    .map_or("unknown".into(), |f| format!("{f} ({})", f.abbreviation())),
            ),
            (
                "port allocation",
                format!("{}{delta}", or_unknown(self.port_allocation)),
            ),
            ("hairpin", yes_no(self.hairpin, "yes", "no")),
        ];
        if let Some(l) = &self.mapping_lifetime {
            let text = match (l.alive_secs, l.gone_secs, l.estimate_secs) {
                (Some(a), Some(g), Some(e)) => {
                    format!("about {e:.0} s (alive after {a:.1} s, gone after {g:.1} s)")
                }
                (Some(a), None, _) => format!("longer than {a:.0} s"),
                (None, Some(g), _) => format!("shorter than {g:.0} s"),
                _ => "unknown".into(),
            };
            rows.push(("mapping lifetime", text));
        }
        if self.udp_blocked {
            rows.push((
                "UDP",
                "blocked: the server answered over TCP only".to_owned(),
            ));
        }
        rows.push(("verdict", self.summary.to_owned()));
        for (k, v) in rows {
            writeln!(f, "{k:<18} {v}")?;
        }
        Ok(())
    }
}

/// Why a check could not run at all.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CheckError {
    /// A local socket could not be made.
    #[error("cannot set up a local UDP socket towards the server")]
    Socket(#[from] io::Error),
    /// The server gave no STUN answer at all, over UDP or TCP: nothing can be said about the
    /// network, since the server (or its address) may be what is wrong.
    #[error(
        "no STUN answer from {server}: {cause}; tried {tried} (check the address and that a \
         STUN server runs there)",
        cause = .cause.sentence()
    )]
    Unanswered {
        /// The server asked.
        server: SocketAddr,
        /// What came back instead of an answer.
        cause: Unanswered,
        /// What was sent, for people.
        tried: String,
    },
}

/// What came back from a server that gave no STUN answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Unanswered {
    /// ICMP port unreachable: the host is there, nothing listens on the port.
    PortUnreachable,
    /// ICMP host or network unreachable, or no route: the address is not reachable from here.
    HostUnreachable,
    /// Nothing at all: a wrong address, a server that is down, or a firewall that drops
    /// packets towards it (UDP and TCP alike).
    Silence,
}

impl Unanswered {
    /// What it means, for people.
    pub fn sentence(self) -> &'static str {
        match self {
            Self::PortUnreachable => {
                "ICMP port unreachable (the host is there, but nothing listens on that port)"
            }
            Self::HostUnreachable => "host or network unreachable (no route to that address)",
            Self::Silence => "nothing came back over UDP",
        }
    }

    /// The cause an I/O error on a connected socket reports, if it is one of these.
    fn of(e: &io::Error) -> Option<Self> {
        match e.kind() {
            io::ErrorKind::ConnectionRefused => Some(Self::PortUnreachable),
            io::ErrorKind::HostUnreachable | io::ErrorKind::NetworkUnreachable => {
                Some(Self::HostUnreachable)
            }
            _ => None,
        }
    }
}

impl CheckError {
    /// A short machine-readable name, for `--json`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Socket(_) => "local_socket",
            Self::Unanswered { cause, .. } => match cause {
                Unanswered::PortUnreachable => "port_unreachable",
                Unanswered::HostUnreachable => "host_unreachable",
                Unanswered::Silence => "no_answer",
            },
        }
    }
}

/// A transaction ID nobody else uses: time, process and a counter through SplitMix64.
fn transaction_id() -> [u8; 12] {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mut x =
        nanos ^ (u64::from(std::process::id()) << 40) ^ COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut next = || {
        x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let (a, b) = (next().to_be_bytes(), next().to_be_bytes());
    let mut id = [0u8; 12];
    id[..8].copy_from_slice(&a);
    id[8..].copy_from_slice(&b[..4]);
    id
}

async fn fresh_socket(server: SocketAddr) -> io::Result<UdpSocket> {
    let any: SocketAddr = if server.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    }
    .parse()
    .map_err(io::Error::other)?;
    UdpSocket::bind(any).await
}

/// Waits on `sock` until `deadline` for a Binding response with transaction ID `id`.
async fn await_response(
    sock: &UdpSocket,
    id: [u8; 12],
    deadline: Instant,
) -> Option<BindingResponse> {
    let mut buf = [0u8; 1500];
    loop {
        let received = timeout_at(deadline.into(), sock.recv_from(&mut buf))
            .await
            .ok()?;
        let Ok((n, _)) = received else { continue };
        if let Ok(r) = stun::parse_binding_response(&buf[..n])
            && r.transaction_id == id
        {
            return Some(r);
        }
    }
}

impl CheckOptions {
    /// One Binding transaction: sends from `sock` to `to` (retransmitting) and waits for the
    /// answer on `answer_on` (normally `sock`).
    async fn transact(
        &self,
        sock: &UdpSocket,
        to: SocketAddr,
        change: Option<(bool, bool)>,
        response_port: Option<u16>,
        answer_on: &UdpSocket,
    ) -> Option<BindingResponse> {
        let id = transaction_id();
        let request = stun::binding_request(id, change, response_port);
        let mut rto = self.rto;
        for _ in 0..self.attempts.max(1) {
            if sock.send_to(&request, to).await.is_err() {
                return None;
            }
            if let Some(r) = await_response(answer_on, id, Instant::now() + rto).await {
                return Some(r);
            }
            rto *= 2;
        }
        None
    }

    async fn binding(&self, sock: &UdpSocket, to: SocketAddr) -> Option<BindingResponse> {
        self.transact(sock, to, None, None, sock).await
    }

    /// How long a transaction takes to count as unanswered: the sum of its timeouts.
    fn unanswered_after(&self) -> Duration {
        (0..self.attempts.max(1))
            .map(|i| self.rto * 2u32.pow(i))
            .sum()
    }

    /// One Binding transaction on a socket connected to the server, which hears ICMP errors.
    async fn reachable(&self, sock: &UdpSocket) -> Result<(), Unanswered> {
        let id = transaction_id();
        let request = stun::binding_request(id, None, None);
        let mut buf = [0u8; 1500];
        let mut rto = self.rto;
        let mut heard = Unanswered::Silence;
        for _ in 0..self.attempts.max(1) {
            if let Err(e) = sock.send(&request).await {
                heard = Unanswered::of(&e).unwrap_or(heard);
            }
            let deadline = Instant::now() + rto;
            while let Ok(received) = timeout_at(deadline.into(), sock.recv(&mut buf)).await {
                match received {
                    Ok(n) => {
                        if stun::parse_binding_response(&buf[..n])
                            .is_ok_and(|r| r.transaction_id == id)
                        {
                            return Ok(());
                        }
                    }
                    Err(e) => {
                        heard = Unanswered::of(&e).unwrap_or(heard);
                        break;
                    }
                }
            }
            rto *= 2;
        }
        Err(heard)
    }

    /// A Binding request over TCP to the server (RFC 8489 §6.2.2), within the time a UDP
    /// transaction takes.
    async fn tcp_binding(&self) -> Result<BindingResponse, String> {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let id = transaction_id();
        let attempt = async {
            let mut stream = tokio::net::TcpStream::connect(self.server)
                .await
                .map_err(|e| match Unanswered::of(&e) {
                    Some(Unanswered::PortUnreachable) => "connection refused".to_owned(),
                    _ => e.to_string(),
                })?;
            stream
                .write_all(&stun::binding_request(id, None, None))
                .await
                .map_err(|e| e.to_string())?;
            let mut buf = vec![0u8; 1500];
            stream
                .read_exact(&mut buf[..20])
                .await
                .map_err(|e| e.to_string())?;
            let len = 20 + usize::from(u16::from_be_bytes([buf[2], buf[3]]));
            let body = buf.get_mut(20..len).ok_or("an oversized answer")?;
            stream.read_exact(body).await.map_err(|e| e.to_string())?;
            stun::parse_binding_response(&buf[..len])
                .ok()
                .filter(|r| r.transaction_id == id)
                .ok_or_else(|| "an answer that is no Binding response".to_owned())
        };
        tokio::time::timeout(self.unanswered_after(), attempt)
            .await
            .map_err(|_| "no answer".to_owned())?
    }
}

/// Runs every test against `options.server`; `progress` hears each step.
pub async fn check(
    options: &CheckOptions,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<NatReport, CheckError> {
    let primary = options.server;
    let mut seen = BTreeSet::new();

    // The local address towards the server, for "no NAT" detection. The connected socket also
    // asks once whether the server answers at all: unlike the others it hears ICMP errors.
    let probe = fresh_socket(primary).await?;
    probe.connect(primary).await?;
    let local_ip = probe.local_addr()?.ip();
    progress("reachability: a Binding request to the server");
    if let Err(cause) = options.reachable(&probe).await {
        drop(probe);
        progress("reachability: no answer over UDP; trying STUN over TCP");
        let tried = format!(
            "{} Binding requests over UDP within {:.1} s",
            options.attempts.max(1),
            options.unanswered_after().as_secs_f64()
        );
        let tried = match options.tcp_binding().await {
            // The server is there (it answers over TCP) and UDP is silent: it is blocked.
            Ok(_) if cause == Unanswered::Silence => return Ok(NatReport::udp_blocked(primary)),
            Ok(_) => format!("{tried}; STUN over TCP answered"),
            Err(tcp) => format!("{tried}, and STUN over TCP ({tcp})"),
        };
        return Err(CheckError::Unanswered {
            server: primary,
            cause,
            tried,
        });
    }

    progress("mapping: binding to three server addresses from one socket");
    let s1 = fresh_socket(primary).await?;
    let local_port = s1.local_addr()?.port();
    let t1 = options.binding(&s1, primary).await;
    let other = t1.and_then(|r| r.other_address);
    let (mut t2, mut t3) = (None, None);
    if let Some(alt) = other {
        t2 = options
            .binding(&s1, SocketAddr::new(alt.ip(), primary.port()))
            .await;
        t3 = options.binding(&s1, alt).await;
    }
    for r in [t1, t2, t3].into_iter().flatten() {
        seen.insert(r.mapped.ip());
    }
    let mapped = |r: Option<BindingResponse>| r.map(|r| r.mapped);
    let mapping = if t1.is_some() && other.is_none() {
        // Without RFC 5780 support only "no NAT" can be told.
        classify::mapping(&[local_ip], local_port, mapped(t1), None, None)
            .filter(|m| *m == Mapping::None)
    } else {
        classify::mapping(&[local_ip], local_port, mapped(t1), mapped(t2), mapped(t3))
    };
    let udp_works = t1.is_some();

    let mut filtering = None;
    let mut allocation = (None, None);
    let mut hairpin = None;
    let mut lifetime = None;
    if udp_works && !options.mapping_only {
        if other.is_some() {
            progress("filtering: asking for answers from changed addresses");
            let s2 = fresh_socket(primary).await?;
            let both = options
                .transact(&s2, primary, Some((true, true)), None, &s2)
                .await
                .is_some();
            let port_only = if both {
                None
            } else {
                Some(
                    options
                        .transact(&s2, primary, Some((false, true)), None, &s2)
                        .await
                        .is_some(),
                )
            };
            filtering = classify::filtering(mapping, Some(both), port_only);
        }

        progress("port allocation: mapping fresh sockets");
        let mut samples = Vec::new();
        for _ in 0..options.port_samples {
            let s = fresh_socket(primary).await?;
            let local = s.local_addr()?.port();
            if let Some(r) = options.binding(&s, primary).await {
                seen.insert(r.mapped.ip());
                samples.push((local, r.mapped.port()));
            }
        }
        allocation = classify::port_allocation(&samples);

        progress("hairpinning: sending to our own mapped address");
        let s4 = fresh_socket(primary).await?;
        if let Some(r) = options.binding(&s4, primary).await {
            hairpin = Some(hairpins(options, &s4, r.mapped).await);
        }

        if let Some(max) = options.lifetime {
            progress(&format!(
                "mapping lifetime: probing for up to {} s",
                max.as_secs()
            ));
            lifetime = Some(mapping_lifetime(options, max).await?);
        }
    }
    let verdict = classify::verdict(udp_works, mapping, filtering, allocation.0);
    Ok(NatReport {
        server: primary,
        rfc5780: other.is_some(),
        local_address: Some(SocketAddr::new(local_ip, local_port)),
        public_addresses: seen.into_iter().collect(),
        nat: mapping.map(|m| m != Mapping::None),
        mapping,
        filtering,
        port_allocation: allocation.0,
        port_delta: allocation.1,
        hairpin,
        mapping_lifetime: lifetime,
        udp_blocked: false,
        verdict,
        summary: verdict.sentence(),
    })
}

/// Sends a Binding request to our own mapped address and watches for it to come back.
async fn hairpins(options: &CheckOptions, sock: &UdpSocket, mapped: SocketAddr) -> bool {
    let id = transaction_id();
    let request = stun::binding_request(id, None, None);
    let mut buf = [0u8; 1500];
    let mut rto = options.rto;
    for _ in 0..options.attempts.max(1) {
        if sock.send_to(&request, mapped).await.is_err() {
            return false;
        }
        let deadline = Instant::now() + rto;
        while let Ok(Ok((n, _))) = timeout_at(deadline.into(), sock.recv_from(&mut buf)).await {
            if stun::message::binding_request_id(&buf[..n]) == Some(id) {
                return true;
            }
        }
        rto *= 2;
    }
    false
}

/// Idle times probed: from 2 s, each 20 % longer than the last, up to `max`. A bracket of two
/// neighbours is at most 20 % wide, so its middle is within 10 % of the truth.
pub fn lifetime_schedule(max: Duration) -> Vec<Duration> {
    let mut out = Vec::new();
    let mut t = 2.0f64;
    while t <= max.as_secs_f64() {
        out.push(Duration::from_secs_f64(t));
        t *= 1.2;
    }
    out
}

/// Makes one mapping per scheduled idle time at once, then probes each once when its time has
/// come, from another socket with RESPONSE-PORT set to the mapping's port (RFC 5780 §4.6);
/// stops at the first mapping that is gone.
async fn mapping_lifetime(options: &CheckOptions, max: Duration) -> Result<Lifetime, CheckError> {
    let primary = options.server;
    let schedule = lifetime_schedule(max);
    let mut mappings = Vec::new();
    let t0 = Instant::now();
    for _ in &schedule {
        let s = fresh_socket(primary).await?;
        if let Some(r) = options.binding(&s, primary).await {
            mappings.push((s, r.mapped));
        }
    }
    let prober = fresh_socket(primary).await?;
    let mut probes = Vec::new();
    for ((sock, mapped), idle) in mappings.iter().zip(&schedule) {
        sleep_until((t0 + *idle).into()).await;
        let alive = options
            .transact(&prober, primary, None, Some(mapped.port()), sock)
            .await
            .is_some();
        probes.push((idle.as_secs_f64(), alive));
        if !alive {
            break;
        }
    }
    let (alive_secs, gone_secs) = classify::lifetime_bounds(&probes);
    let estimate_secs = alive_secs.zip(gone_secs).map(|(a, g)| (a + g) / 2.0);
    Ok(Lifetime {
        alive_secs,
        gone_secs,
        estimate_secs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_prints_one_row_per_finding_and_the_verdict_last() {
        let server: SocketAddr = "192.0.2.1:3478".parse().expect("addr");
        let text = NatReport::udp_blocked(server).to_string();
        let rows: Vec<&str> = text.lines().collect();
        assert_eq!(rows[0], "server             192.0.2.1:3478 (RFC 5780: no)");
        assert_eq!(rows[3], "NAT                unknown");
        assert!(rows.contains(&"UDP                blocked: the server answered over TCP only"));
        assert!(
            rows.last()
                .expect("rows")
                .starts_with("verdict            ")
        );
    }

    #[test]
    fn lifetime_schedule_grows_by_a_fifth_and_stops_at_the_limit() {
        let s = lifetime_schedule(Duration::from_secs(60));
        assert_eq!(s[0], Duration::from_secs(2));
        assert!(
            s.windows(2)
                .all(|w| (w[1].as_secs_f64() / w[0].as_secs_f64() - 1.2).abs() < 1e-9)
        );
        assert!(s.last().is_some_and(|t| *t <= Duration::from_secs(60)));
        assert!(s.len() >= 18, "{} probes", s.len());
    }

    fn quick(server: SocketAddr) -> CheckOptions {
        CheckOptions {
            rto: Duration::from_millis(50),
            ..CheckOptions::new(server)
        }
    }

    /// A loopback port with nothing bound to it, over UDP or TCP.
    fn closed_port() -> SocketAddr {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        s.local_addr().expect("addr")
    }

    #[tokio::test]
    async fn a_closed_port_is_an_error_naming_icmp_port_unreachable_not_a_verdict() {
        let server = closed_port();
        let err = check(&quick(server), &|_| {}).await.expect_err("no server");
        assert_eq!(err.kind(), "port_unreachable", "{err}");
        let text = err.to_string();
        assert!(text.contains(&server.to_string()), "{text}");
        assert!(text.contains("ICMP port unreachable"), "{text}");
        assert!(text.contains("3 Binding requests over UDP"), "{text}");
    }

    #[tokio::test]
    async fn a_silent_server_is_an_error_too() {
        // A UDP socket that never answers, and no TCP listener on its port.
        let silent = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let server = silent.local_addr().expect("addr");
        let err = check(&quick(server), &|_| {}).await.expect_err("silence");
        assert_eq!(err.kind(), "no_answer", "{err}");
        assert!(
            err.to_string()
                .contains("STUN over TCP (connection refused)"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_server_that_answers_over_tcp_only_means_udp_is_blocked() {
        // UDP on the port is silent (as if dropped on the way); TCP answers Binding requests.
        let silent = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let server = silent.local_addr().expect("addr");
        let listener = tokio::net::TcpListener::bind(server).await.expect("tcp");
        let mut stun = stun::Server::new(
            server,
            SocketAddr::new([127, 0, 0, 2].into(), server.port() + 1),
            "test",
        )
        .expect("server");
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
            while let Ok((mut stream, from)) = listener.accept().await {
                let mut buf = [0u8; 1500];
                let n = stream.read(&mut buf).await.unwrap_or(0);
                if let Some(t) = stun.handle(server, from, &buf[..n]) {
                    let _ = stream.write_all(&t.payload).await;
                }
            }
        });
        let report = check(&quick(server), &|_| {}).await.expect("a report");
        assert!(report.udp_blocked, "{report:?}");
        assert_eq!(report.verdict, Verdict::RelayOnly, "{report:?}");
        assert_eq!(report.mapping, None);
        drop(silent);
    }

    #[tokio::test]
    async fn a_mapping_only_check_stops_after_the_mapping_test() {
        let probe = closed_port();
        let primary = SocketAddr::new([127, 0, 0, 1].into(), probe.port());
        let alternate = SocketAddr::new([127, 0, 0, 2].into(), probe.port() + 1);
        let server = crate::StunServer::bind(primary, alternate, "test")
            .await
            .expect("bind");
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let running = tokio::spawn(server.run(stopped));
        let full = check(&quick(primary), &|_| {}).await.expect("full check");
        let mut options = quick(primary);
        options.mapping_only = true;
        let steps = std::sync::Mutex::new(Vec::new());
        let only = check(&options, &|s| {
            steps.lock().expect("lock").push(s.to_owned());
        })
        .await
        .expect("mapping only");
        let _ = stop.send(true);
        let _ = running.await;
        // On loopback: the host's own address, no NAT.
        assert_eq!(only.mapping, Some(Mapping::None));
        assert_eq!(only.mapping, full.mapping);
        assert!(full.filtering.is_some() && full.port_allocation.is_some());
        assert_eq!(
            (only.filtering, only.port_allocation, only.hairpin),
            (None, None, None)
        );
        let steps = steps.into_inner().expect("lock");
        assert!(
            steps
                .iter()
                .all(|s| s.starts_with("reachability") || s.starts_with("mapping")),
            "{steps:?}"
        );
    }

    #[tokio::test]
    async fn the_server_answers_binding_over_tcp_on_its_primary_address() {
        let probe = closed_port();
        let primary = SocketAddr::new([127, 0, 0, 1].into(), probe.port());
        let alternate = SocketAddr::new([127, 0, 0, 2].into(), probe.port() + 1);
        let server = crate::StunServer::bind(primary, alternate, "test")
            .await
            .expect("bind");
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let running = tokio::spawn(server.run(stopped));
        let answer = quick(primary)
            .tcp_binding()
            .await
            .expect("an answer over TCP");
        assert_eq!(answer.mapped.ip(), primary.ip());
        // Garbage closes the connection and is counted, and the server goes on.
        let mut garbage = tokio::net::TcpStream::connect(primary)
            .await
            .expect("connect");
        tokio::io::AsyncWriteExt::write_all(&mut garbage, &[0xff; 40])
            .await
            .expect("write");
        let mut rest = Vec::new();
        let _ = tokio::io::AsyncReadExt::read_to_end(&mut garbage, &mut rest).await;
        assert!(rest.is_empty());
        assert!(quick(primary).tcp_binding().await.is_ok());
        let _ = stop.send(true);
        let counters = running.await.expect("run");
        assert_eq!(counters.answered, 2, "{counters:?}");
        assert_eq!(counters.not_stun, 1, "{counters:?}");
    }

    #[test]
    fn transaction_ids_differ() {
        let ids: BTreeSet<[u8; 12]> = (0..1000).map(|_| transaction_id()).collect();
        assert_eq!(ids.len(), 1000);
    }
}
