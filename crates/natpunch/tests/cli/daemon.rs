//! `natpunch daemon` in the NAT lab: applications behind NATs get sockets from their daemons,
//! direct where the NATs allow it and relayed where they do not; the daemon keeps its identity,
//! follows a renumbered router, and answers bad input and faults without leaking.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use natlab::{Lab, LabOptions, LabProcess, Topology};
use natpunch_client::{Client, Proto};
use serde_json::Value;

use super::Scratch;

/// Three homes (two port-restricted cones, one symmetric NAT), a relay on the internet.
const HOMES: &str = r#"
    [router.home-a]
    nat = "port-restricted"
    link = { delay_ms = 10 }

    [router.home-b]
    nat = "port-restricted"
    link = { delay_ms = 10 }

    [router.home-c]
    nat = "symmetric"
    link = { delay_ms = 10 }

    [host.alice]
    upstream = "home-a"

    [host.bob]
    upstream = "home-b"

    [host.carol]
    upstream = "home-c"

    [host.relay]
    addresses = 2
"#;

/// A lab with a relay running, and a scratch directory for keys and sockets.
struct DaemonLab {
    lab: Lab,
    dir: Scratch,
    relay: String,
    relay_process: Option<LabProcess>,
}

impl DaemonLab {
    fn new(tag: &str) -> Self {
        Self::with(tag, HOMES)
    }

    fn with(tag: &str, topology: &str) -> Self {
        let topology = Topology::from_toml(topology).expect("topology");
        let lab = Lab::build(&topology, LabOptions::default()).expect("lab");
        let dir = Scratch::new(tag);
        let (relay, relay_addr) = labrun::matrix::start_relay(
            &lab,
            env!("CARGO_BIN_EXE_natpunch"),
            &dir.0.join("relay.key"),
        )
        .expect("the relay");
        Self {
            lab,
            dir,
            relay: relay_addr,
            relay_process: Some(relay),
        }
    }

    /// Stops the relay and starts it again (same key, same port).
    fn restart_relay(&mut self) {
        drop(self.relay_process.take());
        let (relay, _) = labrun::matrix::start_relay(
            &self.lab,
            env!("CARGO_BIN_EXE_natpunch"),
            &self.dir.0.join("relay.key"),
        )
        .expect("the relay, again");
        self.relay_process = Some(relay);
    }

    /// Starts a daemon on `node` named `name` (its key and socket in the scratch directory),
    /// told `nat` (a preset name) if given, with `extra` flags; waits for its reservation.
    fn daemon(
        &self,
        node: &str,
        name: &str,
        nat: Option<natlab::Preset>,
        extra: &[&str],
    ) -> Daemon {
        let socket = self.dir.0.join(format!("{name}.sock"));
        let key = self.dir.0.join(format!("{name}.key"));
        let mut args = labrun::args::daemon(&self.relay, &socket, &key, nat).expect("flags");
        // A flag given in `extra` replaces the lab's.
        for flag in extra.iter().filter(|f| f.starts_with("--")) {
            if let Some(i) = args.iter().position(|a| a == flag) {
                args.drain(i..(i + 2).min(args.len()));
            }
        }
        args.extend(extra.iter().map(Into::into));
        let process = self
            .lab
            .spawn(node, env!("CARGO_BIN_EXE_natpunch"), &args)
            .expect("daemon");
        let started = process
            .wait_for("\"event\":\"started\"", Duration::from_secs(10))
            .expect("started");
        let peer = serde_json::from_str::<Value>(&started).expect("json")["peer_id"]
            .as_str()
            .expect("peer id")
            .to_owned();
        process
            .wait_for("\"event\":\"reserved\"", Duration::from_secs(20))
            .unwrap_or_else(|e| panic!("{name} did not reserve: {e}\n{}", process.output()));
        Daemon {
            process,
            socket,
            peer,
        }
    }
}

struct Daemon {
    process: LabProcess,
    socket: PathBuf,
    peer: String,
}

/// Echoes every connection to `service` on the daemon at `socket`, until the test ends.
fn echo_service(socket: &Path, service: &str, proto: Proto) {
    let mut listener = Client::connect(socket)
        .expect("the daemon's socket")
        .listen(service, proto)
        .expect("listen");
    std::thread::spawn(move || {
        while let Ok(conn) = listener.accept() {
            std::thread::spawn(move || {
                let _ = labrun::connect::echo(conn.socket);
            });
        }
    });
}

/// One request line to the daemon at `socket` and the first event it answers with, progress
/// aside.
fn ask(socket: &Path, line: &[u8]) -> Value {
    let mut s = UnixStream::connect(socket).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    s.write_all(line).expect("write");
    let mut reader = BufReader::new(s);
    loop {
        let mut answer = String::new();
        reader.read_line(&mut answer).expect("answer");
        let event: Value =
            serde_json::from_str(&answer).unwrap_or_else(|e| panic!("{e}: {answer}"));
        if event["event"] != "progress" {
            return event;
        }
    }
}

/// What `docs/daemon-api.md` tells a Python programmer: write a request line, read event lines
/// (progress first), take the descriptor that comes with the `ok` line (`socket.recv_fds`),
/// use it. Arguments: the daemon's socket, the peer, the service.
const PYTHON_CLIENT: &str = r#"
import json, socket, sys
api = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
api.connect(sys.argv[1])
api.sendall(json.dumps({"v": 1, "id": "py", "op": "connect", "peer": sys.argv[2],
                        "service": sys.argv[3]}).encode() + b"\n")
