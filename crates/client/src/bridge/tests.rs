use std::collections::VecDeque;
use std::io::{Read as _, Write as _};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsFd as _;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use super::*;

fn tcp_pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("listen");
    let near = TcpStream::connect(listener.local_addr().expect("addr")).expect("dial");
    let (far, _) = listener.accept().expect("accept");
    (near, far)
}

/// Input that gives one chunk per read, as a terminal or a pipe written in pieces does.
struct Chunks(VecDeque<&'static [u8]>);

impl Read for Chunks {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(chunk) = self.0.pop_front() else {
            return Ok(0);
        };
        buf[..chunk.len()].copy_from_slice(chunk);
        Ok(chunk.len())
    }
}

#[test]
fn a_stream_carries_both_ways_and_the_end_of_input_reaches_the_remote() {
    let (near, mut far) = tcp_pair();
    let remote = std::thread::spawn(move || {
        let mut got = Vec::new();
        far.read_to_end(&mut got).expect("read to the end");
        far.write_all(b"echo: ").expect("write");
        far.write_all(&got).expect("write");
        got
    });
    let mut output = Vec::new();
    copy_stream(io::Cursor::new(b"hello".to_vec()), &mut output, near).expect("copy");
    assert_eq!(remote.join().expect("remote"), b"hello");
    assert_eq!(output, b"echo: hello");
}

#[test]
fn each_read_of_input_is_one_datagram_and_the_bridge_ends_after_the_linger() {
    let near = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let far = UdpSocket::bind("127.0.0.1:0").expect("bind");
    near.connect(far.local_addr().expect("addr"))
        .expect("connect");
    far.connect(near.local_addr().expect("addr"))
        .expect("connect");
    let remote = std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        let mut got = Vec::new();
        for _ in 0..2 {
            let n = far.recv(&mut buf).expect("recv");
            got.push(buf[..n].to_vec());
            far.send(&buf[..n]).expect("echo");
        }
        got
    });
    let start = Instant::now();
    let mut output = Vec::new();
    let input = Chunks(VecDeque::from([&b"one"[..], b"two"]));
    copy_datagrams(input, &mut output, near).expect("copy");
    assert_eq!(
        remote.join().expect("remote"),
        [b"one".to_vec(), b"two".to_vec()]
    );
    assert_eq!(output, b"onetwo");
    let took = start.elapsed();
    assert!(
        took >= UDP_LINGER && took < UDP_LINGER + Duration::from_secs(2),
        "{took:?}"
    );
}

#[test]
fn a_udp_bridge_ends_when_the_remote_port_is_closed() {
    let near = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let closed = UdpSocket::bind("127.0.0.1:0").expect("bind");
    near.connect(closed.local_addr().expect("addr"))
        .expect("connect");
    drop(closed);
    // Input that never ends: only the ICMP port unreachable can end the bridge.
    let (input, _keep) = UnixStream::pair().expect("pair");
    (&_keep).write_all(b"anyone?").expect("write");
    let start = Instant::now();
    copy_datagrams(input, &mut Vec::new(), near).expect("ends quietly");
    assert!(start.elapsed() < UDP_LINGER, "{:?}", start.elapsed());
}

#[test]
fn the_socket_is_passed_with_one_nul_byte_as_openssh_reads_it() {
    let (ssh, proxy_stdout) = UnixStream::pair().expect("pair");
    let (near, mut far) = tcp_pair();
    pass(proxy_stdout.as_fd(), "standard output", Socket::Tcp(near)).expect("pass");
    let mut buf = [0u8; 8];
    let (n, fd) = fd::recv_with_fd(ssh.as_fd(), &mut buf).expect("recv");
    assert_eq!(&buf[..n], b"\0");
    let mut passed = TcpStream::from(fd.expect("a descriptor"));
    passed.write_all(b"SSH-2.0").expect("write");
    let mut got = [0u8; 7];
    far.read_exact(&mut got).expect("read");
    assert_eq!(&got, b"SSH-2.0");
}

#[test]
fn passing_over_what_is_no_socket_says_so() {
    let (reader, writer) = io::pipe().expect("pipe");
    let (near, _far) = tcp_pair();
    let e = pass(writer.as_fd(), "standard output", Socket::Tcp(near)).expect_err("a pipe");
    assert!(matches!(e, BridgeError::NotASocket { .. }), "{e}");
    assert!(
        e.to_string().starts_with("standard output is not a socket"),
        "{e}"
    );
    drop(reader);
}

#[test]
fn a_command_runs_with_the_socket_as_its_input_and_output() {
    let (near, mut far) = tcp_pair();
    let mut child = exec("tr a-z A-Z", Socket::Tcp(near)).expect("spawn");
    far.write_all(b"shout").expect("write");
    far.shutdown(Shutdown::Write).expect("shutdown");
    let mut got = String::new();
    far.read_to_string(&mut got).expect("read");
    assert_eq!(got, "SHOUT");
    assert!(child.wait().expect("wait").success());
}
