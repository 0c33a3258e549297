//! Group commit: reports that arrive together are stored in one transaction, with one statement
//! per table for all of them, and each is acknowledged only once that transaction has committed.
//!
//! [`SqlStore::track`](super::Store::track) hands its report to the store's workers through a
//! bounded queue (a full queue makes callers wait) and waits for the answer. A worker takes
//! every report waiting, up to [`MAX_BATCH`], and stores them with [`SqlStore::store_batch`]:
//! the reporting clients are looked up once for the batch, the ids of the new results and
//! attempts are taken beforehand (so that child rows can name them), and each table gets one
//! `INSERT … SELECT … FROM {recordset}` over a JSON array of its rows. The results go first,
//! with `ON CONFLICT (idempotency_key) DO NOTHING`: a report whose key is stored already (or is
//! being stored by a concurrent transaction, which the insert waits for) is left out with its
//! rows and answered as a duplicate, with no lookup of the keys beforehand. A batch that fails
//! is stored again report by report, so that a bad report costs only itself.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use serde_json::{Value, json};
use sha2::Digest as _;
use sqlx::Row as _;
use tokio::sync::{Mutex, mpsc, oneshot};

use super::{Backend, Kind, SqlStore, StoreError, Tracked, Write, find_or_insert};
use crate::report::{self, Report};
use crate::vantage::{self, Observation};

/// How far back what the vantage points saw of a remote counts for its NAT.
const OBSERVED_WITHIN_NS: i64 = 3600 * 1_000_000_000;

/// Observations read per remote, at most (the newest).
const OBSERVATIONS_PER_REMOTE: usize = 64;

/// Reports waiting for a worker.
const QUEUE: usize = 1024;

/// Most reports stored in one transaction.
pub(super) const MAX_BATCH: usize = 128;

/// A report waiting to be stored, and who waits for the answer.
pub(super) struct Job {
    auth: i64,
    report: Report,
    now: i64,
    reply: oneshot::Sender<Result<Tracked, StoreError>>,
}

/// Where reports are handed to the workers.
pub(super) type Queue = mpsc::Sender<Job>;

/// Starts `workers` tasks storing what `store` is handed; they end when every [`Queue`] is
/// dropped. `store` itself must have no queue (its reports are stored where they are asked).
pub(super) fn spawn(store: &SqlStore, workers: usize) -> Queue {
    let (queue, jobs) = mpsc::channel(QUEUE);
    let jobs = Arc::new(Mutex::new(jobs));
    for _ in 0..workers {
        let (store, jobs) = (store.clone(), Arc::clone(&jobs));
        tokio::spawn(async move {
            let mut batch = Vec::with_capacity(MAX_BATCH);
            // While one worker stores a batch, the next one collects what arrives meanwhile.
            while jobs.lock().await.recv_many(&mut batch, MAX_BATCH).await > 0 {
                store.run(&mut batch).await;
            }
        });
    }
    queue
}

/// Hands `report` to the workers behind `queue` and waits until it is stored; `Err` gives the
/// report back when the workers have ended (their runtime shut down).
pub(super) async fn hand(
    queue: &Queue,
    auth: i64,
    report: &Report,
    now: i64,
) -> Result<Result<Tracked, StoreError>, ()> {
    let (reply, answer) = oneshot::channel();
    let job = Job {
        auth,
        report: report.clone(),
        now,
        reply,
    };
    queue.send(job).await.map_err(|_| ())?;
    // A worker that ended without answering may have been cut off in its commit: the report is
    // not stored here again, and the caller hears an error (and sends it again with its key).
    Ok(answer
        .await
        .unwrap_or(Err(StoreError::Database(sqlx::Error::WorkerCrashed))))
}

/// A report of a batch and what becomes of it.
enum Plan<'a> {
    /// Answered without storing anything.
    Answer(Tracked),
    /// Stored under the reporting client's peer id, as the `n`th result of the batch.
    Store {
        local: i64,
        report: Box<Cow<'a, Report>>,
        n: usize,
    },
    /// The same idempotency key as the `n`th result of the batch.
    SameAs(usize),
}

/// The rows of one batch, by table, as JSON arrays for `{recordset}`.
#[derive(Default)]
struct Rows {
    attempts: Vec<Value>,
    attempt_addrs: Vec<Value>,
    result_addrs: Vec<Value>,
    mappings: Vec<Value>,
    networks: Vec<Value>,
    latencies: Vec<Value>,
    /// The latest agent, protocols and time seen for each peer, by id (sorted, so that
    /// concurrent transactions lock peers in the same order).
    peers: BTreeMap<i64, (String, String, i64)>,
}

