//! The mappings this host made, kept on disk between invocations, and the choices that go with
//! them: which protocol to map with, and renewing a mapping this host already holds with its
//! port and PCP nonce.
//!
//! A record is needed because PCP renews and deletes a mapping only with the nonce that made
//! it, and NAT-PMP has no way to list mappings. Entries are keyed by gateway, internal endpoint
//! and protocol. The file is JSON, rewritten whole through a temporary file.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::Protocol;
use crate::client::{self, ClientError, Gateway, MapRequest, Mapped};
use crate::hold::Update;
use crate::keeper::{Event, Method};

/// Why the record could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// The file exists but could not be read.
    #[error("reading {}", path.display())]
    Read {
        /// The record's file.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: io::Error,
    },
    /// The file is not a list of mappings.
    #[error("{} is not a mapping record", path.display())]
    Parse {
        /// The record's file.
        path: PathBuf,
        /// Where the JSON is wrong.
        #[source]
        source: serde_json::Error,
    },
    /// The record's directory could not be made.
    #[error("creating {}", path.display())]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: io::Error,
    },
    /// The file could not be written.
    #[error("writing {}", path.display())]
    Write {
        /// The file written (the record or its temporary twin).
        path: PathBuf,
        /// What the system said.
        #[source]
        source: io::Error,
    },
}

/// Why [`Record::add`] made no mapping.
#[derive(Debug, thiserror::Error)]
pub enum AddError {
    /// Every protocol tried failed; one reason per protocol, in the order tried.
    #[error("no protocol could map the port: {}", .0.join("; "))]
    NoneMapped(Vec<String>),
    /// No PCP nonce could be drawn.
    #[error(transparent)]
    Nonce(io::Error),
    /// The mapping was made but could not be recorded.
    #[error(transparent)]
    Record(#[from] RecordError),
}

/// Why [`Record::delete`] deleted nothing.
#[derive(Debug, thiserror::Error)]
pub enum DeleteError {
    /// The record has no such mapping on this gateway.
    #[error(
        "this host has no recorded {protocol} mapping with port {port} on {gateway} (see \
         `natpunch map list`)"
    )]
    NotRecorded {
        /// The protocol asked for.
        protocol: Protocol,
        /// The internal or external port asked for.
        port: u16,
        /// The gateway.
        gateway: std::net::Ipv4Addr,
    },
    /// The gateway did not delete it.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// It was deleted but the record could not be updated.
    #[error(transparent)]
    Record(#[from] RecordError),
}

/// The mappings this host made, as recorded in one file.
#[derive(Debug)]
pub struct Record {
    path: PathBuf,
    mappings: Vec<Mapped>,
}

impl Record {
    /// The record in `path`; empty when the file does not exist yet.
    pub fn load(path: PathBuf) -> Result<Self, RecordError> {
        let mappings = match std::fs::read_to_string(&path) {
            Ok(text) => match serde_json::from_str(&text) {
                Ok(m) => m,
                Err(source) => return Err(RecordError::Parse { path, source }),
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(source) => return Err(RecordError::Read { path, source }),
        };
        Ok(Self { path, mappings })
    }

    /// The file the record lives in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes the record (to a temporary file first, then renamed over the old one).
    pub fn save(&self) -> Result<(), RecordError> {
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(|source| RecordError::CreateDir {
                path: dir.to_owned(),
                source,
            })?;
        }
        let tmp = self.path.with_extension("json.tmp");
        let text = serde_json::to_string_pretty(&self.mappings).map_err(io::Error::other);
        text.and_then(|text| std::fs::write(&tmp, text))
            .map_err(|source| RecordError::Write {
                path: tmp.clone(),
                source,
            })?;
        std::fs::rename(&tmp, &self.path).map_err(|source| RecordError::Write {
            path: self.path.clone(),
            source,
        })
    }

    /// This host's mappings on `gw`.
    pub fn on(&self, gw: Gateway) -> impl Iterator<Item = &Mapped> {
        self.mappings
            .iter()
            .filter(move |m| m.gateway == gw.addr && *m.internal.ip() == gw.local)
    }

