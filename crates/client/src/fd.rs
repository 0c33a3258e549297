//! Descriptors over Unix sockets: receiving the daemon's `ok` lines with theirs, sending one
//! on (OpenSSH's `ProxyUseFdpass`), and telling what kind of socket a descriptor is.

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::cmsg_space;
use nix::sys::socket::{
    ControlMessage, ControlMessageOwned, MsgFlags, SockType, getsockopt, recvmsg, sendmsg, sockopt,
};

/// Reads into `buf`, and the descriptor that came with these bytes, if any (marked
/// close-on-exec). Room is made for a few descriptors so that a broken peer that attaches
/// several cannot leave them open in this process: the first is kept, the others closed.
///
/// # Errors
///
/// `recvmsg`'s.
pub fn recv_with_fd(
    socket: BorrowedFd<'_>,
    buf: &mut [u8],
) -> io::Result<(usize, Option<OwnedFd>)> {
    let mut space = cmsg_space!([RawFd; 4]);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = recvmsg::<()>(
        socket.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(io::Error::from)?;
    let mut first = None;
    for cmsg in msg.cmsgs().map_err(io::Error::from)? {
        if let ControlMessageOwned::ScmRights(fds) = cmsg {
            for raw in fds {
                // SAFETY: the kernel just installed `raw` in this process for this call;
                // nothing else owns it.
                #[allow(
                    unsafe_code,
                    reason = "taking ownership of a descriptor SCM_RIGHTS gave"
                )]
                let owned = unsafe { OwnedFd::from_raw_fd(raw) };
                if first.is_none() {
                    first = Some(owned);
                }
                // Any others are dropped, so closed.
            }
        }
    }
    Ok((msg.bytes, first))
}

/// Sends `fd` over the Unix socket `to` with one byte of data, `\0`: what OpenSSH's
/// `mm_receive_fd` reads from a `ProxyCommand` run with `ProxyUseFdpass=yes`.
///
/// # Errors
///
/// `sendmsg`'s (`ENOTSOCK` when `to` is no socket).
pub fn send_fd(to: BorrowedFd<'_>, fd: BorrowedFd<'_>) -> io::Result<()> {
    let fds = [fd.as_raw_fd()];
    let cmsg = [ControlMessage::ScmRights(&fds)];
    let iov = [IoSlice::new(b"\0")];
    loop {
        match sendmsg::<()>(to.as_raw_fd(), &iov, &cmsg, MsgFlags::MSG_NOSIGNAL, None) {
            Ok(1) => return Ok(()),
            Ok(_) => return Err(io::Error::new(io::ErrorKind::WriteZero, "nothing sent")),
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// The kind of socket `fd` is: `SOCK_STREAM` or `SOCK_DGRAM` (or another), or `None` when it
/// is no socket.
pub fn socket_type(fd: &impl AsFd) -> Option<SockType> {
    getsockopt(fd, sockopt::SockType).ok()
}