impl SqlStore {
    /// Stores the reports of `batch` (emptied), answering each.
    async fn run(&self, batch: &mut Vec<Job>) {
        if let [job] = batch.as_slice() {
            let answer = self.track_one(job.auth, &job.report, job.now).await;
            if let Some(job) = batch.pop() {
                let _ = job.reply.send(answer);
            }
            return;
        }
        let items: Vec<(i64, &Report, i64)> =
            batch.iter().map(|j| (j.auth, &j.report, j.now)).collect();
        match retrying!(self.store_batch(&items)) {
            Ok(answers) => {
                for (job, answer) in batch.drain(..).zip(answers) {
                    let _ = job.reply.send(Ok(answer));
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, reports = batch.len(), "a batch failed, stored again report by report");
                for job in batch.drain(..) {
                    let answer = self.track_one(job.auth, &job.report, job.now).await;
                    let _ = job.reply.send(answer);
                }
            }
        }
    }

    /// Stores one report in its own transaction.
    pub(super) async fn track_one(
        &self,
        auth: i64,
        report: &Report,
        now: i64,
    ) -> Result<Tracked, StoreError> {
        retrying!(self.store_batch(&[(auth, report, now)]))?
            .into_iter()
            .next()
            .ok_or(StoreError::Database(sqlx::Error::RowNotFound))
    }

    /// Stores `items` (authorization, report, time) in one transaction; the answers are in
    /// their order.
    pub(super) async fn store_batch(
        &self,
        items: &[(i64, &Report, i64)],
    ) -> Result<Vec<Tracked>, StoreError> {
        let mut w = self.begin().await?;
        let plans = self.plan(&mut w, items).await?;
        let stored: Vec<(&Report, i64, i64, i64)> = plans
            .iter()
            .zip(items)
            .filter_map(|(p, &(auth, _, now))| match p {
                Plan::Store { local, report, .. } => {
                    Some((report.as_ref().as_ref(), auth, *local, now))
                }
                _ => None,
            })
            .collect();
        if stored.is_empty() {
            w.tx.rollback().await?;
            return Ok(plans.iter().map(|p| answer(p, &[])).collect());
        }
        let attempts = stored.iter().map(|(r, ..)| r.attempts.len()).sum();
        let (ids, attempt_ids) = self.take_ids(&mut w, stored.len(), attempts).await?;
        let remote_nats = self.remote_nats(&mut w, &stored).await?;
        let mut results = Vec::with_capacity(stored.len());
        let mut rows = Rows::default();
        let mut next_attempt = attempt_ids.iter().copied();
        for (&(report, auth, local, now), &id) in stored.iter().zip(&ids) {
            results.push(
                self.result_row(&mut w, (id, auth, local, now), report, &remote_nats)
                    .await?,
            );
            self.rows_of(
                &mut w,
                &mut rows,
                (id, local, now),
                report,
                &mut next_attempt,
            )
            .await?;
        }
        let inserted = self.insert(&mut w, &results, &rows).await?;
        // Each result as it is answered: its id, or the id stored before under its key.
        let mut outcome: Vec<Tracked> = Vec::with_capacity(stored.len());
        for (&(report, ..), &id) in stored.iter().zip(&ids) {
            if inserted.contains(&id) {
                outcome.push(Tracked::Stored(id));
            } else {
                let key = report.idempotency_key.as_deref().unwrap_or_default();
                let first: i64 = sqlx::query(&self.sql.find_key)
                    .bind(key)
                    .fetch_one(&mut *w.tx)
                    .await?
                    .try_get(0)?;
                outcome.push(Tracked::Duplicate(first));
            }
        }
        self.commit(w).await?;
        Ok(plans.iter().map(|p| answer(p, &outcome)).collect())
    }

