//! Persistent identities: an Ed25519 key kept in a file, created on first use.
//!
//! The file holds the key in libp2p's protobuf encoding (what `go-libp2p` and `rust-libp2p`
//! both read), written with mode 0600 through a temporary file, so a crash never leaves half a
//! key behind.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use libp2p::identity::Keypair;

/// Why an identity could not be loaded or stored.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// Reading or writing the key file failed.
    #[error("key file {path}")]
    Io {
        /// The key file.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// The file exists but is not a libp2p private key.
    #[error("{path} is not a libp2p private key (protobuf-encoded): {reason}")]
    Decode {
        /// The key file.
        path: PathBuf,
        /// The decoder's reason.
        reason: String,
    },
}

/// The key in `path`, or a new Ed25519 key stored there (with its parent directories) when
/// the file does not exist. Returns whether the key was created.
pub fn load_or_create(path: &Path) -> Result<(Keypair, bool), IdentityError> {
    let io = |source| IdentityError::Io {
        path: path.to_owned(),
        source,
    };
    match std::fs::read(path) {
        Ok(bytes) => Keypair::from_protobuf_encoding(&bytes)
            .map(|k| (k, false))
            .map_err(|e| IdentityError::Decode {
                path: path.to_owned(),
                reason: e.to_string(),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = Keypair::generate_ed25519();
            let bytes = key
                .to_protobuf_encoding()
                .map_err(|e| io(std::io::Error::other(format!("encoding the new key: {e}"))))?;
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).map_err(io)?;
            }
            let tmp = path.with_extension("tmp");
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(io)?;
            file.write_all(&bytes).map_err(io)?;
            file.sync_all().map_err(io)?;
            std::fs::rename(&tmp, path).map_err(io)?;
            Ok((key, true))
        }
        Err(e) => Err(io(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_created_once_and_read_back() {
        let dir = std::env::temp_dir().join(format!("p2p-identity-{}", std::process::id()));
        let path = dir.join("sub/key");
        let (a, created) = load_or_create(&path).expect("create");
        assert!(created);
        let (b, created) = load_or_create(&path).expect("load");
        assert!(!created);
        assert_eq!(a.public().to_peer_id(), b.public().to_peer_id());
        let mode = std::fs::metadata(&path).expect("meta").permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
        std::fs::write(&path, b"not a key").expect("write");
        let err = load_or_create(&path).expect_err("garbage");
        assert!(
            err.to_string().contains("is not a libp2p private key"),
            "{err}"
        );
        let _ = std::fs::remove_dir_all(dir);
    }
}
