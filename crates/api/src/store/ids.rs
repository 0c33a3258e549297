//! Write transactions and what they learn: the ids of committed `peers`, `multi_addresses`
//! and `multi_addresses_sets` rows (and of API keys), cached so that the rows every report
//! shares are not looked up each time.

use std::collections::HashMap;
use std::sync::Arc;

use sqlx::{Any, Row as _, Transaction};

use super::{Backend, SqlStore, StoreError};

/// What an id in the [`IdCache`] names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    /// `peers` by base58 peer ID.
    Peer,
    /// `multi_addresses` by text.
    Maddr,
    /// `multi_addresses_sets` by the sorted ids of its addresses, joined with `:`.
    Set,
    /// `authorizations` by API key.
    Auth,
}

/// Ids of committed rows by key, so that the rows every report shares (the relay, its
/// addresses, the reporting host, its API key) are not looked up each time. Rows are never
/// deleted but by hand, so an id once committed stays right.
#[derive(Debug, Default)]
pub(super) struct IdCache {
    peers: HashMap<String, i64>,
    maddrs: HashMap<String, i64>,
    sets: HashMap<String, i64>,
    auths: HashMap<String, i64>,
}

/// Entries per map; a full map starts over.
const ID_CACHE: usize = 100_000;

impl IdCache {
    fn map(&mut self, kind: Kind) -> &mut HashMap<String, i64> {
        match kind {
            Kind::Peer => &mut self.peers,
            Kind::Maddr => &mut self.maddrs,
            Kind::Set => &mut self.sets,
            Kind::Auth => &mut self.auths,
        }
    }

    fn get(&mut self, kind: Kind, key: &str) -> Option<i64> {
        self.map(kind).get(key).copied()
    }

    fn insert(&mut self, kind: Kind, key: String, id: i64) {
        let map = self.map(kind);
        if map.len() >= ID_CACHE {
            map.clear();
        }
        map.insert(key, id);
    }
}

/// A write transaction with what it learned: ids that are known to exist once it commits (a
/// rolled-back insert must not be remembered).
pub(super) struct Write {
    pub(super) tx: Transaction<'static, Any>,
    pub(super) learned: Vec<(Kind, String, i64)>,
    /// SQLite's writer turn, held until the transaction ends.
    _turn: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl SqlStore {
    /// Starts a write transaction; for SQLite the writer's turn is held until it ends.
    pub(super) async fn begin(&self) -> Result<Write, StoreError> {
        let (tx, turn) = match self.backend {
            Backend::Sqlite => {
                let turn = Arc::clone(&self.writer).lock_owned().await;
                (self.pool.begin_with("BEGIN IMMEDIATE").await?, Some(turn))
            }
            Backend::Postgres => (self.pool.begin().await?, None),
        };
        Ok(Write {
            tx,
            learned: Vec::new(),
            _turn: turn,
        })
    }

    /// Commits `w`; the ids it learned are known to exist from now on.
    pub(super) async fn commit(&self, w: Write) -> Result<(), StoreError> {
        w.tx.commit().await?;
        if let Ok(mut ids) = self.ids.lock() {
            for (kind, key, id) in w.learned {
                ids.insert(kind, key, id);
            }
        }
        Ok(())
    }

    pub(super) fn cached(&self, kind: Kind, key: &str) -> Option<i64> {
        self.ids.lock().ok()?.get(kind, key)
    }

    /// Remembers a committed row's id.
    pub(super) fn remember(&self, kind: Kind, key: &str, id: i64) {
        if let Ok(mut ids) = self.ids.lock() {
            ids.insert(kind, key.to_owned(), id);
        }
    }
}

/// The id of the row `find` selects by `key`, inserted by `insert` (`ON CONFLICT DO NOTHING
/// RETURNING id`) when missing. Neither statement locks an existing row, so transactions that
/// share rows (peers, addresses) do not queue behind each other or deadlock.
pub(super) async fn find_or_insert<'q, K>(
    tx: &mut Transaction<'static, Any>,
    find: &'q str,
    key: K,
    insert: sqlx::query::Query<'q, Any, sqlx::any::AnyArguments<'q>>,
) -> Result<i64, StoreError>
where
    K: 'q + Send + Clone + sqlx::Encode<'q, Any> + sqlx::Type<Any>,
{
    let select = async |tx: &mut Transaction<'static, Any>| -> Result<Option<i64>, StoreError> {
        Ok(sqlx::query(find)
            .bind(key.clone())
            .fetch_optional(&mut **tx)
            .await?
            .map(|row| row.try_get(0))
            .transpose()?)
    };
    if let Some(id) = select(tx).await? {
        return Ok(id);
    }
    if let Some(row) = insert.fetch_optional(&mut **tx).await? {
        return Ok(row.try_get(0)?);
    }
    // Inserted meanwhile by a transaction that has committed since.
    select(tx)
        .await?
        .ok_or_else(|| StoreError::Database(sqlx::Error::RowNotFound))
}
