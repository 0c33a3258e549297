//! What a netcat-like tool does with a connected socket: copy it to and from standard input
//! and output ([`copy_stream`], [`copy_datagrams`]), run a command on it ([`exec`]), or pass it
//! on over a Unix socket, as OpenSSH's `ProxyUseFdpass=yes` asks of a `ProxyCommand`
//! ([`pass`]).

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream, UdpSocket};
use std::os::fd::{AsFd as _, BorrowedFd};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Instant;

use crate::defaults::{COPY_CHUNK, MAX_DATAGRAM, UDP_LINGER, UDP_POLL};
use crate::{Socket, fd};

/// What went wrong with a connected socket.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    /// The descriptor to pass the socket over is no socket.
    #[error(
        "{what} is not a socket: the connection is passed over a Unix socket, as ssh gives a ProxyCommand with ProxyUseFdpass=yes"
    )]
    NotASocket {
        /// Which descriptor (`standard output`).
        what: &'static str,
    },
    /// Sending the descriptor failed.
    #[error("passing the socket on: {0}")]
    Pass(io::Error),
    /// A direction of the copy failed.
    #[error("copying {direction}: {cause}")]
    Copy {
        /// `standard input to the socket` or `the socket to standard output`.
        direction: &'static str,
        /// The cause (in the message, so not a `source()`).
        cause: io::Error,
    },
    /// The command could not be started.
    #[error("running `sh -c {command}`: {cause}")]
    Spawn {
        /// The command.
        command: String,
        /// The cause (in the message, so not a `source()`).
        cause: io::Error,
    },
}

const UP: &str = "standard input to the socket";
const DOWN: &str = "the socket to standard output";

fn copy_error(direction: &'static str) -> impl FnOnce(io::Error) -> BridgeError {
    move |cause| BridgeError::Copy { direction, cause }
}

/// Checks that `to` can carry a descriptor (it is a socket), before a connection is asked for.
///
/// # Errors
///
/// [`BridgeError::NotASocket`] naming `what`.
pub fn check_passable(to: BorrowedFd<'_>, what: &'static str) -> Result<(), BridgeError> {
    match fd::socket_type(&to) {
        Some(_) => Ok(()),
        None => Err(BridgeError::NotASocket { what }),
    }
}

/// Sends the socket over the Unix socket `to` with one `\0` byte, as OpenSSH reads it from a
/// `ProxyCommand` with `ProxyUseFdpass=yes` (ssh_config(5): "the ProxyCommand will pass a
/// connected file descriptor back to ssh instead of continuing to execute and pass data").
/// This process's copy is closed after.
///
/// # Errors
///
/// [`BridgeError::NotASocket`] when `to` is no socket, [`BridgeError::Pass`] when sending
/// fails.
pub fn pass(to: BorrowedFd<'_>, what: &'static str, socket: Socket) -> Result<(), BridgeError> {
    check_passable(to, what)?;
    let fd = socket.into_fd();
    fd::send_fd(to, fd.as_fd()).map_err(BridgeError::Pass)
}

/// Runs `sh -c command` with the socket as its standard input and output (standard error is
/// this process's). This process's copy is closed once the child has its own.
///
/// # Errors
///
/// [`BridgeError::Spawn`] when the shell cannot be started.
pub fn exec(command: &str, socket: Socket) -> Result<Child, BridgeError> {
    let spawn_error = |cause| BridgeError::Spawn {
        command: command.to_owned(),
        cause,
    };
    let fd = socket.into_fd();
    let out = fd.try_clone().map_err(spawn_error)?;
    Command::new("sh")
        .arg("-c")
        .arg(command)
        .stdin(Stdio::from(fd))
        .stdout(Stdio::from(out))
        .spawn()
        .map_err(spawn_error)
}

