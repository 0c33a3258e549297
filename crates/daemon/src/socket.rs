//! How the daemon takes its API socket.
//!
//! The path is `/run/natpunch/daemon.sock` for root and `$XDG_RUNTIME_DIR/natpunch/daemon.sock`
//! for other users (`/tmp/natpunch-<uid>/daemon.sock` when that variable is unset): the
//! client's `natpunch_client::default_path`, so that both find the same place. The daemon
//! binds it with mode 0660. A socket file that nobody answers on (a daemon that died) is
//! replaced; one that a daemon answers on is left alone, and the second daemon says so. The
//! client side (and its "no daemon: start one with …") is `natpunch-client`'s.

use std::io;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

/// The socket file's mode: the daemon's user and group.
pub const MODE: u32 = 0o660;

/// Why the daemon could not take its socket.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// Another daemon answers on it.
    #[error("a natpunch daemon already listens on {0}")]
    Taken(PathBuf),
    /// Anything else, with what was being done.
    #[error("{what} {path}: {cause}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The cause (in the message, so not a `source()`).
        cause: io::Error,
    },
}

fn io_error(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> SocketError {
    let path = path.to_owned();
    move |cause| SocketError::Io { what, path, cause }
}

/// Takes the socket at `path` for the daemon: its directory made if missing, a dead daemon's
/// file replaced, the file's mode [`MODE`]. Inside a tokio runtime.
///
/// # Errors
///
/// [`SocketError::Taken`] when a daemon answers there; the file system's errors.
pub fn bind(path: &Path) -> Result<tokio::net::UnixListener, SocketError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io_error("making", dir))?;
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt as _;
        if !meta.file_type().is_socket() {
            return Err(SocketError::Io {
                what: "checking the existing",
                path: path.to_owned(),
                cause: io::Error::new(io::ErrorKind::AlreadyExists, "not a socket, left alone"),
            });
        }
        match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => return Err(SocketError::Taken(path.to_owned())),
            // Nobody answers: a daemon died and left its file.
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                std::fs::remove_file(path).map_err(io_error("removing the stale", path))?;
            }
            // Not ours to judge (another user's socket, not a socket at all): leave it.
            Err(cause) => {
                return Err(SocketError::Io {
                    what: "checking the existing",
                    path: path.to_owned(),
                    cause,
                });
            }
        }
    }
    let listener = tokio::net::UnixListener::bind(path).map_err(io_error("binding", path))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(MODE))
        .map_err(io_error("setting the mode of", path))?;
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_socket_is_taken_once_replaced_when_dead_and_named_when_missing() {
        let dir = std::env::temp_dir().join(format!("natpunch-socket-{}", std::process::id()));
        let path = dir.join("run").join("daemon.sock");
        let _ = std::fs::remove_dir_all(&dir);
        let connect = |path: &Path| natpunch_client::Client::connect(path).map(drop);
        let e = connect(&path).expect_err("nothing there yet");
        assert!(
            matches!(e, natpunch_client::ClientError::NotRunning { .. }),
            "{e}"
        );

        let first = bind(&path).expect("bind");
        let mode = std::fs::metadata(&path).expect("file").permissions().mode() & 0o777;
        assert_eq!(mode, MODE);
        assert!(connect(&path).is_ok(), "a client reaches it");
        let e = bind(&path).expect_err("taken");
        assert!(matches!(e, SocketError::Taken(_)), "{e}");
        assert!(
            connect(&path).is_ok(),
            "the second daemon left the first alone"
        );

        // The daemon dies without removing its file: the file stays, nobody answers.
        drop(first);
        assert!(path.exists());
        let e = connect(&path).expect_err("dead");
        assert!(
            matches!(e, natpunch_client::ClientError::NotRunning { .. }),
            "{e}"
        );
        let again = bind(&path).expect("a dead daemon's file is replaced");
        assert!(connect(&path).is_ok());
        drop(again);
        // A plain file in the socket's place is not removed: the error names it.
        std::fs::remove_file(&path).expect("remove");
        std::fs::write(&path, b"not a socket").expect("file");
        let e = bind(&path).expect_err("not a socket");
        assert!(e.to_string().starts_with("checking the existing"), "{e}");
        assert!(path.exists(), "left alone");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