    /// This host's mapping of `internal_port` over `protocol` on `gw`, if it has one.
    pub fn find(&self, gw: Gateway, protocol: Protocol, internal_port: u16) -> Option<&Mapped> {
        self.on(gw)
            .find(|m| m.internal.port() == internal_port && m.transport() == protocol)
    }

    /// Replaces the entry of the same mapping (gateway, internal endpoint, protocol).
    pub fn put(&mut self, m: Mapped) {
        self.remove(&m);
        self.mappings.push(m);
    }

    /// Removes the entry of the same mapping as `m`.
    pub fn remove(&mut self, m: &Mapped) {
        self.mappings.retain(|o| !same(o, m));
    }

    /// Follows what a holder reports: made, renewed or re-made mappings are put, released
    /// ones removed, and the record is saved; other updates leave it alone.
    pub fn apply(&mut self, u: &Update) -> Result<(), RecordError> {
        let Some(m) = &u.mapping else { return Ok(()) };
        match u.event {
            Event::Mapped { .. } | Event::Renewed { .. } | Event::Remapped { .. } => {
                self.put(m.clone());
            }
            Event::Released { .. } => self.remove(m),
            _ => return Ok(()),
        }
        self.save()
    }

    /// Maps `request` on `gw` with the first of `methods` that succeeds, and records it.
    ///
    /// A mapping this host already holds for the port is renewed: without an external port
    /// in `request` the one it has is asked for again, and with the same protocol its PCP
    /// nonce is reused.
    pub async fn add(
        &mut self,
        gw: Gateway,
        methods: &[Method],
        mut request: MapRequest,
        wait: Duration,
    ) -> Result<Mapped, AddError> {
        let previous = self
            .find(gw, request.protocol, request.internal_port)
            .cloned();
        request.external_port = request
            .external_port
            .or(previous.as_ref().map(|m| m.external_port));
        let mut errors = Vec::new();
        for &method in methods {
            let nonce = previous
                .as_ref()
                .filter(|m| m.method == method)
                .and_then(Mapped::nonce_bytes);
            let nonce = match nonce {
                Some(n) => n,
                None => client::random_nonce().map_err(AddError::Nonce)?,
            };
            match client::map(gw, method, request, nonce, wait).await {
                Ok(m) => {
                    self.put(m.clone());
                    self.save()?;
                    return Ok(m);
                }
                Err(e) => errors.push(e.to_string()),
            }
        }
        Err(AddError::NoneMapped(errors))
    }

    /// Deletes this host's `protocol` mapping on `gw` whose internal (or else external) port
    /// is `port`, and removes it from the record.
    pub async fn delete(
        &mut self,
        gw: Gateway,
        protocol: Protocol,
        port: u16,
        wait: Duration,
    ) -> Result<Mapped, DeleteError> {
        let ours: Vec<&Mapped> = self.on(gw).filter(|m| m.transport() == protocol).collect();
        let found = ours
            .iter()
            .find(|m| m.internal.port() == port)
            .or_else(|| ours.iter().find(|m| m.external_port == port))
            .map(|m| (*m).clone());
        let Some(m) = found else {
            return Err(DeleteError::NotRecorded {
                protocol,
                port,
                gateway: gw.addr,
            });
        };
        client::delete(gw, &m, wait).await?;
        self.remove(&m);
        self.save()?;
        Ok(m)
    }
}

fn same(a: &Mapped, b: &Mapped) -> bool {
    a.gateway == b.gateway && a.internal == b.internal && a.protocol == b.protocol
}

