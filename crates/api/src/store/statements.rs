//! Every statement the store runs, in the dialect-neutral form [`render`] turns into SQLite's
//! or PostgreSQL's.

use super::{Backend, render};

macro_rules! statements {
    ($($(#[$doc:meta])* $name:ident = $sql:expr;)*) => {
        /// The statements, rendered for one backend.
        #[derive(Debug)]
        pub(super) struct Statements {
            $($(#[$doc])* pub(super) $name: String,)*
        }

        impl Statements {
            pub(super) fn new(backend: Backend) -> Self {
                Self { $($name: render($sql, backend),)* }
            }

            #[cfg(test)]
            pub(super) fn all(&self) -> Vec<&str> {
                vec![$(self.$name.as_str(),)*]
            }
        }
    };
}

statements! {
    authorize = "SELECT id FROM authorizations WHERE api_key = $1";
    insert_authorization = "INSERT INTO authorizations (api_key, username, created_at) \
        VALUES ($1, 'anonymous', {ts $2}) ON CONFLICT (api_key) DO NOTHING RETURNING id";
    find_peer = "SELECT id FROM peers WHERE multi_hash = $1";
    agent_of = "SELECT agent_version FROM peers WHERE multi_hash = $1";
    insert_peer = "INSERT INTO peers (multi_hash, updated_at, created_at) \
        VALUES ($1, {ts $2}, {ts $2}) ON CONFLICT (multi_hash) DO NOTHING RETURNING id";
    /// Only when something changed: an update locks the row until the transaction ends.
    update_peer = "UPDATE peers SET agent_version = $2, protocols = {text[] $3}, \
        updated_at = {ts $4} WHERE id = $1 AND (agent_version IS DISTINCT FROM $2 \
        OR protocols IS DISTINCT FROM {text[] $3})";
    insert_client = "INSERT INTO clients (peer_id, authorization_id, created_at) \
        VALUES ($1, $2, {ts $3}) ON CONFLICT (peer_id, authorization_id) DO NOTHING";
    client_hosts = "SELECT p.id, p.multi_hash FROM peers p JOIN clients c ON c.peer_id = p.id \
        WHERE c.authorization_id = $1 AND p.multi_hash IN (SELECT {each text $2})";
    /// Relay addresses of peers seen since $1, not the caller's hosts ($2), under the per-remote
    /// cap ($4 since $3), not served to or reported by the caller's hosts since $6 with the same
    /// address; $5 limits it to one peer.
    candidates = "SELECT DISTINCT p.id, p.multi_hash, ma.id, ma.maddr \
        FROM connection_events ce \
        JOIN connection_events_x_multi_addresses cx ON cx.connection_event_id = ce.id \
        JOIN multi_addresses ma ON ma.id = cx.multi_address_id \
        JOIN peers p ON p.id = ce.remote_id \
        WHERE ce.opened_at > {ts $1} AND ma.is_relay \
        AND ({bigint $5} IS NULL OR p.id = $5) \
        AND p.id NOT IN (SELECT {each bigint $2}) \
        AND (SELECT count(*) FROM allocations a \
             WHERE a.remote_id = p.id AND a.created_at > {ts $3}) < $4 \
        AND NOT EXISTS (SELECT 1 FROM allocations a \
             JOIN allocations_x_multi_addresses ax ON ax.allocation_id = a.id \
             WHERE a.remote_id = p.id AND ax.multi_address_id = ma.id \
             AND a.local_id IN (SELECT {each bigint $2}) AND a.created_at > {ts $6}) \
        AND NOT EXISTS (SELECT 1 FROM hole_punch_results r \
             JOIN hole_punch_results_x_multi_addresses rx ON rx.hole_punch_result_id = r.id \
             WHERE r.remote_id = p.id AND rx.multi_address_id = ma.id \
             AND rx.relationship = 'INITIAL' \
             AND r.local_id IN (SELECT {each bigint $2}) AND r.created_at > {ts $6})";
    lock_peer = "SELECT id FROM peers WHERE id = $1 FOR UPDATE";
    insert_allocation = "INSERT INTO allocations (local_id, remote_id, authorization_id, \
        created_at) VALUES ($1, $2, $3, {ts $4}) RETURNING id";
    link_allocation = "INSERT INTO allocations_x_multi_addresses (allocation_id, \
        multi_address_id) VALUES ($1, $2) ON CONFLICT DO NOTHING";
    find_key = "SELECT id FROM hole_punch_results WHERE idempotency_key = $1";
    find_maddr = "SELECT id FROM multi_addresses WHERE maddr = $1";
    insert_maddr = "INSERT INTO multi_addresses (maddr, addr, transport, is_relay, is_public, \
        updated_at, created_at) VALUES ($1, {inet $2}, $3, $4, $5, {ts $6}, {ts $6}) \
        ON CONFLICT (maddr) DO NOTHING RETURNING id";
    find_set = "SELECT id FROM multi_addresses_sets WHERE digest = $1";
    insert_set = "INSERT INTO multi_addresses_sets (digest, multi_addresses_ids) \
        VALUES ($1, {bigint[] $2}) ON CONFLICT (digest) DO NOTHING RETURNING id";
    /// The client of each (peer, authorization) among the peers in $1.
    client_peers = "SELECT p.multi_hash, c.authorization_id, p.id, p.agent_version \
        FROM peers p JOIN clients c ON c.peer_id = p.id \
        WHERE p.multi_hash {in text $1}";
    /// Where the peers in $1 were seen connecting from since $2, newest first, at most $3:
    /// peer, observer, address, Unix seconds.
    observations = "SELECT ce.remote_id, ce.local_id, ma.maddr, {epoch ce.opened_at} \
        FROM connection_events ce JOIN multi_addresses ma ON ma.id = ce.conn_multi_address_id \
        WHERE ce.remote_id {in bigint $1} AND ce.opened_at > {ts $2} \
        ORDER BY ce.opened_at DESC LIMIT $3";
    /// Ids taken for $1 new `hole_punch_results` rows (0) and $2 `hole_punch_attempt` rows (1),
    /// in PostgreSQL.
    next_ids = "SELECT 0, nextval(pg_get_serial_sequence('hole_punch_results', 'id')) \
        FROM generate_series(1, $1) UNION ALL \
        SELECT 1, nextval(pg_get_serial_sequence('hole_punch_attempt', 'id')) \
        FROM generate_series(1, $2)";
    /// The largest ids of `hole_punch_results` and `hole_punch_attempt`, in SQLite (whose
    /// writer holds the database: the next ids are its own).
    last_ids = "SELECT (SELECT coalesce(max(id), 0) FROM hole_punch_results), \
        (SELECT coalesce(max(id), 0) FROM hole_punch_attempt)";
    /// The results of a batch (`$1`), but those whose idempotency key is stored already.
    insert_results = "INSERT INTO hole_punch_results (id, local_id, remote_id, \
        authorization_id, connect_started_at, connect_ended_at, has_direct_conns, error, \
        outcome, ended_at, protocol_filters, listen_multi_addresses_set_id, idempotency_key, \
        technique, time_to_direct, client_nat, remote_nat, transport, updated_at, created_at) \
        {overriding} SELECT x.id, x.local_id, x.remote_id, x.auth, {ts x.connect_started_at}, \
        {ts x.connect_ended_at}, x.has_direct_conns, x.error, \
        {hole_punch_outcome x.outcome}, {ts x.ended_at}, {int[] x.protocol_filters}, x.set_id, \
        x.idempotency_key, x.technique, {interval x.time_to_direct}, x.client_nat, \
        x.remote_nat, x.transport, {ts x.now}, {ts x.now} \
        FROM {recordset $1 x(id bigint, local_id bigint, remote_id bigint, auth bigint, \
        connect_started_at bigint, connect_ended_at bigint, has_direct_conns boolean, \
        error text, outcome text, ended_at bigint, protocol_filters text, set_id bigint, \
        idempotency_key text, technique text, time_to_direct float8, client_nat text, \
        remote_nat text, transport text, now bigint)} WHERE true \
        ON CONFLICT (idempotency_key) DO NOTHING RETURNING id";
    /// The other tables of a batch: the rows (`$1`) of the results inserted (`r`).
    insert_attempts = "INSERT INTO hole_punch_attempt (id, hole_punch_result_id, opened_at, \
        started_at, ended_at, start_rtt, elapsed_time, outcome, error, direct_dial_error, \
        updated_at, created_at) {overriding} SELECT x.id, x.result_id, {ts x.opened_at}, \
        {ts x.started_at}, {ts x.ended_at}, {interval x.start_rtt}, \
        {interval x.elapsed_time}, {hole_punch_attempt_outcome x.outcome}, x.error, \
        x.direct_dial_error, {ts x.now}, {ts x.now} \
        FROM {recordset $1 x(id bigint, result_id bigint, opened_at bigint, started_at bigint, \
        ended_at bigint, start_rtt float8, elapsed_time float8, outcome text, error text, \
        direct_dial_error text, now bigint)} WHERE x.result_id IN (SELECT id FROM r)";
    link_attempts = "INSERT INTO hole_punch_attempt_x_multi_addresses (hole_punch_attempt, \
        multi_address_id) SELECT x.attempt, x.maddr \
        FROM {recordset $1 x(result_id bigint, attempt bigint, maddr bigint)} WHERE x.result_id IN (SELECT id FROM r) ON CONFLICT DO NOTHING";
    link_results = "INSERT INTO hole_punch_results_x_multi_addresses (hole_punch_result_id, \
        multi_address_id, relationship) \
        SELECT x.result_id, x.maddr, {hole_punch_multi_address_relationship x.relationship} \
        FROM {recordset $1 x(result_id bigint, maddr bigint, relationship text)} WHERE x.result_id IN (SELECT id FROM r) \
        ON CONFLICT DO NOTHING";
    insert_mappings = "INSERT INTO port_mappings (hole_punch_result_id, internal_port, \
        external_port, protocol, addr, addr_network) SELECT x.result_id, x.internal_port, \
        x.external_port, x.protocol, x.addr, x.addr_network \
        FROM {recordset $1 x(result_id bigint, internal_port int, external_port int, \
        protocol text, addr text, addr_network text)} WHERE x.result_id IN (SELECT id FROM r)";
    insert_networks = "INSERT INTO network_information (peer_id, hole_punch_result_id, \
        supports_ipv6, supports_ipv6_error, router_html, router_html_error, created_at) \
        SELECT x.peer_id, x.result_id, x.supports_ipv6, x.supports_ipv6_error, x.router_html, \
        x.router_html_error, {ts x.now} \
        FROM {recordset $1 x(peer_id bigint, result_id bigint, supports_ipv6 boolean, \
        supports_ipv6_error text, router_html text, router_html_error text, now bigint)} \
        WHERE x.result_id IN (SELECT id FROM r)";
    insert_latencies = "INSERT INTO latency_measurements (remote_id, hole_punch_result_id, \
        multi_address_id, mtype, rtts, rtt_errs, rtt_avg, rtt_max, rtt_min, rtt_std, \
        created_at) SELECT x.remote_id, x.result_id, x.maddr, \
        {latency_measurement_type x.mtype}, {float8[] x.rtts}, {text[] x.rtt_errs}, x.avg, \
        x.max, x.min, x.std, {ts x.now} \
        FROM {recordset $1 x(remote_id bigint, result_id bigint, maddr bigint, mtype text, \
        rtts text, rtt_errs text, avg float8, max float8, min float8, std float8, now bigint)} \
        WHERE x.result_id IN (SELECT id FROM r)";
    /// Only the rows whose agent or protocols changed: an update locks the row until the
    /// transaction ends.
    update_peers = "UPDATE peers SET agent_version = x.agent_version, \
        protocols = {text[] x.protocols}, updated_at = {ts x.now} \
        FROM {recordset $1 x(id bigint, agent_version text, protocols text, now bigint)} \
        WHERE peers.id = x.id AND (peers.agent_version IS DISTINCT FROM x.agent_version \
        OR peers.protocols IS DISTINCT FROM {text[] x.protocols})";
    insert_connection = "INSERT INTO connection_events (local_id, remote_id, \
        conn_multi_address_id, opened_at, created_at) VALUES ($1, $2, $3, {ts $4}, {ts $5}) \
        RETURNING id";
    link_connection = "INSERT INTO connection_events_x_multi_addresses (connection_event_id, \
        multi_address_id) VALUES ($1, $2) ON CONFLICT DO NOTHING";
    results = "SELECT l.multi_hash, r.multi_hash, {text h.outcome}, {text h.protocol_filters}, \
        h.transport, {secs h.time_to_direct}, h.client_nat, h.remote_nat \
        FROM hole_punch_results h \
        JOIN peers l ON l.id = h.local_id JOIN peers r ON r.id = h.remote_id ORDER BY h.id";
    counts = "SELECT (SELECT count(*) FROM hole_punch_results), \
        (SELECT count(*) FROM hole_punch_attempt), (SELECT count(*) FROM latency_measurements), \
        (SELECT count(*) FROM port_mappings), (SELECT count(*) FROM network_information), \
        (SELECT count(*) FROM hole_punch_results_x_multi_addresses), \
        (SELECT count(*) FROM peers), (SELECT count(*) FROM allocations)";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_statement_renders_without_marks_left() {
        for backend in [Backend::Sqlite, Backend::Postgres] {
            for sql in Statements::new(backend).all() {
                assert!(
                    !sql.contains('{') && !sql.contains('}'),
                    "{backend:?}: {sql}"
                );
            }
        }
    }
}
