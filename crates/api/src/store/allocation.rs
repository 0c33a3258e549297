//! Allocation: which remote a host hole-punches next, under the [`Rules`] (punchr's by default):
//! seen by the honeypot recently, served at most so often per window, and no peer and address
//! twice to one client within the dedup window.

use std::collections::BTreeSet;

use sqlx::Row as _;
use sqlx::any::AnyRow;

use super::{Allocation, Backend, Rules, SqlStore, StoreError, json, nanos};

impl SqlStore {
    pub(super) async fn candidates(
        &self,
        conn: &mut sqlx::AnyConnection,
        hosts: &[i64],
        only: Option<i64>,
        rules: Rules,
        now: i64,
    ) -> Result<Vec<AnyRow>, StoreError> {
        Ok(sqlx::query(&self.sql.candidates)
            .bind(now - nanos(rules.recency))
            .bind(json(hosts))
            .bind(now - nanos(rules.per_remote_window))
            .bind(i64::from(rules.per_remote))
            .bind(only)
            .bind(now - nanos(rules.dedup_window))
            .fetch_all(conn)
            .await?)
    }

    /// Allocates `remote` to `local` if it is still eligible, checked again under the remote's
    /// lock (another request may have taken it since the candidates were listed).
    #[allow(clippy::too_many_arguments, reason = "one transaction's inputs")]
    pub(super) async fn allocate_tx(
        &self,
        auth: i64,
        local: i64,
        remote: i64,
        host_ids: &[i64],
        rules: Rules,
        now: i64,
    ) -> Result<Option<Allocation>, StoreError> {
        let mut w = self.begin().await?;
        if self.backend == Backend::Postgres {
            sqlx::query(&self.sql.lock_peer)
                .bind(remote)
                .fetch_optional(&mut *w.tx)
                .await?;
        }
        let rows = self
            .candidates(&mut w.tx, host_ids, Some(remote), rules, now)
            .await?;
        if rows.is_empty() {
            w.tx.rollback().await?;
            return Ok(None);
        }
        let mut name = String::new();
        let mut addrs = BTreeSet::new();
        for row in &rows {
            name = row.try_get(1)?;
            addrs.insert((row.try_get::<String, _>(3)?, row.try_get::<i64, _>(2)?));
        }
        let allocation: i64 = sqlx::query(&self.sql.insert_allocation)
            .bind(local)
            .bind(remote)
            .bind(auth)
            .bind(now)
            .fetch_one(&mut *w.tx)
            .await?
            .try_get(0)?;
        for (_, maddr) in &addrs {
            sqlx::query(&self.sql.link_allocation)
                .bind(allocation)
                .bind(*maddr)
                .execute(&mut *w.tx)
                .await?;
        }
        self.commit(w).await?;
        Ok(Some(Allocation {
            remote: name,
            addrs: addrs.into_iter().map(|(m, _)| m).collect(),
        }))
    }
}
