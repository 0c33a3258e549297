//! What the binary does with the shared flag groups of `cli::args`: serve the telemetry port,
//! load the key file.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use cli::args::{Identity, IdentityRole, Telemetry, TelemetryRole};
use libp2p::identity::Keypair;
use prometheus_client::registry::Registry;

/// Serving a role's telemetry port.
pub(crate) trait ServeTelemetry {
    /// Binds the port, unless it is 0.
    async fn bind(&self) -> anyhow::Result<Option<tokio::net::TcpListener>>;

    /// Serves `registry` on `/metrics` and `health` on `/health` in the background, unless the
    /// port is 0; the address served.
    async fn serve(
        &self,
        registry: Registry,
        health: telemetry::Health,
    ) -> anyhow::Result<Option<SocketAddr>>;
}

impl<R: TelemetryRole> ServeTelemetry for Telemetry<R> {
    async fn bind(&self) -> anyhow::Result<Option<tokio::net::TcpListener>> {
        if self.port == 0 {
            return Ok(None);
        }
        let addr = tokio::net::lookup_host((self.host.as_str(), self.port))
            .await
            .ok()
            .and_then(|mut a| a.next())
            .with_context(|| format!("resolving the telemetry host {}", self.host))?;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the telemetry port {addr}"))?;
        Ok(Some(listener))
    }

    async fn serve(
        &self,
        registry: Registry,
        health: telemetry::Health,
    ) -> anyhow::Result<Option<SocketAddr>> {
        let Some(listener) = self.bind().await? else {
            return Ok(None);
        };
        let addr = listener.local_addr()?;
        let registry = Arc::new(Mutex::new(registry));
        tokio::spawn(telemetry::serve_health(listener, registry, health));
        Ok(Some(addr))
    }
}

/// A role's key, and the file it is kept in.
#[derive(Debug)]
pub(crate) struct Key {
    /// The key.
    pub(crate) key: Keypair,
    /// Its file (`None`: a fresh key for this run only).
    pub(crate) path: Option<PathBuf>,
    /// Whether the file was made just now.
    pub(crate) created: bool,
}

/// Loading a role's key.
pub(crate) trait LoadKey {
    /// The key in the file given, or in the role's default file; made there on first use.
    fn load(&self) -> anyhow::Result<Key>;
}

impl<R: IdentityRole> LoadKey for Identity<R> {
    fn load(&self) -> anyhow::Result<Key> {
        let path = match (&self.path, R::FILE) {
            (Some(p), _) => p.clone(),
            (None, Some(file)) => crate::state_dir()?.join(file),
            (None, None) => {
                return Ok(Key {
                    key: Keypair::generate_ed25519(),
                    path: None,
                    created: false,
                });
            }
        };
        let (key, created) = p2p::identity::load_or_create(&path)?;
        Ok(Key {
            key,
            path: Some(path),
            created,
        })
    }
}
