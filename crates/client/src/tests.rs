//! The client against the other end of a socket pair: the test writes the daemon's lines
//! (with descriptors, as the daemon sends them) and reads the requests.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsFd as _, AsRawFd as _, BorrowedFd};
use std::os::unix::net::UnixStream;

use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
use serde_json::Value;

use super::*;

/// The daemon's end: writes lines, some with a descriptor.
struct Daemon {
    stream: UnixStream,
    requests: BufReader<UnixStream>,
}

impl Daemon {
    fn pair() -> (Self, Client) {
        let (daemon, app) = UnixStream::pair().expect("pair");
        let requests = BufReader::new(daemon.try_clone().expect("clone"));
        (
            Self {
                stream: daemon,
                requests,
            },
            Client::from_stream(app, "/test/daemon.sock"),
        )
    }

    fn line(&self, line: &str) {
        (&self.stream)
            .write_all(format!("{line}\n").as_bytes())
            .expect("write");
    }

    /// `bytes` in one sendmsg with `fd` attached.
    fn with_fd(&self, bytes: &str, fd: BorrowedFd<'_>) {
        let fds = [fd.as_raw_fd()];
        let iov = [io::IoSlice::new(bytes.as_bytes())];
        let sent = sendmsg::<()>(
            self.stream.as_raw_fd(),
            &iov,
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::empty(),
            None,
        )
        .expect("sendmsg");
        assert_eq!(sent, bytes.len());
    }

    fn request(&mut self) -> Value {
        let mut line = String::new();
        self.requests.read_line(&mut line).expect("read");
        serde_json::from_str(&line).expect("a JSON request")
    }
}

/// Both ends of a TCP connection on the loopback.
fn tcp_pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("listen");
    let near = TcpStream::connect(listener.local_addr().expect("addr")).expect("dial");
    let (far, _) = listener.accept().expect("accept");
    (near, far)
}

const PEER: &str = "12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN";

