//! Registrations and connection events: the write transactions that record what hosts and
//! peers did, and the peer and address rows they share with reports (stored in `batch`).

use sqlx::Row as _;

use super::{ConnectionEvent, Host, Kind, SqlStore, StoreError, Write, find_or_insert, json};
use crate::report::Addr;

impl SqlStore {
    pub(super) async fn peer(
        &self,
        w: &mut Write,
        peer: &str,
        now: i64,
    ) -> Result<i64, StoreError> {
        if let Some(id) = self.cached(Kind::Peer, peer) {
            return Ok(id);
        }
        let insert = sqlx::query(&self.sql.insert_peer).bind(peer).bind(now);
        let id = find_or_insert(&mut w.tx, &self.sql.find_peer, peer, insert).await?;
        w.learned.push((Kind::Peer, peer.to_owned(), id));
        Ok(id)
    }

    pub(super) async fn update_peer(
        &self,
        w: &mut Write,
        id: i64,
        agent_version: &str,
        protocols: &[String],
        now: i64,
    ) -> Result<(), StoreError> {
        sqlx::query(&self.sql.update_peer)
            .bind(id)
            .bind(agent_version)
            .bind(json(protocols))
            .bind(now)
            .execute(&mut *w.tx)
            .await?;
        Ok(())
    }

    pub(super) async fn maddr(
        &self,
        w: &mut Write,
        addr: &Addr,
        now: i64,
    ) -> Result<i64, StoreError> {
        if let Some(id) = self.cached(Kind::Maddr, &addr.maddr) {
            return Ok(id);
        }
        let insert = sqlx::query(&self.sql.insert_maddr)
            .bind(&addr.maddr)
            .bind(addr.ip.as_deref())
            .bind(addr.transport.as_deref())
            .bind(addr.is_relay)
            .bind(addr.is_public)
            .bind(now);
        let id =
            find_or_insert(&mut w.tx, &self.sql.find_maddr, addr.maddr.as_str(), insert).await?;
        w.learned.push((Kind::Maddr, addr.maddr.clone(), id));
        Ok(id)
    }

    pub(super) async fn maddrs(
        &self,
        w: &mut Write,
        addrs: &[Addr],
        now: i64,
    ) -> Result<Vec<i64>, StoreError> {
        // Sorted, so that concurrent transactions take row locks in the same order.
        let mut sorted: Vec<&Addr> = addrs.iter().collect();
        sorted.sort_by(|a, b| a.maddr.cmp(&b.maddr));
        sorted.dedup_by(|a, b| a.maddr == b.maddr);
        let mut ids = Vec::with_capacity(sorted.len());
        for a in sorted {
            ids.push(self.maddr(w, a, now).await?);
        }
        Ok(ids)
    }

    pub(super) async fn register_tx(
        &self,
        api_key: &str,
        known: Option<i64>,
        host: Host<'_>,
        now: i64,
    ) -> Result<i64, StoreError> {
        let mut w = self.begin().await?;
        let auth: i64 = match known {
            Some(a) => a,
            None => {
                let insert = sqlx::query(&self.sql.insert_authorization)
                    .bind(api_key)
                    .bind(now);
                find_or_insert(&mut w.tx, &self.sql.authorize, api_key, insert).await?
            }
        };
        let peer = self.peer(&mut w, host.peer, now).await?;
        self.update_peer(&mut w, peer, host.agent_version, host.protocols, now)
            .await?;
        sqlx::query(&self.sql.insert_client)
            .bind(peer)
            .bind(auth)
            .bind(now)
            .execute(&mut *w.tx)
            .await?;
        self.commit(w).await?;
        Ok(peer)
    }

    pub(super) async fn record_tx(&self, e: &ConnectionEvent, now: i64) -> Result<i64, StoreError> {
        let mut w = self.begin().await?;
        let local = self.peer(&mut w, &e.local, now).await?;
        let remote = self.peer(&mut w, &e.remote, now).await?;
        if let Some(agent) = &e.agent_version {
            self.update_peer(&mut w, remote, agent, &e.protocols, now)
                .await?;
        }
        let conn = self.maddr(&mut w, &e.conn_addr, now).await?;
        let id: i64 = sqlx::query(&self.sql.insert_connection)
            .bind(local)
            .bind(remote)
            .bind(conn)
            .bind(e.opened_at)
            .bind(now)
            .fetch_one(&mut *w.tx)
            .await?
            .try_get(0)?;
        let advertised: Vec<Addr> = e
            .addrs
            .iter()
            .filter(|a| a.maddr != e.conn_addr.maddr)
            .cloned()
            .collect();
        for m in self.maddrs(&mut w, &advertised, now).await? {
            sqlx::query(&self.sql.link_connection)
                .bind(id)
                .bind(m)
                .execute(&mut *w.tx)
                .await?;
        }
        self.commit(w).await?;
        Ok(id)
    }
}
