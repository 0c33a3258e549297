//! The direct techniques in the NAT lab: two hosts behind two NATs run the same technique at
//! once, each on its own thread and tokio runtime inside its host's namespace, with the
//! other's public address (the router's address and the same port: the lab's routers keep
//! ports when they are free) as candidate.

use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use daemon::technique::{
    IcmpGuard, Punched, Side, TechniqueError, tcp_simultaneous_open, udp::MAGIC, udp_punch,
};
use natlab::{Lab, LabOptions, Topology};

const TOKEN: [u8; 16] = *b"natpunch-lab-tok";

/// alice behind home-a, bob behind home-b (both routers `nat`), and a public server.
fn two_homes(nat: &str) -> Lab {
    let topology = Topology::from_toml(&format!(
        r#"
        [router.home-a]
        nat = {nat}
        [router.home-b]
        nat = {nat}
        [host.alice]
        upstream = "home-a"
        [host.bob]
        upstream = "home-b"
        [host.server]
        "#
    ))
    .expect("topology");
    Lab::build(&topology, LabOptions::default()).expect("lab")
}

fn public(lab: &Lab, node: &str, port: u16) -> SocketAddr {
    SocketAddr::new(lab.public_addr(node).expect("public address").into(), port)
}

fn any(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::UNSPECIFIED, port))
}

fn block_on<F: Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(f)
}

fn in_secs(secs: u64) -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_secs(secs)
}

/// Runs `a` in alice and `b` in bob at the same time.
fn both<A: Send, B: Send>(
    lab: &Lab,
    a: impl FnOnce() -> A + Send,
    b: impl FnOnce() -> B + Send,
) -> (A, B) {
    std::thread::scope(|s| {
        let a = s.spawn(|| lab.run_in("alice", a).expect("enter alice"));
        let b = s.spawn(|| lab.run_in("bob", b).expect("enter bob"));
        (a.join().expect("alice"), b.join().expect("bob"))
    })
}

/// The next datagram of the application's, dropping the technique's own (they start with
/// the magic, as the module doc tells applications).
fn app_datagram(socket: &UdpSocket) -> Vec<u8> {
    socket
        .set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    let mut buf = [0u8; 1500];
    loop {
        let n = socket.recv(&mut buf).expect("a datagram");
        if !buf[..n].starts_with(&MAGIC) {
            return buf[..n].to_vec();
        }
    }
}

fn udp_talk(a: &UdpSocket, b: &UdpSocket) {
    a.send(b"hello from alice").expect("send");
    assert_eq!(app_datagram(b), b"hello from alice");
    b.send(b"hello from bob").expect("send");
    assert_eq!(app_datagram(a), b"hello from bob");
}

