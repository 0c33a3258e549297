//! Persistent identities: an Ed25519 key kept in a file, created on first use.
//!
//! The file holds the key in libp2p's protobuf encoding (what `go-libp2p` and `rust-libp2p`
//! both read), written with mode 0600 through a temporary file of its own, so a crash never
//! leaves half a key behind. The file is put in place with a link that never replaces an
//! existing one: when two processes create the same identity at once, one key wins and the
//! loser loads it, so both use the same key.

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
        Ok(bytes) => decode(path, &bytes).map(|k| (k, false)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => create(path),
        Err(e) => Err(io(e)),
    }
}

/// Writes a new key to a temporary file unique to this call, then links it to `path` unless
/// another process got there first, in which case that process's key is loaded.
fn create(path: &Path) -> Result<(Keypair, bool), IdentityError> {
    let io = |source| IdentityError::Io {
        path: path.to_owned(),
        source,
    };
    let key = Keypair::generate_ed25519();
    let bytes = key
        .to_protobuf_encoding()
        .map_err(|e| io(std::io::Error::other(format!("encoding the new key: {e}"))))?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(
        ".{}.{}.tmp",
        std::process::id(),
        COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let tmp = PathBuf::from(tmp);
    let written = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(&bytes)?;
        file.sync_all()?;
        // A hard link fails when `path` exists: unlike a rename, it never replaces the key
        // another process has just put there.
        std::fs::hard_link(&tmp, path)
    })();
    let _ = std::fs::remove_file(&tmp);
    match written {
        Ok(()) => Ok((key, true)),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let bytes = std::fs::read(path).map_err(io)?;
            decode(path, &bytes).map(|k| (k, false))
        }
        Err(e) => Err(io(e)),
    }
}

fn decode(path: &Path, bytes: &[u8]) -> Result<Keypair, IdentityError> {
    Keypair::from_protobuf_encoding(bytes).map_err(|e| IdentityError::Decode {
        path: path.to_owned(),
        reason: e.to_string(),
    })
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

    #[test]
    fn processes_racing_to_create_one_key_all_end_with_the_same_key() {
        let dir = std::env::temp_dir().join(format!("p2p-identity-race-{}", std::process::id()));
        for round in 0..20 {
            let path = dir.join(format!("host-{round}.key"));
            let barrier = std::sync::Arc::new(std::sync::Barrier::new(8));
            let racers: Vec<_> = (0..8)
                .map(|_| {
                    let (path, barrier) = (path.clone(), std::sync::Arc::clone(&barrier));
                    std::thread::spawn(move || {
                        barrier.wait();
                        load_or_create(&path).map(|(k, created)| (k.public().to_peer_id(), created))
                    })
                })
                .collect();
            let ids: Vec<_> = racers
                .into_iter()
                .map(|t| t.join().expect("thread").expect("every racer gets a key"))
                .collect();
            assert!(
                ids.iter().all(|(id, _)| *id == ids[0].0),
                "one key: {ids:?}"
            );
            assert_eq!(
                ids.iter().filter(|(_, c)| *c).count(),
                1,
                "created once: {ids:?}"
            );
            let (on_disk, _) = load_or_create(&path).expect("load");
            assert_eq!(on_disk.public().to_peer_id(), ids[0].0);
        }
        let left: Vec<_> = std::fs::read_dir(&dir)
            .expect("dir")
            .filter_map(|e| e.ok())
            .map(|e| e.file_name())
            .filter(|n| n.to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(left.is_empty(), "temporary files left: {left:?}");
        let _ = std::fs::remove_dir_all(dir);
    }
}
