//! What the client needs before its first call: its API key and a channel to the server.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

/// Where the system keeps its CA certificates (Debian and its kin), for an https server.
pub const SYSTEM_CA: &str = "/etc/ssl/certs/ca-certificates.crt";

/// How long the first connection to the server may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one call may take (GetAddrInfo may be held for up to 25 s).
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Why there is no key or no channel.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// No key was given and there is nowhere to keep one.
    #[error("no --api-key, and neither XDG_CONFIG_HOME nor HOME is set")]
    NoConfigDir,
    /// The directory for the key file could not be made.
    #[error("creating {}", path.display())]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: std::io::Error,
    },
    /// A new key could not be saved.
    #[error("saving the new API key in {}", path.display())]
    SaveKey {
        /// The key file.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: std::io::Error,
    },
    /// The server's address is not a URL tonic takes.
    #[error("--server {server}")]
    Server {
        /// The address given.
        server: String,
        /// What tonic said.
        #[source]
        source: tonic::transport::Error,
    },
    /// The CA certificates could not be read.
    #[error("reading {}", path.display())]
    ReadCa {
        /// The file.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: std::io::Error,
    },
    /// TLS could not be set up with those certificates.
    #[error(transparent)]
    Tls(tonic::transport::Error),
}

/// The client's API key, and where a new one was saved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKey {
    /// The key.
    pub key: String,
    /// The file a key made just now was saved in (`None`: the key was given or read).
    pub saved_in: Option<PathBuf>,
}

/// The API key: `given` (trimmed) unless blank, else the one in
/// `$XDG_CONFIG_HOME/natpunch/api-key.txt` (`~/.config/…`), else a new one saved there.
pub fn api_key(given: Option<String>) -> Result<ApiKey, ConnectError> {
    if let Some(k) = given.filter(|k| !k.trim().is_empty()) {
        return Ok(ApiKey {
            key: k.trim().to_owned(),
            saved_in: None,
        });
    }
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
        .ok_or(ConnectError::NoConfigDir)?;
    key_in(&base.join("natpunch/api-key.txt"))
}

/// The key in `path`, or a new one saved there.
fn key_in(path: &Path) -> Result<ApiKey, ConnectError> {
    if let Ok(k) = std::fs::read_to_string(path)
        && !k.trim().is_empty()
    {
        return Ok(ApiKey {
            key: k.trim().to_owned(),
            saved_in: None,
        });
    }
    let key = crate::client::new_api_key();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| ConnectError::CreateDir {
            path: dir.to_owned(),
            source,
        })?;
    }
    std::fs::write(path, format!("{key}\n")).map_err(|source| ConnectError::SaveKey {
        path: path.to_owned(),
        source,
    })?;
    Ok(ApiKey {
        key,
        saved_in: Some(path.to_owned()),
    })
}

/// A channel to `server` (`http://…` or `https://…`, then checked against the certificates in
/// `ca`, by default [`SYSTEM_CA`]). It connects on first use, so a server that is down now is
/// retried by the calls.
pub fn channel(server: &str, ca: Option<&Path>) -> Result<Channel, ConnectError> {
    let mut endpoint = Endpoint::from_shared(server.to_owned())
        .map_err(|source| ConnectError::Server {
            server: server.to_owned(),
            source,
        })?
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(CALL_TIMEOUT);
    if server.starts_with("https://") {
        api::server::install_tls_provider();
        let ca = ca.unwrap_or(Path::new(SYSTEM_CA));
        let pem = std::fs::read(ca).map_err(|source| ConnectError::ReadCa {
            path: ca.to_owned(),
            source,
        })?;
        endpoint = endpoint
            .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem)))
            .map_err(ConnectError::Tls)?;
    }
    Ok(endpoint.connect_lazy())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_key_is_saved_and_read_back() {
        let dir = std::env::temp_dir().join(format!("measure-key-{}", std::process::id()));
        let path = dir.join("natpunch/api-key.txt");
        let made = key_in(&path).expect("a new key");
        assert_eq!(made.saved_in.as_deref(), Some(path.as_path()));
        let read = key_in(&path).expect("the saved key");
        assert_eq!(
            (read.key.as_str(), read.saved_in),
            (made.key.as_str(), None)
        );
        let given = api_key(Some("  k1 \n".into())).expect("given");
        assert_eq!(given.key, "k1");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn a_server_address_must_be_a_url() {
        let e = channel("not a url", None).expect_err("refused");
        assert_eq!(e.to_string(), "--server not a url");
        assert!(channel("http://127.0.0.1:1", None).is_ok());
    }
}