/// The protocols to map with, best first: `only` when given, else those the gateway offers
/// (PCP, then NAT-PMP, then UPnP), found by asking it. `progress` hears that it is asked, and
/// a warning when its external address is not global (another NAT is in front of it).
pub async fn methods(
    only: Option<Method>,
    gw: Gateway,
    wait: Duration,
    progress: &dyn Fn(&str),
) -> Result<Vec<Method>, ClientError> {
    let methods = match only {
        Some(m) => vec![m],
        None => {
            progress(&format!("asking {} which protocols it speaks", gw.addr));
            let report = client::probe(gw, wait).await;
            if report.behind_another_nat {
                progress(&format!(
                    "warning: the router's external address {} is not global; another NAT is \
                     in front of it",
                    report
                        .external_ip
                        .map(|ip| ip.to_string())
                        .unwrap_or_default()
                ));
            }
            report.methods()
        }
    };
    if methods.is_empty() {
        return Err(ClientError::NoProtocol(gw.addr));
    }
    Ok(methods)
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, SocketAddrV4};

    use super::*;

    fn mapped(port: u16, protocol: &str) -> Mapped {
        Mapped {
            method: Method::Pcp,
            protocol: protocol.to_owned(),
            gateway: Ipv4Addr::new(192, 168, 1, 1),
            internal: SocketAddrV4::new(Ipv4Addr::new(192, 168, 1, 10), port),
            external_ip: Some(Ipv4Addr::new(203, 0, 113, 5)),
            external_port: port + 10000,
            lifetime_secs: 7200,
            epoch: Some(1),
            nonce: Some("00".repeat(12)),
        }
    }

    fn gateway() -> Gateway {
        Gateway {
            addr: Ipv4Addr::new(192, 168, 1, 1),
            local: Ipv4Addr::new(192, 168, 1, 10),
        }
    }

    fn temp_path(name: &str) -> PathBuf {
        std::env::temp_dir()
            .join(format!("portmap-record-{}-{name}", std::process::id()))
            .join("mappings.json")
    }

    #[test]
    fn a_mapping_is_recorded_once_per_endpoint_and_protocol() {
        let mut r = Record::load(temp_path("put")).expect("a missing file is an empty record");
        r.put(mapped(6000, "udp"));
        r.put(mapped(6000, "tcp"));
        let mut renewed = mapped(6000, "udp");
        renewed.external_port = 7;
        r.put(renewed);
        assert_eq!(r.on(gateway()).count(), 2);
        let found = r.find(gateway(), Protocol::Udp, 6000).expect("recorded");
        assert_eq!(found.external_port, 7);
        assert!(r.find(gateway(), Protocol::Udp, 6001).is_none());
        let elsewhere = Gateway {
            addr: Ipv4Addr::new(10, 0, 0, 1),
            local: Ipv4Addr::new(10, 0, 0, 2),
        };
        assert_eq!(r.on(elsewhere).count(), 0);
    }

    #[test]
    fn the_record_survives_a_round_trip_through_its_file() {
        let path = temp_path("save");
        let mut r = Record::load(path.clone()).expect("empty");
        r.put(mapped(6000, "udp"));
        r.save().expect("saved");
        let back = Record::load(path.clone()).expect("read back");
        assert_eq!(
            back.on(gateway()).collect::<Vec<_>>(),
            vec![&mapped(6000, "udp")]
        );
        std::fs::write(&path, "not json").expect("write");
        let e = Record::load(path.clone()).expect_err("not a record");
        assert!(matches!(e, RecordError::Parse { .. }), "{e:?}");
        let _ = std::fs::remove_dir_all(path.parent().expect("dir"));
    }

    #[test]
    fn the_record_follows_a_holders_updates() {
        let path = temp_path("apply");
        let mut r = Record::load(path.clone()).expect("empty");
        let m = mapped(6000, "udp");
        let update = |event| Update {
            event,
            mapping: Some(m.clone()),
        };
        r.apply(&update(Event::Mapped {
            id: 0,
            external_port: m.external_port,
            lifetime_secs: 7200,
        }))
        .expect("saved");
        let on_disk = || {
            Record::load(path.clone())
                .expect("read")
                .on(gateway())
                .count()
        };
        assert_eq!(on_disk(), 1);
        r.apply(&update(Event::CheckFailed {
            error: "no answer".into(),
        }))
        .expect("nothing to save");
        assert_eq!(r.on(gateway()).count(), 1);
        r.apply(&update(Event::Released {
            id: 0,
            external_port: m.external_port,
        }))
        .expect("saved");
        assert_eq!(on_disk(), 0);
        let _ = std::fs::remove_dir_all(path.parent().expect("dir"));
    }
}