#[test]
#[ignore = "needs root and the NAT lab: ./test runs it"]
fn udp_punch_through_two_port_restricted_cone_nats_connects_both_ends() {
    testkit::require::lab("udp_punch_through_two_port_restricted_cone_nats_connects_both_ends");
    let lab = two_homes(r#""port-restricted""#);
    let (a_pub, b_pub) = (public(&lab, "alice", 40001), public(&lab, "bob", 40002));
    let (a, b) = both(
        &lab,
        || block_on(udp_punch(any(40001), &[b_pub], TOKEN, in_secs(5))),
        || block_on(udp_punch(any(40002), &[a_pub], TOKEN, in_secs(5))),
    );
    let (a, b) = (a.expect("alice punched"), b.expect("bob punched"));
    assert_eq!((a.remote, b.remote), (b_pub, a_pub));
    // An end that ended on an ack measured the round trip; one that ended on the other's
    // probe did not. Whatever was measured is a round trip of the lab's paths.
    for rtt in [a.rtt, b.rtt].into_iter().flatten() {
        assert!(rtt < Duration::from_secs(1), "{a:?} {b:?}");
    }
    assert_eq!(a.socket.peer_addr().expect("connected"), b_pub);
    udp_talk(&a.socket, &b.socket);
}

#[test]
#[ignore = "needs root and the NAT lab: ./test runs it"]
fn udp_punch_gets_through_when_a_wrong_candidate_comes_first() {
    testkit::require::lab("udp_punch_gets_through_when_a_wrong_candidate_comes_first");
    let lab = two_homes(r#""port-restricted""#);
    let (a_pub, b_pub) = (public(&lab, "alice", 40001), public(&lab, "bob", 40002));
    // The server's address with bob's port: nothing there answers.
    let wrong = public(&lab, "server", 40002);
    let (a, b) = both(
        &lab,
        || block_on(udp_punch(any(40001), &[wrong, b_pub], TOKEN, in_secs(5))),
        || block_on(udp_punch(any(40002), &[a_pub], TOKEN, in_secs(5))),
    );
    let (a, b) = (a.expect("alice punched"), b.expect("bob punched"));
    assert_eq!((a.remote, b.remote), (b_pub, a_pub));
    udp_talk(&a.socket, &b.socket);
}

#[test]
#[ignore = "needs root and the NAT lab: ./test runs it"]
fn udp_punch_to_a_silent_peer_times_out_at_the_deadline() {
    testkit::require::lab("udp_punch_to_a_silent_peer_times_out_at_the_deadline");
    let lab = two_homes(r#""port-restricted""#);
    let b_pub = public(&lab, "bob", 40002);
    let (result, late) = lab
        .run_in("alice", || {
            let deadline = in_secs(2);
            let result = block_on(udp_punch(any(40001), &[b_pub], TOKEN, deadline));
            let now = tokio::time::Instant::now();
            (result, now.saturating_duration_since(deadline))
        })
        .expect("enter alice");
    assert!(
        matches!(result, Err(TechniqueError::Timeout { tried: 1, .. })),
        "{result:?}"
    );
    assert!(late <= Duration::from_millis(200), "{late:?} late");
}

/// A deterministic MiB, different per `seed`.
fn mebibyte(seed: u32) -> Vec<u8> {
    (0..1u32 << 20)
        .map(|i| (i.wrapping_add(seed).wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect()
}

/// Sends a MiB each way at once and checks every byte.
fn swap_mebibytes(a: &TcpStream, b: &TcpStream) {
    for s in [a, b] {
        s.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
    }
    std::thread::scope(|s| {
        for (from, to, seed) in [(a, b, 1), (b, a, 2)] {
            s.spawn(move || {
                let mut from = from;
                from.write_all(&mebibyte(seed)).expect("write");
            });
            s.spawn(move || {
                let mut to = to;
                let mut got = vec![0u8; 1 << 20];
                to.read_exact(&mut got).expect("read a MiB");
                assert!(got == mebibyte(seed), "the MiB came back different");
            });
        }
    });
}

fn tcp_pair(
    lab: &Lab,
    ttl: Option<u32>,
) -> (
    Result<Punched<TcpStream>, TechniqueError>,
    Result<Punched<TcpStream>, TechniqueError>,
) {
    let (a_pub, b_pub) = (public(lab, "alice", 41001), public(lab, "bob", 41002));
    both(
        lab,
        move || {
            block_on(tcp_simultaneous_open(
                any(41001),
                &[b_pub],
                TOKEN,
                Side::Initiator,
                ttl,
                in_secs(8),
            ))
        },
        move || {
            block_on(tcp_simultaneous_open(
                any(41002),
                &[a_pub],
                TOKEN,
                Side::Responder,
                ttl,
                in_secs(8),
            ))
        },
    )
}

#[test]
#[ignore = "needs root and the NAT lab: ./test runs it"]
fn tcp_simultaneous_open_through_two_port_restricted_cone_nats_carries_a_mebibyte_each_way() {
    testkit::require::lab(
        "tcp_simultaneous_open_through_two_port_restricted_cone_nats_carries_a_mebibyte_each_way",
    );
    let lab = two_homes(r#""port-restricted""#);
    let (a, b) = tcp_pair(&lab, None);
    let (a, b) = (a.expect("alice connected"), b.expect("bob connected"));
    assert_eq!(
        (a.remote, b.remote),
        (public(&lab, "bob", 41002), public(&lab, "alice", 41001))
    );
    assert!(a.socket.nodelay().expect("nodelay"));
    swap_mebibytes(&a.socket, &b.socket);
}

/// Puts a router between the two NATs: each routes the other's address through the lab
/// internet's own address, which forwards (and sends no redirects that would undo it). Then
/// a SYN with TTL 2 crosses exactly one NAT: the host sends it with 2, its NAT forwards it
/// with 1 (and keeps the flow's state), and the internet router may not forward it.
///
/// Without this hop no TTL works in the lab: the NATs are neighbours on the internet bridge,
/// so TTL 1 dies in our own NAT before its state is kept, and TTL 2 reaches the remote NAT,
/// which (`unsolicited = "reject"`) resets it: tried, every attempt was refused for 5 s.
fn route_through_the_internet(lab: &Lab) {
    let inet = &lab.plan().internet_netns;
    let out = Command::new("ip")
        .args(["netns", "exec", inet, "sh", "-c"])
        .arg(
            "sysctl -qw net.ipv4.ip_forward=1 && \
             for f in /proc/sys/net/ipv4/conf/*/send_redirects; do echo 0 > $f; done",
        )
        .output()
        .expect("ip netns exec");
    assert!(out.status.success(), "{out:?}");
    let sink = natlab::defaults::INTERNET_SINK.to_string();
    for (router, other) in [("home-a", "bob"), ("home-b", "alice")] {
        let to = format!("{}/32", lab.public_addr(other).expect("address"));
        lab.exec(router, "ip", &["route", "add", &to, "via", &sink])
            .expect("route through the internet");
    }
}

/// What the guard's rules counted (the `packets N` of each rule, summed).
fn dropped_icmp() -> u64 {
    let out = Command::new("nft")
        .args(["list", "table", "inet", "natpunch_nutss"])
        .output()
        .expect("nft");
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .zip(text.split_whitespace().skip(1))
        .filter(|(k, _)| *k == "packets")
        .filter_map(|(_, n)| n.parse::<u64>().ok())
        .sum()
}

fn guard_table_exists(lab: &Lab, node: &str) -> bool {
    lab.exec(node, "nft", &["list", "tables"])
        .expect("nft list tables")
        .contains("natpunch_nutss")
}

#[test]
#[ignore = "needs root and the NAT lab: ./test runs it"]
fn tcp_nutss_through_two_nats_that_reset_unsolicited_syns_connects_both_ends() {
    testkit::require::lab(
        "tcp_nutss_through_two_nats_that_reset_unsolicited_syns_connects_both_ends",
    );
    let lab = two_homes(r#"{ preset = "port-restricted", unsolicited = "reject" }"#);
    route_through_the_internet(&lab);
    let (a_pub, b_pub) = (public(&lab, "alice", 41001), public(&lab, "bob", 41002));
    let nutss = |local, remote, side| {
        move || {
            let guard = IcmpGuard::install().expect("guard");
            // A second guard shares the table, which outlives it.
            drop(IcmpGuard::install().expect("second guard"));
            let result = block_on(tcp_simultaneous_open(
                local,
                &[remote],
                TOKEN,
                side,
                Some(2),
                in_secs(8),
            ));
            (result, dropped_icmp(), guard)
        }
    };
    let ((a, a_icmp, a_guard), (b, b_icmp, b_guard)) = both(
        &lab,
        nutss(any(41001), b_pub, Side::Initiator),
        nutss(any(41002), a_pub, Side::Responder),
    );
    let (a, b) = (a.expect("alice connected"), b.expect("bob connected"));
    assert_eq!((a.remote, b.remote), (b_pub, a_pub));
    // The low-TTL SYNs died at the internet router, whose ICMP the guards dropped.
    eprintln!("ICMP time exceeded dropped: alice {a_icmp}, bob {b_icmp}");
    assert!(a_icmp + b_icmp >= 1, "no ICMP time exceeded was dropped");
    swap_mebibytes(&a.socket, &b.socket);
    assert!(guard_table_exists(&lab, "alice") && guard_table_exists(&lab, "bob"));
    // Dropped on this thread, outside the hosts' namespaces: each removes its own table.
    drop((a_guard, b_guard));
    assert!(!guard_table_exists(&lab, "alice"), "alice's table is left");
    assert!(!guard_table_exists(&lab, "bob"), "bob's table is left");
}

/// A listener on the server that answers every connection with something else than a hello.
struct Impostor {
    addr: SocketAddr,
    accepted: AtomicUsize,
    stop: AtomicBool,
    listener: TcpListener,
}

impl Impostor {
    fn start(lab: &Lab, port: u16) -> Self {
        let listener = lab
            .run_in("server", || TcpListener::bind(any(port)))
            .expect("enter server")
            .expect("listen");
        listener.set_nonblocking(true).expect("nonblocking");
        Self {
            addr: public(lab, "server", port),
            accepted: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            listener,
        }
    }

    fn serve(&self) {
        while !self.stop.load(Ordering::Relaxed) {
            match self.listener.accept() {
                Ok((mut conn, _)) => {
                    self.accepted.fetch_add(1, Ordering::Relaxed);
                    let _ = conn.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n");
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }
}

#[test]
#[ignore = "needs root and the NAT lab: ./test runs it"]
fn tcp_a_listener_that_does_not_speak_the_hello_is_rejected_until_the_deadline() {
    testkit::require::lab(
        "tcp_a_listener_that_does_not_speak_the_hello_is_rejected_until_the_deadline",
    );
    let lab = two_homes(r#""port-restricted""#);
    let impostor = Impostor::start(&lab, 42000);
    let started = Instant::now();
    let result = std::thread::scope(|s| {
        s.spawn(|| impostor.serve());
        let result = lab
            .run_in("alice", || {
                block_on(tcp_simultaneous_open(
                    any(42001),
                    &[impostor.addr],
                    TOKEN,
                    Side::Initiator,
                    None,
                    in_secs(2),
                ))
            })
            .expect("enter alice");
        impostor.stop.store(true, Ordering::Relaxed);
        result
    });
    let elapsed = started.elapsed();
    match result {
        Err(TechniqueError::Timeout { tried, last }) => {
            let last = last.unwrap_or_default();
            assert!(last.contains("wrong magic"), "{last}");
            assert!(tried >= 2, "{tried} attempts: it should try again");
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert!(impostor.accepted.load(Ordering::Relaxed) >= 2);
    assert!(elapsed < Duration::from_millis(2400), "{elapsed:?}");
}

#[test]
#[ignore = "needs root and the NAT lab: ./test runs it"]
fn tcp_the_peer_wins_over_a_listener_that_does_not_speak_the_hello() {
    testkit::require::lab("tcp_the_peer_wins_over_a_listener_that_does_not_speak_the_hello");
    let lab = two_homes(r#""port-restricted""#);
    let impostor = Impostor::start(&lab, 42000);
    let (a_pub, b_pub) = (public(&lab, "alice", 41001), public(&lab, "bob", 41002));
    let (a, b) = std::thread::scope(|s| {
        s.spawn(|| impostor.serve());
        let pair = both(
            &lab,
            || {
                block_on(tcp_simultaneous_open(
                    any(41001),
                    &[impostor.addr, b_pub],
                    TOKEN,
                    Side::Initiator,
                    None,
                    in_secs(8),
                ))
            },
            || {
                block_on(tcp_simultaneous_open(
                    any(41002),
                    &[a_pub],
                    TOKEN,
                    Side::Responder,
                    None,
                    in_secs(8),
                ))
            },
        );
        // The impostor was reached too (its connection waits in the backlog until accepted).
        let until = Instant::now() + Duration::from_secs(2);
        while impostor.accepted.load(Ordering::Relaxed) == 0 && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(10));
        }
        impostor.stop.store(true, Ordering::Relaxed);
        pair
    });
    let (a, b) = (a.expect("alice connected"), b.expect("bob connected"));
    assert_eq!((a.remote, b.remote), (b_pub, a_pub));
    assert!(impostor.accepted.load(Ordering::Relaxed) >= 1);
    (&a.socket).write_all(b"ping").expect("write");
    let mut got = [0u8; 4];
    (&b.socket).read_exact(&mut got).expect("read");
    assert_eq!(&got, b"ping");
}

#[test]
#[ignore = "needs root and the NAT lab: ./test runs it"]
fn tcp_when_one_end_starts_late_through_nats_that_reset_only_nutss_connects() {
    testkit::require::lab(
        "tcp_when_one_end_starts_late_through_nats_that_reset_only_nutss_connects",
    );
    let lab = two_homes(r#"{ preset = "port-restricted", unsolicited = "reject" }"#);
    route_through_the_internet(&lab);
    // Bob starts 300 ms after alice: the first SYN of each reaches the other's NAT before
    // that NAT has the flow, and is reset; retrying every 200 ms keeps them 100 ms apart.
    let attempt = |ttl: Option<u32>, port: u16| {
        let (a_pub, b_pub) = (public(&lab, "alice", port), public(&lab, "bob", port + 1));
        both(
            &lab,
            move || {
                let _guard = ttl.map(|_| IcmpGuard::install().expect("guard"));
                block_on(tcp_simultaneous_open(
                    any(port),
                    &[b_pub],
                    TOKEN,
                    Side::Initiator,
                    ttl,
                    in_secs(3),
                ))
            },
            move || {
                let _guard = ttl.map(|_| IcmpGuard::install().expect("guard"));
                std::thread::sleep(Duration::from_millis(300));
                block_on(tcp_simultaneous_open(
                    any(port + 1),
                    &[a_pub],
                    TOKEN,
                    Side::Responder,
                    ttl,
                    in_secs(3),
                ))
            },
        )
    };
    let (a, b) = attempt(None, 43001);
    for plain in [&a.map(|p| p.remote), &b.map(|p| p.remote)] {
        match plain {
            Err(TechniqueError::Timeout {
                last: Some(last), ..
            }) => assert!(last.contains("refused"), "{last}"),
            other => panic!("plain simultaneous open should be refused, got {other:?}"),
        }
    }
    let (a, b) = attempt(Some(2), 44001);
    let (a, b) = (a.expect("alice connected"), b.expect("bob connected"));
    assert_eq!(
        (a.remote, b.remote),
        (public(&lab, "bob", 44002), public(&lab, "alice", 44001))
    );
}

/// alice behind `a`, bob behind `b`.
fn homes(a: &str, b: &str) -> Lab {
    let topology = Topology::from_toml(&format!(
        r#"
        [router.home-a]
        nat = "{a}"
        [router.home-b]
        nat = "{b}"
        [host.alice]
        upstream = "home-a"
        [host.bob]
        upstream = "home-b"
        "#
    ))
    .expect("topology");
    Lab::build(&topology, LabOptions::default()).expect("lab")
}

#[test]
#[ignore = "needs root and the NAT lab: ./test runs it"]
fn birthday_probing_joins_a_port_restricted_cone_and_a_symmetric_nat() {
    use daemon::technique::birthday::{Probing, easy_side, hard_side};
    testkit::require::lab("birthday_probing_joins_a_port_restricted_cone_and_a_symmetric_nat");
    let lab = homes("port-restricted", "symmetric");
    let alice_public = public(&lab, "alice", 40_011);
    let bob_ip = lab.public_addr("bob").expect("bob's public address");
    let started = Instant::now();
    let (easy, hard) = both(
        &lab,
        || {
            block_on(easy_side(
                any(40_011),
                bob_ip.into(),
                TOKEN,
                Probing {
                    budget: 2048,
                    rate: 4000,
                    prediction: None,
                },
                in_secs(10),
            ))
        },
        || block_on(hard_side(256, alice_public, TOKEN, in_secs(10))),
    );
    let (easy, hard) = (
        easy.expect("alice probed her way in"),
        hard.expect("bob was reached").punched,
    );
    println!(
        "birthday: {} probes, {:?}; bob's port {}",
        easy.probes,
        started.elapsed(),
        easy.punched.remote.port()
    );
    assert_eq!(easy.punched.remote.ip(), std::net::IpAddr::from(bob_ip));
    assert_eq!(hard.remote, alice_public);
    assert!(easy.probes <= 2048);
    udp_talk(&easy.punched.socket, &hard.socket);
}

/// Port prediction: bob's NAT maps per destination but allocates ports one after another, so
/// his next mappings sit just above the one a STUN server saw; alice probes that window first
/// and gets through with a few probes, where random ones need hundreds.
#[test]
#[ignore = "needs root and the NAT lab: ./test runs it"]
fn port_prediction_joins_a_port_restricted_cone_and_a_sequential_symmetric_nat_in_few_probes() {
    use daemon::technique::birthday::{Prediction, Probing, easy_side, hard_side};
    testkit::require::lab(
        "port_prediction_joins_a_port_restricted_cone_and_a_sequential_symmetric_nat_in_few_probes",
    );
    let topology = Topology::from_toml(
        r#"
        [router.home-a]
        nat = "port-restricted"
        [router.home-b]
        nat = { preset = "symmetric", port_allocation = "sequential" }
        [host.alice]
        upstream = "home-a"
        [host.bob]
        upstream = "home-b"
        [host.server]
        "#,
    )
    .expect("topology");
    let lab = Lab::build(&topology, LabOptions::default()).expect("lab");
    let stun = public(&lab, "server", 3478);
    let (stop, stopped) = tokio::sync::watch::channel(false);
    std::thread::scope(|s| {
        let reflector = s.spawn(|| {
            lab.run_in("server", || {
                block_on(async {
                    let r = natcheck::reflector::Reflector::bind(any(3478))
                        .await
                        .expect("reflector");
                    r.run(stopped).await;
                });
            })
            .expect("enter server");
        });
        // What bob's NAT gave his last fresh socket, as the STUN server saw it.
        let seen = lab
            .run_in("bob", || {
                block_on(async {
                    for _ in 0..20 {
                        if let Ok(a) = natcheck::reflector::mapped_udp(0, stun).await {
                            return a;
                        }
                    }
                    panic!("no STUN answer");
                })
            })
            .expect("enter bob");
        let alice_public = public(&lab, "alice", 40_021);
        let prediction = Prediction::new(seen.port() + 1, 16, 20, Duration::from_millis(25));
        let (easy, hard) = both(
            &lab,
            || {
                block_on(easy_side(
                    any(40_021),
                    seen.ip(),
                    TOKEN,
                    Probing {
                        budget: 2048,
                        rate: 4000,
                        prediction: Some(prediction),
                    },
                    in_secs(10),
                ))
            },
            || block_on(hard_side(256, alice_public, TOKEN, in_secs(10))),
        );
        let _ = stop.send(true);
        reflector.join().expect("reflector");
        let (easy, hard) = (
            easy.expect("alice predicted her way in"),
            hard.expect("bob was reached").punched,
        );
        println!(
            "prediction: {} probes; bob's last mapping {}, the one that answered {}",
            easy.probes,
            seen.port(),
            easy.punched.remote.port()
        );
        assert!(easy.predicted, "the answer came from outside the window");
        assert!(easy.probes <= 64, "{} probes", easy.probes);
        assert_eq!(hard.remote, alice_public);
        udp_talk(&easy.punched.socket, &hard.socket);
    });
}
