//! Handing a socket to an application: the `ok` line and the descriptor in one `sendmsg`
//! (`SCM_RIGHTS`), as `docs/daemon-api.md` specifies. The receiving side is the client's
//! (`natpunch_client::fd`).
//!
//! The descriptor travels with the first byte of the line; if the kernel takes only part of
//! the line, the rest follows as plain bytes.

use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, BorrowedFd};

use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};

/// Sends what the socket takes of `line`, with `fd` attached; the bytes sent.
///
/// # Errors
///
/// `sendmsg`'s (`WouldBlock` on a non-blocking socket that is full).
pub fn send_with_fd(socket: BorrowedFd<'_>, line: &[u8], fd: BorrowedFd<'_>) -> io::Result<usize> {
    let fds = [fd.as_raw_fd()];
    let cmsg = [ControlMessage::ScmRights(&fds)];
    let iov = [IoSlice::new(line)];
    sendmsg::<()>(
        socket.as_raw_fd(),
        &iov,
        &cmsg,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )
    .map_err(io::Error::from)
}

/// Writes `line` with `fd` attached on a tokio Unix stream, the whole line.
///
/// # Errors
///
/// The socket's write errors.
pub async fn write_with_fd(
    stream: &tokio::net::UnixStream,
    line: &[u8],
    fd: BorrowedFd<'_>,
) -> io::Result<()> {
    let socket = stream_fd(stream);
    let mut sent = stream
        .async_io(tokio::io::Interest::WRITABLE, || {
            send_with_fd(socket, line, fd)
        })
        .await?;
    while let Some(rest) = line.get(sent..).filter(|r| !r.is_empty()) {
        stream.writable().await?;
        match stream.try_write(rest) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn stream_fd(stream: &tokio::net::UnixStream) -> BorrowedFd<'_> {
    use std::os::fd::AsFd as _;
    stream.as_fd()
}

#[cfg(test)]
mod tests {
    use std::io::{Read as _, Write as _};
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsFd as _;
    use std::os::unix::net::UnixStream;

    use natpunch_client::fd::recv_with_fd;

    use super::*;

    #[test]
    fn a_connected_socket_crosses_with_its_line_and_works_on_the_other_side() {
        let (daemon, app) = UnixStream::pair().expect("pair");
        let listener = TcpListener::bind("127.0.0.1:0").expect("listen");
        let connected = TcpStream::connect(listener.local_addr().expect("addr")).expect("dial");
        let (mut far, _) = listener.accept().expect("accept");
        let line = b"{\"id\":\"a1\",\"event\":\"ok\",\"fd\":true}\n";
        let sent = send_with_fd(daemon.as_fd(), line, connected.as_fd()).expect("send");
        assert_eq!(sent, line.len());
        // The daemon's copy goes; the application's is the only one left.
        drop(connected);
        let mut buf = [0u8; 256];
        let (n, fd) = recv_with_fd(app.as_fd(), &mut buf).expect("recv");
        assert_eq!(&buf[..n], line);
        let mut socket = TcpStream::from(fd.expect("a descriptor"));
        socket.write_all(b"ping").expect("write");
        let mut got = [0u8; 4];
        far.read_exact(&mut got).expect("read");
        assert_eq!(&got, b"ping");
        // A plain line brings no descriptor.
        (&daemon).write_all(b"{}\n").expect("write");
        let (n, fd) = recv_with_fd(app.as_fd(), &mut buf).expect("recv");
        assert_eq!((n, fd.is_none()), (3, true));
    }

    #[tokio::test]
    async fn the_async_writer_sends_the_whole_line_and_the_descriptor() {
        let (daemon, app) = tokio::net::UnixStream::pair().expect("pair");
        let (mine, theirs) = UnixStream::pair().expect("pair");
        let line = vec![b'x'; 300_000];
        let reader = std::thread::spawn(move || {
            let app = app.into_std().expect("std");
            app.set_nonblocking(false).expect("blocking");
            let mut buf = vec![0u8; 400_000];
            let mut total = 0;
            let mut fds = 0;
            while total < 300_000 {
                let (n, fd) = recv_with_fd(app.as_fd(), &mut buf).expect("recv");
                total += n;
                fds += usize::from(fd.is_some());
                if let Some(fd) = fd {
                    let mut s = UnixStream::from(fd);
                    s.write_all(b"hi").expect("write");
                }
            }
            (total, fds)
        });
        write_with_fd(&daemon, &line, theirs.as_fd())
            .await
            .expect("write");
        drop(theirs);
        let (total, fds) = reader.join().expect("reader");
        assert_eq!((total, fds), (300_000, 1), "the whole line, one descriptor");
        let mut got = [0u8; 2];
        (&mine).read_exact(&mut got).expect("read");
        assert_eq!(&got, b"hi");
    }
}
