//! Registrations, connection events and hole-punch reports: the write transactions that
//! record what hosts and peers did.

use std::collections::BTreeSet;

use sha2::Digest as _;
use sqlx::Row as _;

use super::{
    ConnectionEvent, Host, Kind, SqlStore, StoreError, Tracked, Write, find_or_insert, json,
};
use crate::report::{self, Addr, Report};

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

    pub(super) async fn store_report(
        &self,
        w: &mut Write,
        auth: i64,
        local: i64,
        r: &Report,
        now: i64,
    ) -> Result<i64, StoreError> {
        let remote = self.peer(w, &r.remote, now).await?;
        let listen = self.maddrs(w, &r.listen_addrs, now).await?;
        let set: BTreeSet<i64> = listen.iter().copied().collect();
        let ids: Vec<i64> = set.into_iter().collect();
        let key = ids.iter().map(i64::to_string).collect::<Vec<_>>().join(":");
        let digest = sha2::Sha256::digest(key.as_bytes()).to_vec();
        let insert = sqlx::query(&self.sql.insert_set)
            .bind(digest.clone())
            .bind(json(&ids));
        let set_id = find_or_insert(&mut w.tx, &self.sql.find_set, digest, insert).await?;
        let id: i64 = sqlx::query(&self.sql.insert_result)
            .bind(local)
            .bind(remote)
            .bind(auth)
            .bind(r.connect_started_at)
            .bind(r.connect_ended_at)
            .bind(r.has_direct_conns)
            .bind(r.error.as_deref())
            .bind(r.outcome)
            .bind(r.ended_at)
            .bind(json(&r.protocols))
            .bind(set_id)
            .bind(r.idempotency_key.as_deref())
            .bind(r.technique.as_deref())
            .bind(r.time_to_direct)
            .bind(r.client_nat.as_deref())
            .bind(r.remote_nat.as_deref())
            .bind(r.transport.as_deref())
            .bind(now)
            .fetch_one(&mut *w.tx)
            .await?
            .try_get(0)?;
        for m in &r.mappings {
            sqlx::query(&self.sql.insert_mapping)
                .bind(id)
                .bind(m.internal_port)
                .bind(m.external_port)
                .bind(&m.protocol)
                .bind(&m.addr)
                .bind(&m.addr_network)
                .execute(&mut *w.tx)
                .await?;
        }
        for a in &r.attempts {
            let attempt: i64 = sqlx::query(&self.sql.insert_attempt)
                .bind(id)
                .bind(a.opened_at)
                .bind(a.started_at)
                .bind(a.ended_at)
                .bind(a.start_rtt)
                .bind(a.elapsed_time)
                .bind(a.outcome)
                .bind(a.error.as_deref())
                .bind(a.direct_dial_error.as_deref())
                .bind(now)
                .fetch_one(&mut *w.tx)
                .await?
                .try_get(0)?;
            for m in self.maddrs(w, &a.addrs, now).await? {
                sqlx::query(&self.sql.link_attempt)
                    .bind(attempt)
                    .bind(m)
                    .execute(&mut *w.tx)
                    .await?;
            }
        }
        for (addrs, relationship) in [(&r.open_addrs, "FINAL"), (&r.remote_addrs, "INITIAL")] {
            for m in self.maddrs(w, addrs, now).await? {
                sqlx::query(&self.sql.link_result)
                    .bind(id)
                    .bind(m)
                    .bind(relationship)
                    .execute(&mut *w.tx)
                    .await?;
            }
        }
        if let Some(n) = &r.network {
            sqlx::query(&self.sql.insert_network)
                .bind(local)
                .bind(id)
                .bind(n.supports_ipv6)
                .bind(n.supports_ipv6_error.as_deref())
                .bind(n.router_html.as_deref())
                .bind(n.router_html_error.as_deref())
                .bind(now)
                .execute(&mut *w.tx)
                .await?;
        }
        for l in &r.latencies {
            let maddr = self.maddr(w, &l.addr, now).await?;
            let peer = self.peer(w, &l.remote, now).await?;
            if !l.agent_version.is_empty() || !l.protocols.is_empty() {
                self.update_peer(w, peer, &l.agent_version, &l.protocols, now)
                    .await?;
            }
            sqlx::query(&self.sql.insert_latency)
                .bind(peer)
                .bind(id)
                .bind(maddr)
                .bind(l.mtype)
                .bind(json(&l.rtts))
                .bind(json(&l.rtt_errs))
                .bind(l.avg)
                .bind(l.max)
                .bind(l.min)
                .bind(l.std)
                .bind(now)
                .execute(&mut *w.tx)
                .await?;
        }
        Ok(id)
    }

    pub(super) async fn find_key(&self, key: &str) -> Result<Option<i64>, StoreError> {
        Ok(sqlx::query(&self.sql.find_key)
            .bind(key)
            .fetch_optional(&self.pool)
            .await?
            .map(|row| row.try_get(0))
            .transpose()?)
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

    pub(super) async fn track_tx(
        &self,
        auth: i64,
        report: &Report,
        now: i64,
    ) -> Result<Tracked, StoreError> {
        let mut w = self.begin().await?;
        let Some(local) = sqlx::query(&self.sql.client_peer)
            .bind(&report.client)
            .bind(auth)
            .fetch_optional(&mut *w.tx)
            .await?
        else {
            w.tx.rollback().await?;
            return Ok(Tracked::NotRegistered);
        };
        let agent: Option<String> = local.try_get(1)?;
        let local: i64 = local.try_get(0)?;
        let id = match agent.as_deref().and_then(report::normalised_for) {
            Some(fix) => {
                let fixed = fix(report.clone());
                self.store_report(&mut w, auth, local, &fixed, now).await?
            }
            None => self.store_report(&mut w, auth, local, report, now).await?,
        };
        self.commit(w).await?;
        Ok(Tracked::Stored(id))
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
