//! The application API from the outside: a client written from `docs/daemon-api.md` alone, in
//! Python with its standard library only, receives a socket and talks through it. The direct
//! techniques in the NAT lab are in [`technique`].

mod technique;

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::os::fd::AsFd as _;
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::Command;

use daemon::api::{Event, Reply, Technique, parse_request};
use daemon::fdpass::send_with_fd;

/// What the docs tell a Python programmer: write a request line, read lines, take the
/// descriptor that comes with the `ok` line (`socket.recv_fds`), use it.
const CLIENT: &str = r#"
import json, socket, sys
api = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
api.connect(sys.argv[1])
api.sendall(json.dumps({"v": 1, "id": "py", "op": "connect",
                        "peer": "12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN",
                        "service": "echo"}).encode() + b"\n")
buf, fd = b"", None
while b"\n" not in buf:
    data, fds, _, _ = socket.recv_fds(api, 65536, 1)
    buf += data
    fd = fds[0] if fds else fd
event = json.loads(buf.split(b"\n")[0])
assert event["id"] == "py" and event["event"] == "ok" and event["fd"], event
conn = socket.socket(fileno=fd)
conn.sendall(b"hello from python\n")
print(conn.recv(64).decode().strip(), event["technique"], event["direct"])
"#;

#[test]
#[ignore = "needs python3: ./test runs it"]
fn a_python_client_written_from_the_spec_gets_a_socket_and_talks_through_it() {
    testkit::require::program(
        "a_python_client_written_from_the_spec_gets_a_socket_and_talks_through_it",
        "python3",
        "python3",
    );
    let dir = std::env::temp_dir().join(format!("natpunch-daemon-api-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("daemon.sock");
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).expect("bind");
    let python = Command::new("python3")
        .arg("-c")
        .arg(CLIENT)
        .arg(&path)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    // The daemon's side, by hand: read the request, hand over one end of a socket pair.
    let (api, _) = listener.accept().expect("accept");
    let mut line = String::new();
    BufReader::new(&api).read_line(&mut line).expect("request");
    let request = parse_request(line.trim_end().as_bytes()).expect("the client's request");
    let (app_end, mut our_end) = UnixStream::pair().expect("pair");
    // The line as the spec shows it, with the request's id.
    let ok: Reply = serde_json::from_value(serde_json::json!({
        "id": request.id, "event": "ok", "technique": "relay", "direct": false,
        "remote": "relay", "fd": true,
    }))
    .expect("an ok event");
    assert!(matches!(
        ok.event,
        Event::Ok {
            technique: Technique::Relay,
            ..
        }
    ));
    send_with_fd(api.as_fd(), &ok.to_line(), app_end.as_fd()).expect("send");
    drop(app_end);
    let mut hello = [0u8; 18];
    our_end.read_exact(&mut hello).expect("python's line");
    assert_eq!(&hello, b"hello from python\n");
    our_end.write_all(b"hello from rust\n").expect("answer");
    let out = python.wait_with_output().expect("python");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "hello from rust relay False"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