/// Copies `input` to `stream` and `stream` to `output` until both directions have ended: at
/// the end of `input` the stream's write side is shut down (the remote reads its end), and
/// the remote's end ends the other direction. A remote that stops reading (reset, broken pipe)
/// ends the first direction quietly. When the stream fails, this returns at once without
/// waiting for `input`.
///
/// # Errors
///
/// [`BridgeError::Copy`] naming the direction that failed.
pub fn copy_stream<R, W>(input: R, output: &mut W, stream: TcpStream) -> Result<(), BridgeError>
where
    R: Read + Send + 'static,
    W: Write + ?Sized,
{
    let to_socket = stream.try_clone().map_err(copy_error(UP))?;
    let up = std::thread::spawn(move || copy_up(input, to_socket));
    let mut buf = vec![0u8; COPY_CHUNK];
    let down = loop {
        match (&stream).read(&mut buf) {
            Ok(0) => break output.flush(),
            Ok(n) => {
                if let Err(e) = output.write_all(buf.get(..n).unwrap_or_default()) {
                    break Err(e);
                }
                if let Err(e) = output.flush() {
                    break Err(e);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => break Err(e),
        }
    };
    down.map_err(copy_error(DOWN))?;
    match up.join() {
        Ok(result) => result.map_err(copy_error(UP)),
        Err(_) => Err(copy_error(UP)(io::Error::other(
            "the copying thread panicked",
        ))),
    }
}

fn copy_up(mut input: impl Read, stream: TcpStream) -> io::Result<()> {
    let mut buf = vec![0u8; COPY_CHUNK];
    let result = loop {
        match input.read(&mut buf) {
            Ok(0) => break Ok(()),
            Ok(n) => match (&stream).write_all(buf.get(..n).unwrap_or_default()) {
                Ok(()) => {}
                Err(e) if remote_gone(&e) => break Ok(()),
                Err(e) => break Err(e),
            },
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => break Err(e),
        }
    };
    // The remote reads the end of what was sent; a socket already gone has nothing to end.
    let _ = stream.shutdown(Shutdown::Write);
    result
}

fn remote_gone(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
    )
}

/// Copies `input` to `socket`, each read one datagram, and each datagram from `socket` to
/// `output`. UDP has no close: this ends when the socket reports the remote gone (ICMP port
/// unreachable, `ECONNREFUSED`), or once `input` has ended and nothing arrived for
/// [`UDP_LINGER`].
///
/// # Errors
///
/// [`BridgeError::Copy`] naming the direction that failed.
pub fn copy_datagrams<R, W>(input: R, output: &mut W, socket: UdpSocket) -> Result<(), BridgeError>
where
    R: Read + Send + 'static,
    W: Write + ?Sized,
{
    let to_socket = socket.try_clone().map_err(copy_error(UP))?;
    socket
        .set_read_timeout(Some(UDP_POLL))
        .map_err(copy_error(DOWN))?;
    let (ended, up_ended) = mpsc::sync_channel(1);
    std::thread::spawn(move || {
        let _ = ended.send(send_datagrams(input, &to_socket));
    });
    let mut buf = vec![0u8; MAX_DATAGRAM];
    // When the input ended, and when the last datagram arrived.
    let mut input_ended: Option<Instant> = None;
    let mut last_arrival: Option<Instant> = None;
    loop {
        match socket.recv(&mut buf) {
            Ok(n) => {
                last_arrival = Some(Instant::now());
                output
                    .write_all(buf.get(..n).unwrap_or_default())
                    .and_then(|()| output.flush())
                    .map_err(copy_error(DOWN))?;
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if remote_gone(&e) => return Ok(()),
            Err(e) => return Err(copy_error(DOWN)(e)),
        }
        if input_ended.is_none() {
            match up_ended.try_recv() {
                Ok(Ok(Up::InputEnded)) => input_ended = Some(Instant::now()),
                Ok(Ok(Up::RemoteGone)) => return Ok(()),
                Ok(Err(e)) => return Err(copy_error(UP)(e)),
                Err(mpsc::TryRecvError::Empty) => {}
                Err(mpsc::TryRecvError::Disconnected) => {
                    return Err(copy_error(UP)(io::Error::other(
                        "the copying thread panicked",
                    )));
                }
            }
        }
        if let Some(ended) = input_ended {
            let quiet_since = last_arrival.map_or(ended, |last| last.max(ended));
            if quiet_since.elapsed() >= UDP_LINGER {
                return Ok(());
            }
        }
    }
}

/// How the sending direction of a UDP bridge ended.
enum Up {
    InputEnded,
    RemoteGone,
}

fn send_datagrams(mut input: impl Read, socket: &UdpSocket) -> io::Result<Up> {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        match input.read(&mut buf) {
            Ok(0) => return Ok(Up::InputEnded),
            Ok(n) => match socket.send(buf.get(..n).unwrap_or_default()) {
                Ok(_) => {}
                Err(e) if remote_gone(&e) => return Ok(Up::RemoteGone),
                Err(e) => return Err(e),
            },
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests;
