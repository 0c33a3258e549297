//! An echo service through the natpunch daemon, the whole application side of it.
//!
//! On one host: `echo listen [SERVICE]` accepts connections to SERVICE (default `echo`) and
//! sends back what each sends. On another: `echo connect PEER [SERVICE]` connects to SERVICE
//! on the daemon PEER (its peer ID, from `natpunch daemon`'s output or its status), sends its
//! standard input, and prints what comes back. Both ask their local daemon, at its default
//! socket or at `$NATPUNCH_DAEMON_SOCKET`.
//!
//! ```text
//! host-a$ cargo run -p natpunch-client --example echo -- listen
//! host-b$ echo hello | cargo run -p natpunch-client --example echo -- connect 12D3KooW…
//! ```

use std::error::Error;
use std::io::{self, Read as _, Write as _};
use std::net::TcpStream;
use std::process::ExitCode;

use natpunch_client::{Client, Proto, Socket, bridge};

const USAGE: &str = "usage: echo listen [SERVICE] | echo connect PEER [SERVICE]";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = match args.as_slice() {
        ["listen"] => listen("echo"),
        ["listen", service] => listen(service),
        ["connect", peer] => connect(peer, "echo"),
        ["connect", peer, service] => connect(peer, service),
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("echo: {e}");
            ExitCode::FAILURE
        }
    }
}

fn client() -> Result<Client, Box<dyn Error>> {
    Ok(match std::env::var_os("NATPUNCH_DAEMON_SOCKET") {
        Some(path) => Client::connect(path)?,
        None => Client::connect_default()?,
    })
}

fn listen(service: &str) -> Result<(), Box<dyn Error>> {
    let listener = client()?.listen(service, Proto::Tcp)?;
    eprintln!("echo: listening on service `{service}`");
    for conn in listener {
        let conn = conn?;
        eprintln!("echo: a connection {}", conn.describe("from"));
        if let Socket::Tcp(stream) = conn.socket {
            std::thread::spawn(move || echo(&stream));
        }
    }
    Ok(())
}

/// Sends back what comes until the other end stops sending.
fn echo(stream: &TcpStream) -> io::Result<()> {
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = (&*stream).read(&mut buf)?;
        if n == 0 {
            return stream.shutdown(std::net::Shutdown::Write);
        }
        (&*stream).write_all(buf.get(..n).unwrap_or_default())?;
    }
}

fn connect(peer: &str, service: &str) -> Result<(), Box<dyn Error>> {
    let mut client = client()?;
    let conn = client.connect_peer(peer, Proto::Tcp, service, |p| eprintln!("echo: {p}"))?;
    eprintln!("echo: connected {}", conn.describe("to"));
    let Socket::Tcp(stream) = conn.socket else {
        return Err("the daemon handed over a datagram socket".into());
    };
    bridge::copy_stream(io::stdin(), &mut io::stdout(), stream)?;
    Ok(())
}
