//! The relay fallback's last step: the application gets one end of a socket pair, and the
//! daemon carries the other end's bytes over the relayed stream, both ways.
//!
//! For TCP the pair is `SOCK_STREAM` and bytes are copied as they come. For UDP the pair is
//! `SOCK_DGRAM` and each datagram crosses the stream as a frame (a 2-byte big-endian length,
//! then the datagram), so the remote application receives the datagrams the local one sent,
//! boundaries kept. A frame longer than the socket's datagram would be is impossible by
//! construction (the length field holds at most 65,535).
//!
//! A bridge ends when either side closes; then it closes the other.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::{UnixDatagram, UnixStream};

/// The largest datagram a frame carries.
pub const MAX_DATAGRAM: usize = 65_535;

/// Copies bytes between the daemon's end of a stream pair and `relayed` until either closes;
/// the bytes carried each way (to the relay, from the relay).
///
/// # Errors
///
/// Either side's.
pub async fn stream<R: AsyncRead + AsyncWrite + Unpin>(
    mut local: UnixStream,
    mut relayed: R,
) -> io::Result<(u64, u64)> {
    tokio::io::copy_bidirectional(&mut local, &mut relayed).await
}

/// Carries datagrams between the daemon's end of a datagram pair and `relayed` (framed) until
/// the relayed stream closes; the datagrams carried each way (to the relay, from the relay).
///
/// # Errors
///
/// Either side's, or a frame cut short by the relayed stream.
pub async fn datagrams<R: AsyncRead + AsyncWrite + Unpin>(
    local: UnixDatagram,
    relayed: R,
) -> io::Result<(u64, u64)> {
    let (mut from_relay, mut to_relay) = tokio::io::split(relayed);
    let (mut sent, mut received) = (0u64, 0u64);
    let outbound = async {
        let mut buf = vec![0u8; MAX_DATAGRAM];
        loop {
            let n = local.recv(&mut buf).await?;
            let len = u16::try_from(n).map_err(io::Error::other)?;
            to_relay.write_all(&len.to_be_bytes()).await?;
            to_relay.write_all(buf.get(..n).unwrap_or_default()).await?;
            to_relay.flush().await?;
            sent += 1;
        }
    };
    let inbound = async {
        let mut buf = vec![0u8; MAX_DATAGRAM];
        loop {
            let mut len = [0u8; 2];
            match from_relay.read_exact(&mut len).await {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(e),
            }
            let n = usize::from(u16::from_be_bytes(len));
            let datagram = buf.get_mut(..n).unwrap_or_default();
            from_relay.read_exact(datagram).await?;
            local.send(datagram).await?;
            received += 1;
        }
    };
    // The relayed stream ending ends the bridge; an error on either side too.
    let ended: io::Result<()> = tokio::select! {
        r = inbound => r,
        r = outbound => r,
    };
    ended.map(|()| (sent, received))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two bridges joined by an in-memory stream, as two daemons are by a relay.
    #[tokio::test]
    async fn a_mib_each_way_crosses_two_stream_bridges_byte_exact() {
        let (relay_a, relay_b) = tokio::io::duplex(64 * 1024);
        let (mut app_a, daemon_a) = UnixStream::pair().expect("pair");
        let (mut app_b, daemon_b) = UnixStream::pair().expect("pair");
        let a = tokio::spawn(stream(daemon_a, relay_a));
        let b = tokio::spawn(stream(daemon_b, relay_b));
        let data: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 251) as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            app_a.write_all(&sent).await.expect("write");
            app_a.shutdown().await.expect("shutdown");
            let mut back = Vec::new();
            app_a.read_to_end(&mut back).await.expect("read");
            back
        });
        let mut got = Vec::new();
        app_b.read_to_end(&mut got).await.expect("read");
        assert!(got == data, "B receives A's MiB byte-exact");
        app_b.write_all(&data).await.expect("write back");
        app_b.shutdown().await.expect("shutdown");
        let back = writer.await.expect("writer");
        assert!(back == data, "A receives B's MiB byte-exact");
        let (to_relay, from_relay) = a.await.expect("bridge").expect("bridge a");
        assert_eq!((to_relay, from_relay), (1 << 20, 1 << 20));
        b.await.expect("bridge").expect("bridge b");
    }

    #[tokio::test]
    async fn datagrams_keep_their_boundaries_through_the_relay() {
        let (relay_a, relay_b) = tokio::io::duplex(64 * 1024);
        let (app_a, daemon_a) = UnixDatagram::pair().expect("pair");
        let (app_b, daemon_b) = UnixDatagram::pair().expect("pair");
        let a = tokio::spawn(datagrams(daemon_a, relay_a));
        let b = tokio::spawn(datagrams(daemon_b, relay_b));
        let sizes = [0usize, 1, 1200, 9000, MAX_DATAGRAM / 4];
        for (i, size) in sizes.iter().enumerate() {
            let datagram = vec![u8::try_from(i).expect("small"); *size];
            app_a.send(&datagram).await.expect("send");
            let mut buf = vec![0u8; MAX_DATAGRAM];
            let n = app_b.recv(&mut buf).await.expect("recv");
            assert_eq!(&buf[..n], datagram.as_slice(), "datagram {i}");
        }
        app_b.send(b"back").await.expect("send");
        let mut buf = [0u8; 16];
        let n = app_a.recv(&mut buf).await.expect("recv");
        assert_eq!(&buf[..n], b"back");
        // The relayed stream closing ends both bridges.
        a.abort();
        let ended = tokio::time::timeout(std::time::Duration::from_secs(5), b).await;
        let counts = ended.expect("b ends").expect("task").expect("clean end");
        assert_eq!(
            counts,
            (1, sizes.len() as u64),
            "B's datagrams: sent, received"
        );
    }
}
