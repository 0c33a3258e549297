//! The client's spool: every report is written to disk before it is sent, and removed only once
//! the server has acknowledged it. A server outage or a restart of the client therefore loses
//! nothing; the idempotency key each report carries makes a resend after a lost acknowledgement
//! harmless.
//!
//! A report is one file, `KEY.pb` (the protobuf encoding), written to a temporary name, synced
//! and renamed, so a crash leaves either the whole file or none. A report the server refuses as
//! invalid is moved to `rejected/` with the reason next to it, never sent again.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use prost::Message as _;

use api::pb;

/// A directory of reports waiting to be sent.
#[derive(Debug, Clone)]
pub struct Spool {
    dir: PathBuf,
}

/// A spooled report.
#[derive(Debug, Clone)]
pub struct Spooled {
    /// Its file.
    pub path: PathBuf,
    /// Its idempotency key.
    pub key: String,
    /// The report.
    pub report: pb::TrackHolePunchRequest,
}

/// Whether `key` can name a file: letters, digits, `-`, `_` and `.` only, not starting with `.`.
fn safe(key: &str) -> bool {
    !key.is_empty()
        && !key.starts_with('.')
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

impl Spool {
    /// Opens (creating) the spool at `dir`.
    pub fn open(dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir.join("rejected"))?;
        Ok(Self {
            dir: dir.to_owned(),
        })
    }

    /// The spool's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Writes `report` durably; it must carry an idempotency key that can name a file.
    pub fn put(&self, report: &pb::TrackHolePunchRequest) -> std::io::Result<PathBuf> {
        let key = report.idempotency_key.as_deref().unwrap_or_default();
        if !safe(key) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("idempotency key {key:?} cannot name a spool file"),
            ));
        }
        let path = self.dir.join(format!("{key}.pb"));
        let tmp = self.dir.join(format!(".{key}.tmp"));
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&report.encode_to_vec())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        // The rename itself is durable once the directory is synced.
        std::fs::File::open(&self.dir)?.sync_all()?;
        Ok(path)
    }

    /// The reports waiting, oldest first. A file that does not decode is moved to `rejected/`.
    pub fn pending(&self) -> std::io::Result<Vec<Spooled>> {
        let mut files: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(&self.dir)?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "pb"))
            .filter_map(|p| Some((std::fs::metadata(&p).ok()?.modified().ok()?, p)))
            .collect();
        files.sort();
        let mut out = Vec::with_capacity(files.len());
        for (_, path) in files {
            let bytes = std::fs::read(&path)?;
            match pb::TrackHolePunchRequest::decode(bytes.as_slice()) {
                Ok(report) => out.push(Spooled {
                    key: report.idempotency_key.clone().unwrap_or_default(),
                    path,
                    report,
                }),
                Err(e) => self.reject(&path, &format!("does not decode: {e}"))?,
            }
        }
        Ok(out)
    }

    /// How many reports wait.
    pub fn len(&self) -> usize {
        std::fs::read_dir(&self.dir).map_or(0, |d| {
            d.filter_map(Result::ok)
                .filter(|e| e.path().extension().is_some_and(|x| x == "pb"))
                .count()
        })
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The report at `path` was acknowledged.
    pub fn done(&self, path: &Path) -> std::io::Result<()> {
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// The report at `path` was refused for good: kept in `rejected/` with `why`.
    pub fn reject(&self, path: &Path, why: &str) -> std::io::Result<()> {
        let name = path.file_name().unwrap_or_default();
        let to = self.dir.join("rejected").join(name);
        std::fs::rename(path, &to)?;
        std::fs::write(to.with_extension("why"), why)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_survive_in_order_and_leave_when_acknowledged_or_rejected() {
        let dir = std::env::temp_dir().join(format!("natpunch-spool-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let spool = Spool::open(&dir).expect("spool");
        let report = |key: &str| pb::TrackHolePunchRequest {
            idempotency_key: Some(key.into()),
            api_key: "k".into(),
            ..Default::default()
        };
        spool.put(&report("a-1")).expect("put");
        std::thread::sleep(std::time::Duration::from_millis(20));
        spool.put(&report("a-2")).expect("put");
        assert!(
            spool.put(&report("../escape")).is_err(),
            "keys cannot leave the spool"
        );
        assert!(spool.put(&report("")).is_err());
        std::fs::write(dir.join("garbage.pb"), [0xff, 0xff]).expect("garbage");
        // A reopened spool (a restarted client) finds them, oldest first.
        let spool = Spool::open(&dir).expect("reopen");
        let pending = spool.pending().expect("pending");
        let keys: Vec<&str> = pending.iter().map(|s| s.key.as_str()).collect();
        assert_eq!(keys, ["a-1", "a-2"]);
        assert!(
            dir.join("rejected/garbage.pb").exists(),
            "undecodable files are set aside"
        );
        spool.done(&pending[0].path).expect("done");
        spool
            .reject(&pending[1].path, "InvalidArgument: ended_at: missing")
            .expect("reject");
        assert!(spool.is_empty());
        let why = std::fs::read_to_string(dir.join("rejected/a-2.why")).expect("why");
        assert!(why.contains("ended_at"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
