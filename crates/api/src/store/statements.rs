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
    client_peer = "SELECT p.id, p.agent_version FROM peers p JOIN clients c ON c.peer_id = p.id \
        WHERE p.multi_hash = $1 AND c.authorization_id = $2";
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
    insert_result = "INSERT INTO hole_punch_results (local_id, remote_id, authorization_id, \
        connect_started_at, connect_ended_at, has_direct_conns, error, outcome, ended_at, \
        protocol_filters, listen_multi_addresses_set_id, idempotency_key, technique, \
        time_to_direct, client_nat, remote_nat, transport, updated_at, created_at) \
        VALUES ($1, $2, $3, {ts $4}, {ts $5}, $6, $7, {hole_punch_outcome $8}, {ts $9}, \
        {int[] $10}, $11, $12, $13, {interval $14}, $15, $16, $17, {ts $18}, {ts $18}) \
        RETURNING id";
    insert_attempt = "INSERT INTO hole_punch_attempt (hole_punch_result_id, opened_at, \
        started_at, ended_at, start_rtt, elapsed_time, outcome, error, direct_dial_error, \
        updated_at, created_at) VALUES ($1, {ts $2}, {ts $3}, {ts $4}, {interval $5}, \
        {interval $6}, {hole_punch_attempt_outcome $7}, $8, $9, {ts $10}, {ts $10}) \
        RETURNING id";
    link_attempt = "INSERT INTO hole_punch_attempt_x_multi_addresses (hole_punch_attempt, \
        multi_address_id) VALUES ($1, $2) ON CONFLICT DO NOTHING";
    link_result = "INSERT INTO hole_punch_results_x_multi_addresses (hole_punch_result_id, \
        multi_address_id, relationship) \
        VALUES ($1, $2, {hole_punch_multi_address_relationship $3}) ON CONFLICT DO NOTHING";
    insert_mapping = "INSERT INTO port_mappings (hole_punch_result_id, internal_port, \
        external_port, protocol, addr, addr_network) VALUES ($1, $2, $3, $4, $5, $6)";
    insert_network = "INSERT INTO network_information (peer_id, hole_punch_result_id, \
        supports_ipv6, supports_ipv6_error, router_html, router_html_error, created_at) \
        VALUES ($1, $2, $3, $4, $5, $6, {ts $7})";
    insert_latency = "INSERT INTO latency_measurements (remote_id, hole_punch_result_id, \
        multi_address_id, mtype, rtts, rtt_errs, rtt_avg, rtt_max, rtt_min, rtt_std, \
        created_at) VALUES ($1, $2, $3, {latency_measurement_type $4}, {float8[] $5}, \
        {text[] $6}, $7, $8, $9, $10, {ts $11})";
    insert_connection = "INSERT INTO connection_events (local_id, remote_id, \
        conn_multi_address_id, opened_at, created_at) VALUES ($1, $2, $3, {ts $4}, {ts $5}) \
        RETURNING id";
    link_connection = "INSERT INTO connection_events_x_multi_addresses (connection_event_id, \
        multi_address_id) VALUES ($1, $2) ON CONFLICT DO NOTHING";
    results = "SELECT l.multi_hash, r.multi_hash, {text h.outcome}, {text h.protocol_filters}, \
        h.transport, {secs h.time_to_direct}, h.client_nat FROM hole_punch_results h \
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