buf, fd, event = b"", None, {"event": "progress"}
while event["event"] == "progress":
    while b"\n" not in buf:
        data, fds, _, _ = socket.recv_fds(api, 65536, 1)
        assert data, "the daemon closed the connection"
        buf += data
        fd = fds[0] if fds else fd
    line, buf = buf.split(b"\n", 1)
    event = json.loads(line)
assert event["id"] == "py" and event["event"] == "ok" and event["fd"], event
conn = socket.socket(fileno=fd)
conn.sendall(b"hello from python\n")
print(conn.recv(64).decode().strip(), event["technique"], event["direct"])
"#;

#[test]
#[ignore = "needs root and the NAT lab: ./test runs it"]
fn daemon_gives_direct_sockets_through_cone_nats_and_relayed_ones_through_a_symmetric_nat() {
    // (Over UDP the symmetric NAT is joined directly too, by birthday probing.)
    testkit::require::lab(
        "daemon_gives_direct_sockets_through_cone_nats_and_relayed_ones_through_a_symmetric_nat",
    );
    use natlab::Preset::{PortRestricted, Symmetric};
    let l = DaemonLab::new("daemon-direct");
    let alice = l.daemon("alice", "alice", Some(PortRestricted), &[]);
    let bob = l.daemon("bob", "bob", Some(PortRestricted), &[]);
    let carol = l.daemon("carol", "carol", Some(Symmetric), &[]);
    for proto in [Proto::Tcp, Proto::Udp] {
        echo_service(&bob.socket, "echo", proto);
        echo_service(&carol.socket, "echo", proto);
    }
    std::thread::sleep(Duration::from_millis(200));

    for proto in [Proto::Tcp, Proto::Udp] {
        // Two port-restricted cones: a direct socket, by hole punching.
        let mut client = Client::connect(&alice.socket).expect("alice's daemon");
        let mut steps = Vec::new();
        let asked = Instant::now();
        let conn = client
            .connect_peer(&bob.peer, proto, "echo", |p| steps.push(p.step.clone()))
            .unwrap_or_else(|e| panic!("{proto:?} to bob: {e}\n{}", alice.process.output()));
        let took = asked.elapsed();
        println!("{proto:?} alice → bob: {} in {took:?}", conn.describe("to"));
        assert!(conn.direct, "{proto:?}: direct: {}", conn.describe("to"));
        let expected: &[&str] = match proto {
            Proto::Tcp => &["tcp-simultaneous-open", "tcp-nutss"],
            Proto::Udp => &["udp-punch"],
        };
        assert!(
            expected.contains(&conn.technique.as_str()),
            "{}",
            conn.technique
        );
        assert!(
            conn.remote.starts_with("11.99."),
            "connected to bob's public address: {}",
            conn.remote
        );
        assert!(steps.contains(&"candidates-sent".to_owned()), "{steps:?}");
        labrun::connect::transfer(conn.socket).expect("1 MiB each way through the direct socket");

        // A symmetric NAT against a port-restricted cone: no hole punch can work. Over UDP,
        // birthday probing can; over TCP the relayed socket comes at once.
        let asked = Instant::now();
        let conn = client
            .connect_peer(&carol.peer, proto, "echo", |_| {})
            .unwrap_or_else(|e| panic!("{proto:?} to carol: {e}"));
        let took = asked.elapsed();
        println!(
            "{proto:?} alice → carol: {} in {took:?}",
            conn.describe("to")
        );
        match proto {
            Proto::Udp => {
                assert!(conn.direct, "{}", conn.describe("to"));
                assert_eq!(conn.technique, "udp-birthday");
            }
            Proto::Tcp => {
                assert!(!conn.direct);
                assert_eq!(conn.technique, "relay");
            }
        }
        assert!(took < Duration::from_secs(5), "within 5 s: {took:?}");
        labrun::connect::transfer(conn.socket).expect("1 MiB each way through the relay");
    }
    // An application in Python, written from the API's documentation alone.
    testkit::require::program(
        "daemon_gives_direct_sockets_through_cone_nats_and_relayed_ones_through_a_symmetric_nat",
        "python3",
        "python3",
    );
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(PYTHON_CLIENT)
        .arg(&alice.socket)
        .arg(&bob.peer)
        .arg("echo")
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.starts_with("hello from python tcp-") && said.trim_end().ends_with(" True"),
        "{said}"
    );

    // Each side's record of each connection is in its log.
    let records = |d: &Daemon, side: &str| {
        d.process
            .output()
            .lines()
            .filter(|l| l.contains("\"event\":\"connection\"") && l.contains(side))
            .count()
    };
    // (A record is written once the socket is handed over, so give the last one a moment.)
    let deadline = Instant::now() + Duration::from_secs(5);
    while (
        records(&alice, "\"initiator\""),
        records(&bob, "\"responder\""),
    ) != (5, 3)
    {
        assert!(
            Instant::now() < deadline,
            "5 records on alice, 3 on bob:\n{}\n{}",
            alice.process.output(),
            bob.process.output()
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // status: identity, reservation, techniques.
    let status = ask(&alice.socket, b"{\"v\":1,\"id\":\"s\",\"op\":\"status\"}\n");
    assert_eq!(status["event"], "status");
    assert_eq!(status["peer"], alice.peer.as_str());
    assert_eq!(
        status["nat"],
        "endpoint-independent/address-and-port-dependent"
    );
    assert!(
        status["nat_source"]
            .as_str()
            .is_some_and(|s| s.starts_with("behaviour from flags")),
        "{status}"
    );
    assert!(
        status["reservations"][0]
            .as_str()
            .is_some_and(|r| r.contains("/p2p-circuit/p2p/"))
    );
    assert!(
        status["techniques"]
            .as_array()
            .is_some_and(|t| t.contains(&"udp-punch".into()) && t.contains(&"relay".into()))
    );
}

#[test]
#[ignore = "needs root and the NAT lab: ./test runs it"]
fn daemon_keeps_its_identity_and_reserves_again_within_5s_after_its_router_is_renumbered() {
    testkit::require::lab(
        "daemon_keeps_its_identity_and_reserves_again_within_5s_after_its_router_is_renumbered",
    );
    use natlab::Preset::PortRestricted;
    let mut l = DaemonLab::new("daemon-renumber");
    let first = l.daemon("alice", "alice", Some(PortRestricted), &[]);
    let peer = first.peer.clone();
    drop(first);
    let alice = l.daemon("alice", "alice", Some(PortRestricted), &[]);
    assert_eq!(alice.peer, peer, "a restarted daemon keeps its identity");
    let bob = l.daemon("bob", "bob", Some(PortRestricted), &[]);
    echo_service(&bob.socket, "echo", Proto::Tcp);

    let seen = alice.process.output().len();
    let moved = Instant::now();
    let new = l.lab.renumber_router("home-a", None).expect("renumber");
    let new_text = format!("/ip4/{new}/");
    let deadline = moved + Duration::from_secs(5);
    loop {
        let out = alice.process.output();
        let after = out.get(seen..).unwrap_or_default();
        let observed = after
            .lines()
            .any(|l| l.contains("\"event\":\"relay-connected\"") && l.contains(&new_text));
        if observed && after.contains("\"event\":\"reserved\"") {
            println!(
                "renumbered: reserved again {:?} after the change",
                moved.elapsed()
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no new reservation at {new} within 5 s:\n{after}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let conn = Client::connect(&alice.socket)
        .expect("alice")
        .connect_peer(&bob.peer, Proto::Tcp, "echo", |_| {})
        .expect("a connection after the renumbering");
    assert!(conn.direct, "{}", conn.describe("to"));
    assert!(conn.remote.starts_with("11.99."), "{}", conn.describe("to"));
    labrun::connect::transfer(conn.socket).expect("1 MiB each way");
}

/// The number of descriptors process `pid` holds.
fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count)
}

#[test]
#[ignore = "needs root and the NAT lab: ./test runs it"]
fn daemon_answers_bad_input_and_faults_with_clear_errors_keeps_serving_and_leaks_nothing() {
    testkit::require::lab(
        "daemon_answers_bad_input_and_faults_with_clear_errors_keeps_serving_and_leaks_nothing",
    );
    use natlab::Preset::PortRestricted;
    let l = DaemonLab::new("daemon-faults");
    let alice = l.daemon(
        "alice",
        "alice",
        Some(PortRestricted),
        &["--telemetry-port", "13001"],
    );
    let bob = l.daemon("bob", "bob", Some(PortRestricted), &[]);
    echo_service(&bob.socket, "echo", Proto::Tcp);
    std::thread::sleep(Duration::from_millis(200));
    let pid = alice.process.pid().expect("pid");
    // One connection first, so that what a first connection sets up for good (the relayed
    // connection to bob, its streams' buffers) is there before counting.
    let warm = Client::connect(&alice.socket)
        .expect("alice")
        .connect_peer(&bob.peer, Proto::Tcp, "echo", |_| {})
        .expect("warm-up connection");
    labrun::connect::transfer(warm.socket).expect("warm-up transfer");
    std::thread::sleep(Duration::from_millis(500));
    let fds_before = fds(pid);

    // Bad lines, each with its precise error; the connection stays usable.
    let code = |line: &[u8]| {
        ask(&alice.socket, line)["code"]
            .as_str()
            .unwrap_or("")
            .to_owned()
    };
    assert_eq!(code(b"{not json\n"), "bad-request");
    assert_eq!(code(b"{\"v\":1,\"op\":\"dance\"}\n"), "unknown-op");
    assert_eq!(
        code(b"{\"v\":2,\"op\":\"status\"}\n"),
        "unsupported-version"
    );
    assert_eq!(code(b"{\"v\":1,\"op\":\"connect\"}\n"), "bad-request");
    let mut huge = vec![b'x'; 70_000];
    huge.push(b'\n');
    assert_eq!(code(&huge), "too-large");
    let mut s = UnixStream::connect(&alice.socket).expect("connect");
    s.write_all(b"garbage\n{\"v\":1,\"id\":\"after\",\"op\":\"status\"}\n")
        .expect("write");
    let mut lines = BufReader::new(s.try_clone().expect("clone")).lines();
    let first: Value =
        serde_json::from_str(&lines.next().expect("line").expect("read")).expect("json");
    let second: Value =
        serde_json::from_str(&lines.next().expect("line").expect("read")).expect("json");
    assert_eq!(first["code"], "bad-request");
    assert_eq!(
        (second["id"].as_str(), second["event"].as_str()),
        (Some("after"), Some("status"))
    );
    drop((s, lines));

    // A peer no relay knows, and a service nobody listens on.
    let offline = libp2p::PeerId::random().to_string();
    let line = format!("{{\"v\":1,\"id\":\"o\",\"op\":\"connect\",\"peer\":\"{offline}\"}}\n");
    let answer = ask(&alice.socket, line.as_bytes());
    assert_eq!(answer["code"], "peer-offline", "{answer}");
    let line = format!(
        "{{\"v\":1,\"id\":\"n\",\"op\":\"connect\",\"peer\":\"{}\",\"service\":\"nobody\"}}\n",
        bob.peer
    );
    let answer = ask(&alice.socket, line.as_bytes());
    assert_eq!(answer["code"], "no-service", "{answer}");
    assert!(
        answer["message"]
            .as_str()
            .is_some_and(|m| m.contains("nobody"))
    );

    // A user the socket is not open to.
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(env!("CARGO_BIN_EXE_natpunch"))
        .args(["connect", "--socket"])
        .arg(&alice.socket)
        .arg(&bob.peer)
        .output()
        .expect("setpriv");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("not open to this user"), "{err}");

    // Applications that go away in the middle of their connect.
    for _ in 0..5 {
        let mut s = UnixStream::connect(&alice.socket).expect("connect");
        let line = format!(
            "{{\"v\":1,\"id\":\"gone\",\"op\":\"connect\",\"peer\":\"{}\",\"service\":\"echo\"}}\n",
            bob.peer
        );
        s.write_all(line.as_bytes()).expect("write");
        std::thread::sleep(Duration::from_millis(100));
    }

    // 100 applications at once, a third of them writing garbage: every one gets its answer.
    let threads: Vec<_> = (0..100)
        .map(|i| {
            let socket = alice.socket.clone();
            let peer = bob.peer.clone();
            std::thread::spawn(move || -> Result<(), String> {
                if i % 3 == 0 {
                    let answer = ask(&socket, b"\x00\xff garbage {\n");
                    return (answer["code"] == "bad-request")
                        .then_some(())
                        .ok_or_else(|| answer.to_string());
                }
                let conn = Client::connect(&socket)
                    .map_err(|e| e.to_string())?
                    .connect_peer(&peer, Proto::Tcp, "echo", |_| {})
                    .map_err(|e| e.to_string())?;
                let natpunch_client::Socket::Tcp(mut s) = conn.socket else {
                    return Err("not a TCP socket".into());
                };
                s.set_read_timeout(Some(Duration::from_secs(20)))
                    .map_err(|e| e.to_string())?;
                let hello = format!("hello {i}");
                s.write_all(hello.as_bytes()).map_err(|e| e.to_string())?;
                s.shutdown(std::net::Shutdown::Write)
                    .map_err(|e| e.to_string())?;
                let mut back = String::new();
                s.read_to_string(&mut back).map_err(|e| e.to_string())?;
                (back == hello).then_some(()).ok_or(back)
            })
        })
        .collect();
    let failures: Vec<String> = threads
        .into_iter()
        .filter_map(|t| t.join().expect("thread").err())
        .collect();
    assert!(
        failures.is_empty(),
        "{} failed: {failures:?}",
        failures.len()
    );

    // Nothing left behind: descriptors, sessions, applications.
    let deadline = Instant::now() + Duration::from_secs(10);
    let metrics = || {
        let text = l
            .lab
            .run_in("alice", || {
                super::http_get(([127, 0, 0, 1], 13001).into(), "/metrics")
            })
            .expect("alice");
        let gauge = |name: &str| {
            text.lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|v| v.parse::<f64>().ok())
        };
        (
            gauge("natpunch_daemon_sessions "),
            gauge("natpunch_daemon_applications "),
        )
    };
    loop {
        let now = fds(pid);
        let (sessions, apps) = metrics();
        if now <= fds_before && sessions == Some(0.0) && apps == Some(0.0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "descriptors {fds_before} → {now}, sessions {sessions:?}, applications {apps:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // And it still serves.
    let conn = Client::connect(&alice.socket)
        .expect("alice")
        .connect_peer(&bob.peer, Proto::Tcp, "echo", |_| {})
        .expect("a connection after all that");
    labrun::connect::transfer(conn.socket).expect("1 MiB each way");
}

#[test]
#[ignore = "needs root, the NAT lab and OpenSSH: ./test runs it"]
fn openssh_logs_in_between_two_port_restricted_homes_through_natpunch_connect_fdpass() {
    let name = "openssh_logs_in_between_two_port_restricted_homes_through_natpunch_connect_fdpass";
    testkit::require::lab(name);
    testkit::require::program(name, "sshd", "openssh-server");
    testkit::require::program(name, "ssh", "openssh-client");
    use natlab::Preset::PortRestricted;
    let l = DaemonLab::new("daemon-ssh");
    let alice = l.daemon("alice", "alice", Some(PortRestricted), &[]);
    let bob = l.daemon("bob", "bob", Some(PortRestricted), &[]);
    let dir = &l.dir.0;
    let keygen = |file: &str| {
        let out = std::process::Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(dir.join(file))
            .output()
            .expect("ssh-keygen");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    keygen("host_key");
    keygen("id");
    std::fs::copy(dir.join("id.pub"), dir.join("authorized_keys")).expect("authorized_keys");
    let config = dir.join("sshd_config");
    std::fs::write(
        &config,
        format!(
            "HostKey {d}/host_key\nAuthorizedKeysFile {d}/authorized_keys\n\
             PermitRootLogin prohibit-password\nStrictModes no\nUsePAM no\nPidFile none\n\
             LogLevel ERROR\n",
            d = dir.display()
        ),
    )
    .expect("sshd_config");
    // sshd wants its privilege-separation directory, which its service would make.
    std::fs::create_dir_all("/run/sshd").expect("/run/sshd");
    // bob: every connection to service `ssh` is handed to an sshd in inetd mode.
    let accept = l
        .lab
        .spawn(
            "bob",
            env!("CARGO_BIN_EXE_natpunch"),
            &[
                "accept".to_owned(),
                "--service".to_owned(),
                "ssh".to_owned(),
                "--socket".to_owned(),
                bob.socket.display().to_string(),
                "--exec".to_owned(),
                format!("/usr/sbin/sshd -i -f {}", config.display()),
            ],
        )
        .expect("accept");
    std::thread::sleep(Duration::from_millis(300));
    // alice: ssh, its connection made by natpunch and passed over as a descriptor.
    let proxy = format!(
        "ProxyCommand={} connect --socket {} --service ssh --fdpass {}",
        env!("CARGO_BIN_EXE_natpunch"),
        alice.socket.display(),
        bob.peer
    );
    let out = l
        .lab
        .command("alice", "ssh")
        .expect("ssh")
        .args(["-F", "none", "-o", "ProxyUseFdpass=yes", "-o", &proxy])
        .args([
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
        ])
        .args(["-o", "BatchMode=yes", "-o", "LogLevel=ERROR", "-i"])
        .arg(dir.join("id"))
        .args(["root@bob", "echo logged in over natpunch"])
        .output()
        .expect("ssh");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        out.status.success(),
        "ssh: {stdout}{stderr}\naccept: {}",
        accept.output()
    );
    assert_eq!(stdout.trim(), "logged in over natpunch");
    // The login went over a direct connection.
    let record = alice
        .process
        .output()
        .lines()
        .find(|l| l.contains("\"event\":\"connection\"") && l.contains("\"service\":\"ssh\""))
        .map(str::to_owned)
        .expect("alice's record of the connection");
    let record: Value = serde_json::from_str(&record).expect("json");
    assert_eq!(record["direct"], true, "{record}");
}

/// The README's demonstration of the daemon, as written there.
#[test]
#[ignore = "needs root and the NAT lab: ./test runs it"]
fn lab_connect_matrix_gives_direct_sockets_through_cones_and_relayed_ones_through_a_symmetric_nat()
{
    testkit::require::lab(
        "lab_connect_matrix_gives_direct_sockets_through_cones_and_relayed_ones_through_a_symmetric_nat",
    );
    let out = super::natpunch(&[
        "lab",
        "connect-matrix",
        "--pairs",
        "port-restricted:port-restricted,port-restricted:symmetric",
        "--trials",
        "1",
        "--json",
    ]);
    let stderr = super::stderr(&out);
    assert!(out.status.success(), "{stderr}");
    let report: Value = serde_json::from_str(&super::stdout(&out)).expect("json");
    let cells = report["cells"].as_array().expect("cells");
    assert_eq!(cells.len(), 4, "{report}");
    for cell in cells {
        let (b, proto) = (
            cell["b"].as_str().expect("b"),
            cell["proto"].as_str().expect("proto"),
        );
        assert_eq!(
            (cell["trials"].as_u64(), cell["sockets"].as_u64()),
            (Some(1), Some(1)),
            "{cell}"
        );
        let median = cell["median_ms"].as_f64().expect("median");
        if b == "symmetric" && proto == "tcp" {
            assert_eq!(cell["direct"], 0, "{cell}");
            assert_eq!(cell["techniques"]["relay"], 1, "{cell}");
            assert!(median < 5000.0, "relayed within 5 s: {cell}");
        } else if b == "symmetric" {
            assert_eq!(cell["direct"], 1, "birthday probing: {cell}");
            assert_eq!(cell["techniques"]["udp-birthday"], 1, "{cell}");
            // Within the bounds: 256 sockets, 2,048 probes.
            assert_eq!(cell["sockets_max"], 256, "{cell}");
            let probes = cell["probes_max"].as_u64().expect("probes");
            assert!((1..=2048).contains(&probes), "{cell}");
        } else {
            assert_eq!(cell["direct"], 1, "{cell}");
            let technique = if proto == "udp" { "udp-punch" } else { "tcp-" };
            assert!(
                cell["techniques"]
                    .as_object()
                    .is_some_and(|t| t.keys().any(|k| k.starts_with(technique))),
                "{cell}"
            );
        }
    }
    // Progress on stderr, one line per trial.
    assert_eq!(stderr.matches("1 MiB each way ok").count(), 4, "{stderr}");
}

/// Birthday probing's flags reach the daemons: off, the pair is relayed; told a shallow
/// session table, the hard side opens fewer sockets and the easy side's larger budget still
/// finds one.
#[test]
#[ignore = "needs root and the NAT lab: ./test runs it"]
fn birthday_flags_turn_it_off_or_fit_it_to_a_session_table() {
    testkit::require::lab("birthday_flags_turn_it_off_or_fit_it_to_a_session_table");
    let cell = |daemon_args: &[&str]| -> Value {
        let mut args = vec![
            "lab",
            "connect-matrix",
            "--pairs",
            "port-restricted:symmetric",
            "--proto",
            "udp",
            "--trials",
            "1",
            "--parallel",
            "1",
            "--json",
        ];
        args.extend_from_slice(daemon_args);
        let out = super::natpunch(&args);
        assert!(out.status.success(), "{}", super::stderr(&out));
        let report: Value = serde_json::from_str(&super::stdout(&out)).expect("json");
        report["cells"][0].clone()
    };
    let off = cell(&["--daemon-arg=--no-birthday"]);
    assert_eq!(
        (off["sockets"].as_u64(), off["direct"].as_u64()),
        (Some(1), Some(0)),
        "{off}"
    );
    assert_eq!(off["techniques"]["relay"], 1, "{off}");
    assert!(off.get("probes_max").is_none(), "{off}");
    let shallow = cell(&[
        "--max-sessions",
        "128",
        "--daemon-arg=--session-table=128",
        "--daemon-arg=--birthday-probes=8000",
        "--daemon-arg=--birthday-rate=10000",
    ]);
    assert_eq!(shallow["direct"], 1, "{shallow}");
    assert_eq!(shallow["techniques"]["udp-birthday"], 1, "{shallow}");
    assert_eq!(shallow["sockets_max"], 128 - 16, "{shallow}");
}

/// Port prediction through the daemons, both ways: the per-destination NAT that allocates
/// ports in order is found in its predicted window with a handful of probes.
#[test]
#[ignore = "needs root and the NAT lab: ./test runs it"]
fn port_prediction_joins_a_sequential_symmetric_nat_in_a_few_probes_both_ways() {
    testkit::require::lab(
        "port_prediction_joins_a_sequential_symmetric_nat_in_a_few_probes_both_ways",
    );
    let out = super::natpunch(&[
        "lab",
        "connect-matrix",
        "--pairs",
        "port-restricted:symmetric-sequential,symmetric-sequential:port-restricted",
        "--proto",
        "udp",
        "--trials",
        "1",
        "--json",
    ]);
    assert!(out.status.success(), "{}", super::stderr(&out));
    let report: Value = serde_json::from_str(&super::stdout(&out)).expect("json");
    let cells = report["cells"].as_array().expect("cells");
    assert_eq!(cells.len(), 2, "{report}");
    for cell in cells {
        assert_eq!(cell["direct"], 1, "{cell}");
        assert_eq!(cell["techniques"]["udp-birthday"], 1, "{cell}");
        assert_eq!(cell["predicted_hits"], 1, "the window, not luck: {cell}");
        let probes = cell["probes_max"].as_u64().expect("probes");
        assert!(probes <= 64, "{cell}");
    }
}

#[test]
#[ignore = "needs root and the NAT lab: ./test runs it"]
fn bench_connect_measures_the_daemon_against_the_libp2p_engine_and_prints_the_ratios() {
    testkit::require::lab(
        "bench_connect_measures_the_daemon_against_the_libp2p_engine_and_prints_the_ratios",
    );
    let out = super::natpunch(&["bench", "connect", "--trials", "1", "--json"]);
    assert!(out.status.success(), "{}", super::stderr(&out));
    let report: Value = serde_json::from_str(&super::stdout(&out)).expect("json");
    let arms = report["arms"].as_array().expect("arms");
    assert_eq!(arms.len(), 6, "{report}");
    for arm in arms {
        assert_eq!(
            arm["ok"], arm["trials"],
            "every connection as expected: {arm}"
        );
        assert!(arm["median_ms"].as_f64().is_some_and(|m| m > 0.0), "{arm}");
    }
    // The ratios are figures, whatever they are: measured, not asserted.
    for ratio in ["tcp_over_libp2p", "udp_rtts", "relayed_ms"] {
        assert!(report[ratio].as_f64().is_some(), "{ratio}: {report}");
    }
}

#[test]
#[ignore = "needs root and the NAT lab: ./test runs it"]
fn an_offer_carried_by_the_applications_gives_both_a_direct_socket_once() {
    testkit::require::lab("an_offer_carried_by_the_applications_gives_both_a_direct_socket_once");
    use natlab::Preset::PortRestricted;
    let l = DaemonLab::new("daemon-offer");
    let alice = l.daemon("alice", "alice", Some(PortRestricted), &[]);
    let bob = l.daemon("bob", "bob", Some(PortRestricted), &[]);
    for proto in [Proto::Udp, Proto::Tcp] {
        let (offer, initiated) = Client::connect(&alice.socket)
            .expect("alice")
            .initiate(proto)
            .expect("an offer");
        // The applications carry the offer themselves; bob's daemon answers it.
        let waiting = std::thread::spawn(move || initiated.wait());
        let mut bob_client = Client::connect(&bob.socket).expect("bob");
        let answered = bob_client
            .respond(&offer, |_| {})
            .unwrap_or_else(|e| panic!("{proto:?}: {e}\n{}", bob.process.output()));
        let initiated = waiting.join().expect("thread").expect("alice's socket");
        assert!(
            answered.direct && initiated.direct,
            "{}",
            answered.describe("to")
        );
        // Bob connected, so his socket echoes what alice's sends.
        let echo = std::thread::spawn(move || labrun::connect::echo(answered.socket));
        labrun::connect::transfer(initiated.socket).expect("1 MiB each way");
        echo.join().expect("thread").expect("echo");
        // An offer is answered once.
        let again = bob_client
            .respond(&offer, |_| {})
            .expect_err("an offer is answered once");
        assert_eq!(again.code(), Some("no-service"), "{again}");
    }
    // Something that is no offer.
    let e = Client::connect(&bob.socket)
        .expect("bob")
        .respond("{\"v\":1}", |_| {})
        .expect_err("no offer");
    assert_eq!(e.code(), Some("bad-request"), "{e}");
}

#[test]
#[ignore = "needs root and the NAT lab: ./test runs it"]
fn a_daemon_not_told_its_nat_learns_it_from_an_rfc_5780_server_and_sends_a_symmetric_pair_to_the_relay_at_once()
 {
    testkit::require::lab(
        "a_daemon_not_told_its_nat_learns_it_from_an_rfc_5780_server_and_sends_a_symmetric_pair_to_the_relay_at_once",
    );
    use natlab::Preset::PortRestricted;
    let l = DaemonLab::new("daemon-natcheck");
    let addrs = l.lab.node("relay").expect("relay").uplink.addrs.clone();
    let (primary, alternate) = (format!("{}:3479", addrs[0]), format!("{}:3480", addrs[1]));
    let server = l
        .lab
        .spawn(
            "relay",
            env!("CARGO_BIN_EXE_natpunch"),
            &[
                "stun-server",
                "--primary",
                &primary,
                "--alternate",
                &alternate,
            ],
        )
        .expect("stun-server");
    server
        .wait_for("listening on", Duration::from_secs(10))
        .expect("stun-server ready");
    let alice = l.daemon("alice", "alice", Some(PortRestricted), &[]);
    // Carol is told nothing; she checks.
    let carol = l.daemon("carol", "carol", None, &["--stun-server", &primary]);
    let line = carol
        .process
        .wait_for("\"event\":\"nat\"", Duration::from_secs(30))
        .expect("carol's NAT check");
    let event: Value = serde_json::from_str(&line).expect("json");
    assert_eq!(event["mapping"], "address-and-port-dependent", "{event}");
    assert_eq!(event["filtering"], "address-and-port-dependent", "{event}");
    let status = ask(&carol.socket, b"{\"v\":1,\"op\":\"status\"}\n");
    assert_eq!(
        status["nat"],
        "address-and-port-dependent/address-and-port-dependent"
    );
    // The symmetric preset allocates at random: the check says so, and where it came from.
    assert_eq!(event["port_allocation"], "random", "{event}");
    assert_eq!(
        status["nat_source"],
        "behaviour from rfc5780, port allocation from rfc5780"
    );
    // Knowing both ends, alice sends a connection to carol to the relay without a punch.
    echo_service(&carol.socket, "echo", Proto::Tcp);
    std::thread::sleep(Duration::from_millis(200));
    let conn = Client::connect(&alice.socket)
        .expect("alice")
        .connect_peer(&carol.peer, Proto::Tcp, "echo", |_| {})
        .expect("a socket");
    assert_eq!(conn.technique, "relay");
    labrun::connect::hello(conn.socket).expect("it carries data");
    let record = alice
        .process
        .output()
        .lines()
        .find(|l| l.contains("\"event\":\"connection\""))
        .map(str::to_owned)
        .expect("a record");
    let record: Value = serde_json::from_str(&record).expect("json");
    assert_eq!(
        record["tried"].as_array().map(Vec::len),
        Some(1),
        "only the relay: {record}"
    );
}

/// A home whose router maps ports (miniupnpd), and a home behind a symmetric NAT.
const MAPPED_AND_SYMMETRIC: &str = r#"
    [router.home-a]
    nat = "port-restricted"
    portmap = true
    link = { delay_ms = 10 }

    [router.home-c]
    nat = "symmetric"
    link = { delay_ms = 10 }

    [host.alice]
    upstream = "home-a"

    [host.carol]
    upstream = "home-c"

    [host.relay]
"#;

/// Waits until `d`'s output after byte `seen` has a `mappings` event whose first mapping names
/// `ip`; that event.
fn mapped_at(d: &Daemon, seen: usize, ip: &str, limit: Duration) -> Value {
    let deadline = Instant::now() + limit;
    loop {
        let out = d.process.output();
        let found = out
            .get(seen..)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("\"event\":\"mappings\""))
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|e| {
                e["held"].as_array().is_some_and(|h| {
                    h.len() == 2 && h.iter().all(|m| m.as_str().is_some_and(|m| m.contains(ip)))
                })
            });
        if let Some(event) = found {
            return event;
        }
        assert!(
            Instant::now() < deadline,
            "no mappings at {ip} within {limit:?}:\n{out}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
#[ignore = "needs root, the NAT lab and miniupnpd: ./test runs it"]
fn a_mapped_direct_port_connects_a_symmetric_nat_directly_both_ways_and_follows_a_renumbering() {
    testkit::require::portmap(
        "a_mapped_direct_port_connects_a_symmetric_nat_directly_both_ways_and_follows_a_renumbering",
    );
    use natlab::Preset::{PortRestricted, Symmetric};
    let mut l = DaemonLab::with("daemon-mapped", MAPPED_AND_SYMMETRIC);
    let alice = l.daemon("alice", "alice", Some(PortRestricted), &[]);
    let carol = l.daemon("carol", "carol", Some(Symmetric), &[]);
    let public = l
        .lab
        .public_addr("alice")
        .expect("alice's public address")
        .to_string();
    mapped_at(&alice, 0, &public, Duration::from_secs(15));
    let status = ask(&alice.socket, b"{\"v\":1,\"op\":\"status\"}\n");
    assert_eq!(
        status["mappings"].as_array().map(Vec::len),
        Some(2),
        "{status}"
    );
    for proto in [Proto::Tcp, Proto::Udp] {
        echo_service(&alice.socket, "echo", proto);
        echo_service(&carol.socket, "echo", proto);
    }
    std::thread::sleep(Duration::from_millis(200));
    // A symmetric NAT and a port-restricted one cannot punch; the mapped port lets carol dial
    // alice (direct), and alice have carol dial her (reversal).
    for proto in [Proto::Tcp, Proto::Udp] {
        for (from, to, technique) in [(&carol, &alice, "direct"), (&alice, &carol, "reversal")] {
            let conn = Client::connect(&from.socket)
                .expect("daemon")
                .connect_peer(&to.peer, proto, "echo", |_| {})
                .unwrap_or_else(|e| panic!("{proto:?} {technique}: {e}"));
            assert!(conn.direct, "{proto:?}: {}", conn.describe("to"));
            assert_eq!(
                conn.technique,
                technique,
                "{proto:?}: {}",
                conn.describe("to")
            );
            labrun::connect::transfer(conn.socket).expect("1 MiB each way");
        }
    }
    // A new external address: the mappings follow within 5 s, and so does the reservation.
    let seen = alice.process.output().len();
    let moved = Instant::now();
    let new = l.lab.renumber_router("home-a", None).expect("renumber");
    mapped_at(&alice, seen, &new.to_string(), Duration::from_secs(5));
    println!(
        "renumbered: mapped again {:?} after the change",
        moved.elapsed()
    );
    let deadline = moved + Duration::from_secs(5);
    while !alice
        .process
        .output()
        .get(seen..)
        .unwrap_or_default()
        .contains("\"event\":\"reserved\"")
    {
        assert!(Instant::now() < deadline, "no reservation within 5 s");
        std::thread::sleep(Duration::from_millis(50));
    }
    let conn = Client::connect(&carol.socket)
        .expect("carol")
        .connect_peer(&alice.peer, Proto::Tcp, "echo", |_| {})
        .expect("a connection after the renumbering");
    assert_eq!((conn.technique.as_str(), conn.direct), ("direct", true));
    assert!(
        conn.remote.starts_with(&new.to_string()),
        "{}",
        conn.describe("to")
    );
    labrun::connect::transfer(conn.socket).expect("1 MiB each way");
}

#[test]
#[ignore = "needs root and the NAT lab: ./test runs it"]
fn a_daemon_reports_its_connections_to_the_measurement_server_with_their_technique() {
    testkit::require::lab(
        "a_daemon_reports_its_connections_to_the_measurement_server_with_their_technique",
    );
    use natlab::Preset::{PortRestricted, Symmetric};
    let l = DaemonLab::new("daemon-report");
    let relay_ip = l.lab.node("relay").expect("relay").uplink.addrs[0].to_string();
    let db = l.dir.0.join("natpunch.db");
    let url = format!("sqlite://{}", db.display());
    let server = l
        .lab
        .spawn(
            "relay",
            env!("CARGO_BIN_EXE_natpunch"),
            &[
                "server",
                "--listen-ip",
                &relay_ip,
                "--port",
                "10000",
                "--telemetry-port",
                "0",
                "--database-url",
                &url,
                "--json",
            ],
        )
        .expect("server");
    server
        .wait_for("\"event\":\"listening\"", Duration::from_secs(20))
        .expect("the server listens");
    let spool = l.dir.0.join("spool");
    let report_to = format!("http://{relay_ip}:10000");
    let spool_arg = spool.display().to_string();
    let alice = l.daemon(
        "alice",
        "alice",
        Some(PortRestricted),
        &[
            "--report-to",
            &report_to,
            "--api-key",
            "daemon-report-test",
            "--spool",
            &spool_arg,
        ],
    );
    let bob = l.daemon("bob", "bob", Some(PortRestricted), &[]);
    let carol = l.daemon("carol", "carol", Some(Symmetric), &[]);
    echo_service(&bob.socket, "echo", Proto::Udp);
    echo_service(&carol.socket, "echo", Proto::Tcp);
    std::thread::sleep(Duration::from_millis(200));
    let mut client = Client::connect(&alice.socket).expect("alice");
    let direct = client
        .connect_peer(&bob.peer, Proto::Udp, "echo", |_| {})
        .expect("to bob");
    labrun::connect::hello(direct.socket).expect("it works");
    let relayed = client
        .connect_peer(&carol.peer, Proto::Tcp, "echo", |_| {})
        .expect("to carol");
    labrun::connect::hello(relayed.socket).expect("it works");
    // Both reports reach the server, and the spool empties.
    let deadline = Instant::now() + Duration::from_secs(30);
    let rows = loop {
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        let rows = rt.block_on(async {
            let store = api::store::SqlStore::open(&url).await.expect("store");
            let rows: Vec<(Option<String>, String, Option<String>)> = sqlx::query_as(
                "SELECT technique, CAST(outcome AS TEXT), transport FROM hole_punch_results",
            )
            .fetch_all(store.pool())
            .await
            .expect("results");
            store.close().await;
            rows
        });
        if rows.len() == 2 {
            break rows;
        }
        assert!(
            Instant::now() < deadline,
            "{} reports stored:\n{}",
            rows.len(),
            alice.process.output()
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    let mut rows = rows;
    rows.sort();
    assert_eq!(
        rows,
        [
            (Some("relay".into()), "FAILED".into(), Some("tcp".into())),
            (
                Some("udp-punch".into()),
                "SUCCESS".into(),
                Some("udp".into())
            ),
        ]
    );
    let left = std::fs::read_dir(&spool)
        .expect("spool")
        .filter_map(Result::ok)
        .filter(|e| e.path().extension().is_some_and(|x| x == "pb"))
        .count();
    assert_eq!(left, 0, "the spool is empty");
}

#[test]
#[ignore = "needs root and the NAT lab: ./test runs it"]
fn daemons_reserve_again_after_their_relay_restarts_and_connect_through_it() {
    testkit::require::lab(
        "daemons_reserve_again_after_their_relay_restarts_and_connect_through_it",
    );
    use natlab::Preset::{PortRestricted, Symmetric};
    let mut l = DaemonLab::new("daemon-relay-restart");
    let alice = l.daemon("alice", "alice", Some(PortRestricted), &[]);
    let carol = l.daemon("carol", "carol", Some(Symmetric), &[]);
    echo_service(&carol.socket, "echo", Proto::Tcp);
    let seen = (alice.process.output().len(), carol.process.output().len());
    let restarted = Instant::now();
    l.restart_relay();
    // Each daemon notices, dials the relay again (backoff from 1 s) and reserves again.
    let deadline = restarted + Duration::from_secs(15);
    for (d, seen) in [(&alice, seen.0), (&carol, seen.1)] {
        loop {
            let out = d.process.output();
            let after = out.get(seen..).unwrap_or_default();
            if after.contains("\"event\":\"relay-lost\"")
                && after.contains("\"event\":\"reserved\"")
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "no new reservation within 15 s:\n{after}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    println!(
        "both reserved again {:?} after the restart",
        restarted.elapsed()
    );
    // The pair cannot punch: the new relay carries the connection.
    let conn = Client::connect(&alice.socket)
        .expect("alice")
        .connect_peer(&carol.peer, Proto::Tcp, "echo", |_| {})
        .expect("a connection through the restarted relay");
    assert_eq!(conn.technique, "relay");
    labrun::connect::transfer(conn.socket).expect("1 MiB each way");
}