    /// What becomes of each report: the reporting clients are looked up once for the batch,
    /// and a key that comes twice is stored once.
    async fn plan<'a>(
        &self,
        w: &mut Write,
        items: &[(i64, &'a Report, i64)],
    ) -> Result<Vec<Plan<'a>>, StoreError> {
        let hashes: Vec<&str> = items.iter().map(|(_, r, _)| r.client.as_str()).collect();
        let mut clients: HashMap<(String, i64), (i64, Option<String>)> = HashMap::new();
        for row in sqlx::query(&self.sql.client_peers)
            .bind(super::json(&hashes))
            .fetch_all(&mut *w.tx)
            .await?
        {
            clients.insert(
                (row.try_get(0)?, row.try_get(1)?),
                (row.try_get(2)?, row.try_get(3)?),
            );
        }
        let mut in_batch: HashMap<&str, usize> = HashMap::new();
        let mut n = 0;
        let mut plans = Vec::with_capacity(items.len());
        for &(auth, report, _) in items {
            let key = report.idempotency_key.as_deref();
            let plan = match clients.get(&(report.client.clone(), auth)) {
                None => Plan::Answer(Tracked::NotRegistered),
                Some(_) if key.is_some_and(|k| in_batch.contains_key(k)) => Plan::SameAs(
                    key.and_then(|k| in_batch.get(k))
                        .copied()
                        .unwrap_or_default(),
                ),
                Some((local, agent)) => {
                    if let Some(k) = key {
                        in_batch.insert(k, n);
                    }
                    let report = match agent.as_deref().and_then(report::normalised_for) {
                        Some(fix) => Box::new(Cow::Owned(fix(report.clone()))),
                        None => Box::new(Cow::Borrowed(report)),
                    };
                    n += 1;
                    Plan::Store {
                        local: *local,
                        report,
                        n: n - 1,
                    }
                }
            };
            plans.push(plan);
        }
        Ok(plans)
    }

    /// Ids for `results` new `hole_punch_results` rows and `attempts` new `hole_punch_attempt`
    /// rows.
    async fn take_ids(
        &self,
        w: &mut Write,
        results: usize,
        attempts: usize,
    ) -> Result<(Vec<i64>, Vec<i64>), StoreError> {
        let count = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        match self.backend {
            // The writer holds the whole database until it commits: nobody else takes ids.
            Backend::Sqlite => {
                let row = sqlx::query(&self.sql.last_ids)
                    .fetch_one(&mut *w.tx)
                    .await?;
                let (last_result, last_attempt): (i64, i64) = (row.try_get(0)?, row.try_get(1)?);
                let after = |last: i64, n| (1..=count(n)).map(|k| last + k).collect();
                Ok((after(last_result, results), after(last_attempt, attempts)))
            }
            Backend::Postgres => {
                let (mut r, mut a) = (Vec::with_capacity(results), Vec::with_capacity(attempts));
                for row in sqlx::query(&self.sql.next_ids)
                    .bind(count(results))
                    .bind(count(attempts))
                    .fetch_all(&mut *w.tx)
                    .await?
                {
                    let (table, id): (i32, i64) = (row.try_get(0)?, row.try_get(1)?);
                    if table == 0 { r.push(id) } else { a.push(id) }
                }
                Ok((r, a))
            }
        }
    }