#[test]
fn connect_reports_progress_and_gives_the_socket_that_came_with_ok() {
    let (mut daemon, mut client) = Daemon::pair();
    let (theirs, mut far) = tcp_pair();
    // An answer to an earlier request, given up, is skipped; then this request's events, the
    // ok line cut in two with the descriptor on its first part.
    daemon.line(
        r#"{"id":"old","event":"progress","technique":"relay","step":"dialing","detail":"x"}"#,
    );
    daemon.line(r#"{"id":"r1","event":"progress","technique":"tcp-nutss","step":"probing","detail":"low TTL SYN"}"#);
    let ok = r#"{"id":"r1","event":"ok","technique":"tcp-nutss","direct":true,"remote":"203.0.113.7:41000","rtt_ms":12.5,"fd":true}"#;
    let (head, tail) = ok.split_at(15);
    daemon.with_fd(head, theirs.as_fd());
    drop(theirs);
    daemon.line(tail);
    let mut seen = Vec::new();
    let conn = client
        .connect_peer(PEER, Proto::Tcp, "ssh", |p| seen.push(p.to_string()))
        .expect("connected");
    assert_eq!(seen, ["tcp-nutss: probing: low TTL SYN"]);
    assert_eq!(
        (
            conn.technique.as_str(),
            conn.direct,
            conn.remote.as_str(),
            conn.rtt_ms
        ),
        ("tcp-nutss", true, "203.0.113.7:41000", Some(12.5))
    );
    assert_eq!(
        conn.describe("to"),
        "via tcp-nutss (direct) to 203.0.113.7:41000"
    );
    assert_eq!(
        daemon.request(),
        serde_json::json!({"v": 1, "id": "r1", "op": "connect", "peer": PEER, "proto": "tcp", "service": "ssh"})
    );
    let Socket::Tcp(mut stream) = conn.socket else {
        panic!("a TCP socket");
    };
    stream.write_all(b"ping").expect("write");
    let mut got = [0u8; 4];
    far.read_exact(&mut got).expect("read");
    assert_eq!(&got, b"ping");
}

#[test]
fn the_daemons_errors_and_broken_answers_are_told_apart() {
    let (daemon, mut client) = Daemon::pair();
    daemon.line(r#"{"id":"r1","event":"error","code":"peer-offline","message":"the peer holds no reservation"}"#);
    let e = client.connect_tcp(PEER, "ssh").expect_err("refused");
    assert!(
        matches!(&e, ClientError::Daemon { code, .. } if code == "peer-offline"),
        "{e}"
    );
    assert_eq!(e.code(), Some("peer-offline"));
    assert_eq!(e.to_string(), "peer-offline: the peer holds no reservation");

    daemon.line(
        r#"{"id":"r2","event":"ok","technique":"relay","direct":false,"remote":"r","fd":true}"#,
    );
    let e = client.connect_tcp(PEER, "ssh").expect_err("no fd");
    assert!(
        matches!(&e, ClientError::MissingFd { id } if id == "r2"),
        "{e}"
    );

    daemon.line(
        r#"{"id":"r3","event":"ok","technique":"relay","direct":false,"remote":"r","fd":false}"#,
    );
    let e = client.connect_tcp(PEER, "ssh").expect_err("no fd");
    assert!(matches!(e, ClientError::MissingFd { .. }), "{e}");

    // A UDP socket for a TCP request.
    let udp = UdpSocket::bind("127.0.0.1:0").expect("bind");
    daemon.with_fd(
        "{\"id\":\"r4\",\"event\":\"ok\",\"technique\":\"udp-punch\",\"direct\":true,\"remote\":\"r\",\"fd\":true}\n",
        udp.as_fd(),
    );
    let e = client.connect_tcp(PEER, "ssh").expect_err("wrong kind");
    assert!(
        matches!(
            e,
            ClientError::WrongSocket {
                expected: Proto::Tcp,
                ..
            }
        ),
        "{e}"
    );

    daemon.line(r#"{"id":"r5","event":"offer","offer":"o"}"#);
    let e = client.connect_tcp(PEER, "ssh").expect_err("unexpected");
    assert!(
        matches!(&e, ClientError::Unexpected { event, .. } if event == "offer"),
        "{e}"
    );

    daemon.line("{\"id\":\"r6\",");
    daemon.line("");
    let e = client.connect_tcp(PEER, "ssh").expect_err("bad line");
    assert!(matches!(e, ClientError::BadLine { .. }), "{e}");

    drop(daemon);
    let e = client.connect_tcp(PEER, "ssh").expect_err("closed");
    assert!(matches!(e, ClientError::Closed | ClientError::Io(_)), "{e}");
}

#[test]
fn a_daemon_that_never_ends_its_line_is_cut_off() {
    let (daemon, mut client) = Daemon::pair();
    let writer = std::thread::spawn(move || {
        let junk = vec![b'x'; 8 * 1024];
        for _ in 0..(defaults::MAX_EVENT_LINE / junk.len() + 2) {
            (&daemon.stream).write_all(&junk).expect("write");
        }
        daemon.line("");
        // Kept open until the client has read: it must see a long line, not a close.
        daemon
    });
    let e = client.connect_tcp(PEER, "ssh").expect_err("too long");
    assert!(matches!(e, ClientError::LineTooLong { .. }), "{e}");
    assert!(client.reader.buffered() <= defaults::MAX_EVENT_LINE + 1);
    writer.join().expect("writer");
}

#[test]
fn a_listener_gives_a_connection_per_ok_until_the_daemon_ends_it() {
    let (mut daemon, client) = Daemon::pair();
    let mut listener = client.listen("echo", Proto::Udp).expect("listen");
    assert_eq!(
        daemon.request(),
        serde_json::json!({"v": 1, "id": "r1", "op": "listen", "service": "echo", "proto": "udp"})
    );
    let far = UdpSocket::bind("127.0.0.1:0").expect("bind");
    for port in [5001, 5002] {
        let near = UdpSocket::bind("127.0.0.1:0").expect("bind");
        near.connect(far.local_addr().expect("addr"))
            .expect("connect");
        // Two lines in one write: the descriptor is the ok's.
        daemon.with_fd(
            &format!(
                "{{\"id\":\"r1\",\"event\":\"progress\",\"technique\":\"udp-punch\",\"step\":\"probing\",\"detail\":\"\"}}\n\
                 {{\"id\":\"r1\",\"event\":\"ok\",\"technique\":\"udp-punch\",\"direct\":true,\"remote\":\"192.0.2.1:{port}\",\"fd\":true}}\n"
            ),
            near.as_fd(),
        );
    }
    daemon.line(r#"{"id":"r1","event":"error","code":"cancelled","message":"cancelled"}"#);
    let mut remotes = Vec::new();
    let mut errors = Vec::new();
    for next in &mut listener {
        match next {
            Ok(conn) => {
                let Socket::Udp(socket) = conn.socket else {
                    panic!("a UDP socket");
                };
                socket.send(conn.remote.as_bytes()).expect("send");
                remotes.push(conn.remote);
            }
            Err(e) => errors.push(e.to_string()),
        }
    }
    assert_eq!(remotes, ["192.0.2.1:5001", "192.0.2.1:5002"]);
    assert_eq!(errors, ["cancelled: cancelled"]);
    let mut buf = [0u8; 64];
    let n = far.recv(&mut buf).expect("recv");
    assert_eq!(&buf[..n], b"192.0.2.1:5001");
}

#[test]
fn status_is_typed() {
    let (mut daemon, mut client) = Daemon::pair();
    daemon.line(r#"{"id":"r1","event":"status","peer":"12D3KooWA","version":1,"reservations":["/p2p-circuit"],"nat":"endpoint-independent/address-and-port-dependent","mappings":[],"techniques":["direct","relay"]}"#);
    let status = client.status().expect("status");
    assert_eq!(status.peer, "12D3KooWA");
    assert_eq!(
        status.nat.as_deref(),
        Some("endpoint-independent/address-and-port-dependent")
    );
    assert_eq!(status.techniques, ["direct", "relay"]);
    assert_eq!(daemon.request()["op"], "status");
}

#[test]
fn no_daemon_is_not_running_with_how_to_start_one() {
    let dir = std::env::temp_dir().join(format!("natpunch-client-{}", std::process::id()));
    let path = dir.join("daemon.sock");
    let e = Client::connect(&path).expect_err("nothing there");
    assert!(
        matches!(&e, ClientError::NotRunning { path: p } if *p == path),
        "{e}"
    );
    assert_eq!(
        e.to_string(),
        format!(
            "no natpunch daemon listens on {}: start one with `natpunch daemon --relay <relay multiaddr>`",
            path.display()
        )
    );
    // A socket file nobody answers on (a daemon that died) is the same.
    std::fs::create_dir_all(&dir).expect("dir");
    drop(std::os::unix::net::UnixListener::bind(&path).expect("bind"));
    let e = Client::connect(&path).expect_err("dead");
    assert!(matches!(e, ClientError::NotRunning { .. }), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_default_socket_is_where_the_daemon_puts_it() {
    assert_eq!(
        default_path(0, Some(Path::new("/run/user/0"))),
        Path::new("/run/natpunch/daemon.sock")
    );
    assert_eq!(
        default_path(1000, Some(Path::new("/run/user/1000"))),
        Path::new("/run/user/1000/natpunch/daemon.sock")
    );
    assert_eq!(
        default_path(1000, None),
        Path::new("/tmp/natpunch-1000/daemon.sock")
    );
}