    /// The remote's NAT, for each remote of `stored` whose report does not say it, from what
    /// the vantage points (relay, honeypot) saw of it in the [`OBSERVED_WITHIN_NS`] before the
    /// report: one query for the batch.
    async fn remote_nats(
        &self,
        w: &mut Write,
        stored: &[(&Report, i64, i64, i64)],
    ) -> Result<HashMap<i64, &'static str>, StoreError> {
        let mut remotes = Vec::new();
        let mut since = i64::MAX;
        for &(report, _, _, now) in stored.iter().filter(|(r, ..)| r.remote_nat.is_none()) {
            remotes.push(self.peer(w, &report.remote, now).await?);
            since = since.min(now.saturating_sub(OBSERVED_WITHIN_NS));
        }
        remotes.sort_unstable();
        remotes.dedup();
        if remotes.is_empty() {
            return Ok(HashMap::new());
        }
        let limit = i64::try_from(remotes.len() * OBSERVATIONS_PER_REMOTE).unwrap_or(i64::MAX);
        let mut seen: HashMap<i64, Vec<Observation>> = HashMap::new();
        for row in sqlx::query(&self.sql.observations)
            .bind(super::json(&remotes))
            .bind(since)
            .bind(limit)
            .fetch_all(&mut *w.tx)
            .await?
        {
            seen.entry(row.try_get(0)?).or_default().push(Observation {
                observer: row.try_get(1)?,
                addr: row.try_get(2)?,
                at: row.try_get(3)?,
            });
        }
        Ok(remotes
            .into_iter()
            .map(|r| {
                (
                    r,
                    vantage::remote_nat(seen.get(&r).map_or(&[], Vec::as_slice)),
                )
            })
            .collect())
    }

    /// The `hole_punch_results` row of one report, to be stored as `id`.
    async fn result_row(
        &self,
        w: &mut Write,
        (id, auth, local, now): (i64, i64, i64, i64),
        r: &Report,
        remote_nats: &HashMap<i64, &'static str>,
    ) -> Result<Value, StoreError> {
        let remote = self.peer(w, &r.remote, now).await?;
        let set_id = self.listen_set(w, r, now).await?;
        // What the client said of the remote's NAT, else what the vantage points saw.
        let remote_nat = r
            .remote_nat
            .as_deref()
            .or_else(|| remote_nats.get(&remote).copied());
        Ok(json!({
            "id": id, "local_id": local, "remote_id": remote, "auth": auth,
            "connect_started_at": r.connect_started_at, "connect_ended_at": r.connect_ended_at,
            "has_direct_conns": r.has_direct_conns, "error": r.error, "outcome": r.outcome,
            "ended_at": r.ended_at, "protocol_filters": super::json(&r.protocols),
            "set_id": set_id, "idempotency_key": r.idempotency_key, "technique": r.technique,
            "time_to_direct": r.time_to_direct, "client_nat": r.client_nat,
            "remote_nat": remote_nat, "transport": r.transport, "now": now,
        }))
    }

    /// The other rows of one report, stored as result `id`; `attempt_ids` gives its attempts'
    /// ids.
    async fn rows_of(
        &self,
        w: &mut Write,
        rows: &mut Rows,
        (id, local, now): (i64, i64, i64),
        r: &Report,
        attempt_ids: &mut impl Iterator<Item = i64>,
    ) -> Result<(), StoreError> {
        for m in &r.mappings {
            rows.mappings.push(json!({
                "result_id": id, "internal_port": m.internal_port,
                "external_port": m.external_port, "protocol": m.protocol, "addr": m.addr,
                "addr_network": m.addr_network,
            }));
        }
        for a in &r.attempts {
            let attempt = attempt_ids
                .next()
                .ok_or(StoreError::Database(sqlx::Error::RowNotFound))?;
            rows.attempts.push(json!({
                "id": attempt, "result_id": id, "opened_at": a.opened_at,
                "started_at": a.started_at, "ended_at": a.ended_at, "start_rtt": a.start_rtt,
                "elapsed_time": a.elapsed_time, "outcome": a.outcome, "error": a.error,
                "direct_dial_error": a.direct_dial_error, "now": now,
            }));
            for m in self.maddrs(w, &a.addrs, now).await? {
                rows.attempt_addrs
                    .push(json!({ "result_id": id, "attempt": attempt, "maddr": m }));
            }
        }
        for (addrs, relationship) in [(&r.open_addrs, "FINAL"), (&r.remote_addrs, "INITIAL")] {
            for m in self.maddrs(w, addrs, now).await? {
                rows.result_addrs
                    .push(json!({ "result_id": id, "maddr": m, "relationship": relationship }));
            }
        }
        if let Some(n) = &r.network {
            rows.networks.push(json!({
                "peer_id": local, "result_id": id, "supports_ipv6": n.supports_ipv6,
                "supports_ipv6_error": n.supports_ipv6_error, "router_html": n.router_html,
                "router_html_error": n.router_html_error, "now": now,
            }));
        }
        for l in &r.latencies {
            let maddr = self.maddr(w, &l.addr, now).await?;
            let peer = self.peer(w, &l.remote, now).await?;
            if !l.agent_version.is_empty() || !l.protocols.is_empty() {
                rows.peers.insert(
                    peer,
                    (l.agent_version.clone(), super::json(&l.protocols), now),
                );
            }
            rows.latencies.push(json!({
                "remote_id": peer, "result_id": id, "maddr": maddr, "mtype": l.mtype,
                "rtts": super::json(&l.rtts), "rtt_errs": super::json(&l.rtt_errs),
                "avg": l.avg, "max": l.max, "min": l.min, "std": l.std, "now": now,
            }));
        }
        Ok(())
    }

    /// The id of the set of `r`'s listen addresses.
    async fn listen_set(&self, w: &mut Write, r: &Report, now: i64) -> Result<i64, StoreError> {
        let mut ids = self.maddrs(w, &r.listen_addrs, now).await?;
        ids.sort_unstable();
        ids.dedup();
        let key = ids.iter().map(i64::to_string).collect::<Vec<_>>().join(":");
        if let Some(id) = self.cached(Kind::Set, &key) {
            return Ok(id);
        }
        let digest = sha2::Sha256::digest(key.as_bytes()).to_vec();
        let insert = sqlx::query(&self.sql.insert_set)
            .bind(digest.clone())
            .bind(super::json(&ids));
        let id = find_or_insert(&mut w.tx, &self.sql.find_set, digest, insert).await?;
        w.learned.push((Kind::Set, key, id));
        Ok(id)
    }

    /// Inserts the batch's `results` and, for those inserted (whose keys were not stored
    /// before), their other `rows`; returns the ids inserted. PostgreSQL does it in one
    /// statement; SQLite, which has no `INSERT` in `WITH`, in one per table.
    async fn insert(
        &self,
        w: &mut Write,
        results: &[Value],
        rows: &Rows,
    ) -> Result<HashSet<i64>, StoreError> {
        let peers: Vec<Value> = rows
            .peers
            .iter()
            .map(|(id, (agent, protocols, now))| {
                json!({ "id": id, "agent_version": agent, "protocols": protocols, "now": now })
            })
            .collect();
        let children = [
            &peers,
            &rows.attempts,
            &rows.attempt_addrs,
            &rows.result_addrs,
            &rows.mappings,
            &rows.networks,
            &rows.latencies,
        ];
        let ids = |found: Vec<sqlx::any::AnyRow>| -> Result<HashSet<i64>, StoreError> {
            Ok(found
                .iter()
                .map(|row| row.try_get(0))
                .collect::<Result<_, _>>()?)
        };
        let sql = &self.batch_sql;
        if let Some(all) = &sql.all {
            let mut q = sqlx::query(all).bind(super::json(results));
            for rows in children {
                q = q.bind(super::json(rows));
            }
            return ids(q.fetch_all(&mut *w.tx).await?);
        }
        let inserted = ids(sqlx::query(&self.sql.insert_results)
            .bind(super::json(results))
            .fetch_all(&mut *w.tx)
            .await?)?;
        let inserted_json = super::json(&inserted.iter().collect::<Vec<_>>());
        for (statement, rows) in sql.children.iter().zip(children) {
            if !rows.is_empty() {
                sqlx::query(statement)
                    .bind(super::json(rows))
                    .bind(&inserted_json)
                    .execute(&mut *w.tx)
                    .await?;
            }
        }
        Ok(inserted)
    }
}

/// A batch's statements after the results' insert, each keeping the rows of the results
/// inserted (`r`), composed for the backend.
#[derive(Debug)]
pub(super) struct BatchSql {
    /// PostgreSQL: the results' insert and every other table's in one statement (`WITH r AS
    /// (INSERT … RETURNING id), … SELECT id FROM r`), the rows bound in [`Rows`]' order.
    all: Option<String>,
    /// SQLite: each other table's statement, with `r` the ids given as `$2`.
    children: Vec<String>,
}

impl BatchSql {
    /// Composes `sql`'s batch statements.
    pub(super) fn new(sql: &super::Statements, backend: Backend) -> Self {
        let pieces = [
            &sql.update_peers,
            &sql.insert_attempts,
            &sql.link_attempts,
            &sql.link_results,
            &sql.insert_mappings,
            &sql.insert_networks,
            &sql.insert_latencies,
        ];
        match backend {
            Backend::Postgres => {
                let mut all = format!("WITH r AS ({})", sql.insert_results);
                for (k, piece) in pieces.iter().enumerate() {
                    let piece = piece.replace("$1", &format!("${}", k + 2));
                    all.push_str(&format!(", c{k} AS ({piece})"));
                }
                all.push_str(" SELECT id FROM r");
                Self {
                    all: Some(all),
                    children: Vec::new(),
                }
            }
            Backend::Sqlite => Self {
                all: None,
                children: pieces
                    .iter()
                    .map(|p| format!("WITH r(id) AS (SELECT value FROM json_each($2)) {p}"))
                    .collect(),
            },
        }
    }
}

/// The answer for `plan`, the batch's results having been answered `outcome`.
fn answer(plan: &Plan<'_>, outcome: &[Tracked]) -> Tracked {
    let of = |n: &usize| outcome.get(*n).copied();
    match plan {
        Plan::Answer(a) => *a,
        Plan::Store { n, .. } => of(n).unwrap_or(Tracked::NotRegistered),
        Plan::SameAs(n) => match of(n) {
            Some(Tracked::Stored(id) | Tracked::Duplicate(id)) => Tracked::Duplicate(id),
            _ => Tracked::NotRegistered,
        },
    }
}
