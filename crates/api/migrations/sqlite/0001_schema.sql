-- natpunch's measurement store on SQLite. Table, column and enum names follow punchr's schema,
-- so its published dataset and notebooks map onto it; what punchr got wrong is fixed here:
-- api_key is unique, the allocation and dedup queries have indexes, a report carries an
-- idempotency key, latency statistics leave failed pings out.
--
-- SQLite has no arrays, enums or time zones: lists are JSON text, enums are TEXT with a CHECK,
-- timestamps are INTEGER Unix nanoseconds (what the API carries), durations REAL seconds.

CREATE TABLE authorizations (
    id          INTEGER PRIMARY KEY,
    api_key     TEXT    NOT NULL UNIQUE,
    username    TEXT    NOT NULL,
    created_at  INTEGER NOT NULL
);

CREATE TABLE peers (
    id             INTEGER PRIMARY KEY,
    multi_hash     TEXT    NOT NULL UNIQUE,
    agent_version  TEXT,
    protocols      TEXT    NOT NULL DEFAULT '[]',
    updated_at     INTEGER NOT NULL,
    created_at     INTEGER NOT NULL
);

CREATE TABLE clients (
    id                INTEGER PRIMARY KEY,
    peer_id           INTEGER NOT NULL REFERENCES peers (id) ON DELETE CASCADE,
    authorization_id  INTEGER NOT NULL REFERENCES authorizations (id) ON DELETE CASCADE,
    created_at        INTEGER NOT NULL,
    UNIQUE (peer_id, authorization_id)
);

CREATE TABLE multi_addresses (
    id          INTEGER PRIMARY KEY,
    maddr       TEXT    NOT NULL UNIQUE,
    addr        TEXT,
    transport   TEXT,
    is_relay    INTEGER NOT NULL CHECK (is_relay IN (0, 1)),
    is_public   INTEGER NOT NULL CHECK (is_public IN (0, 1)),
    updated_at  INTEGER NOT NULL,
    created_at  INTEGER NOT NULL
);

CREATE TABLE multi_addresses_sets (
    id                   INTEGER PRIMARY KEY,
    digest               BLOB    NOT NULL UNIQUE,
    multi_addresses_ids  TEXT    NOT NULL
);

-- Written by the honeypot: a peer connected, advertising these addresses.
CREATE TABLE connection_events (
    id                     INTEGER PRIMARY KEY,
    local_id               INTEGER NOT NULL REFERENCES peers (id) ON DELETE CASCADE,
    remote_id              INTEGER NOT NULL REFERENCES peers (id) ON DELETE CASCADE,
    conn_multi_address_id  INTEGER NOT NULL REFERENCES multi_addresses (id) ON DELETE CASCADE,
    opened_at              INTEGER NOT NULL,
    created_at             INTEGER NOT NULL
);
CREATE INDEX idx_connection_events_opened_at ON connection_events (opened_at);
CREATE INDEX idx_connection_events_remote_opened_at ON connection_events (remote_id, opened_at);

CREATE TABLE connection_events_x_multi_addresses (
    connection_event_id  INTEGER NOT NULL REFERENCES connection_events (id) ON DELETE CASCADE,
    multi_address_id     INTEGER NOT NULL REFERENCES multi_addresses (id) ON DELETE CASCADE,
    PRIMARY KEY (connection_event_id, multi_address_id)
);
CREATE INDEX idx_connection_events_x_multi_addresses_maddr
    ON connection_events_x_multi_addresses (multi_address_id, connection_event_id);

CREATE TABLE hole_punch_results (
    id                             INTEGER PRIMARY KEY,
    local_id                       INTEGER NOT NULL REFERENCES peers (id) ON DELETE CASCADE,
    remote_id                      INTEGER NOT NULL REFERENCES peers (id) ON DELETE CASCADE,
    authorization_id               INTEGER NOT NULL REFERENCES authorizations (id),
    connect_started_at             INTEGER NOT NULL,
    connect_ended_at               INTEGER NOT NULL,
    has_direct_conns               INTEGER NOT NULL CHECK (has_direct_conns IN (0, 1)),
    error                          TEXT,
    outcome                        TEXT    NOT NULL CHECK (outcome IN ('UNKNOWN', 'NO_CONNECTION',
                                       'NO_STREAM', 'CONNECTION_REVERSED', 'CANCELLED', 'FAILED',
                                       'SUCCESS')),
    ended_at                       INTEGER NOT NULL,
    protocol_filters               TEXT    NOT NULL DEFAULT '[]',
    listen_multi_addresses_set_id  INTEGER REFERENCES multi_addresses_sets (id),
    idempotency_key                TEXT    UNIQUE,
    technique                      TEXT,
    time_to_direct                 REAL,
    client_nat                     TEXT,
    remote_nat                     TEXT,
    transport                      TEXT,
    updated_at                     INTEGER NOT NULL,
    created_at                     INTEGER NOT NULL
);
-- The per-remote rate limit (results per remote in the last minute).
CREATE INDEX idx_hole_punch_results_remote_created ON hole_punch_results (remote_id, created_at);
-- The per-client dedup (this client's results to a remote in the last 10 minutes).
CREATE INDEX idx_hole_punch_results_local_remote_created
    ON hole_punch_results (local_id, remote_id, created_at);

CREATE TABLE hole_punch_attempt (
    id                    INTEGER PRIMARY KEY,
    hole_punch_result_id  INTEGER NOT NULL REFERENCES hole_punch_results (id) ON DELETE CASCADE,
    opened_at             INTEGER NOT NULL,
    started_at            INTEGER,
    ended_at              INTEGER NOT NULL,
    start_rtt             REAL,
    elapsed_time          REAL    NOT NULL,
    outcome               TEXT    NOT NULL CHECK (outcome IN ('UNKNOWN', 'DIRECT_DIAL',
                              'PROTOCOL_ERROR', 'CANCELLED', 'TIMEOUT', 'FAILED', 'SUCCESS')),
    error                 TEXT,
    direct_dial_error     TEXT,
    updated_at            INTEGER NOT NULL,
    created_at            INTEGER NOT NULL
);
CREATE INDEX idx_hole_punch_attempt_result ON hole_punch_attempt (hole_punch_result_id);

-- INITIAL: the addresses served for the punch; FINAL: the connections open after it.
CREATE TABLE hole_punch_results_x_multi_addresses (
    hole_punch_result_id  INTEGER NOT NULL REFERENCES hole_punch_results (id) ON DELETE CASCADE,
    multi_address_id      INTEGER NOT NULL REFERENCES multi_addresses (id) ON DELETE CASCADE,
    relationship          TEXT    NOT NULL CHECK (relationship IN ('INITIAL', 'FINAL')),
    PRIMARY KEY (hole_punch_result_id, multi_address_id, relationship)
);
CREATE INDEX idx_hole_punch_results_x_multi_addresses_maddr
    ON hole_punch_results_x_multi_addresses (multi_address_id, relationship);

CREATE TABLE hole_punch_attempt_x_multi_addresses (
    hole_punch_attempt  INTEGER NOT NULL REFERENCES hole_punch_attempt (id) ON DELETE CASCADE,
    multi_address_id    INTEGER NOT NULL REFERENCES multi_addresses (id) ON DELETE CASCADE,
    PRIMARY KEY (multi_address_id, hole_punch_attempt)
);

CREATE TABLE port_mappings (
    id                    INTEGER PRIMARY KEY,
    hole_punch_result_id  INTEGER NOT NULL REFERENCES hole_punch_results (id) ON DELETE CASCADE,
    internal_port         INTEGER NOT NULL,
    external_port         INTEGER NOT NULL,
    protocol              TEXT    NOT NULL,
    addr                  TEXT    NOT NULL,
    addr_network          TEXT    NOT NULL
);

-- Linked to the result it came with (punchr linked it to the peer only).
CREATE TABLE network_information (
    id                    INTEGER PRIMARY KEY,
    peer_id               INTEGER NOT NULL REFERENCES peers (id) ON DELETE CASCADE,
    hole_punch_result_id  INTEGER REFERENCES hole_punch_results (id) ON DELETE CASCADE,
    supports_ipv6         INTEGER,
    supports_ipv6_error   TEXT,
    router_html           TEXT,
    router_html_error     TEXT,
    created_at            INTEGER NOT NULL
);

-- rtts keeps what the client sent (-1 marks a failed ping); the statistics cover successful
-- pings only and are NULL when there were none.
CREATE TABLE latency_measurements (
    id                    INTEGER PRIMARY KEY,
    remote_id             INTEGER NOT NULL REFERENCES peers (id) ON DELETE CASCADE,
    hole_punch_result_id  INTEGER NOT NULL REFERENCES hole_punch_results (id) ON DELETE CASCADE,
    multi_address_id      INTEGER NOT NULL REFERENCES multi_addresses (id) ON DELETE CASCADE,
    mtype                 TEXT    NOT NULL CHECK (mtype IN ('TO_RELAY', 'TO_REMOTE_THROUGH_RELAY',
                              'TO_REMOTE_AFTER_HOLEPUNCH')),
    rtts                  TEXT    NOT NULL,
    rtt_errs              TEXT    NOT NULL,
    rtt_avg               REAL,
    rtt_max               REAL,
    rtt_min               REAL,
    rtt_std               REAL,
    created_at            INTEGER NOT NULL
);

-- What GetAddrInfo served: the per-remote cap and the per-client dedup count these, so that a
-- remote is not handed out again before the first report about it arrives (punchr counted
-- results only, which lets concurrent requests get the same remote).
CREATE TABLE allocations (
    id                INTEGER PRIMARY KEY,
    local_id          INTEGER NOT NULL REFERENCES peers (id) ON DELETE CASCADE,
    remote_id         INTEGER NOT NULL REFERENCES peers (id) ON DELETE CASCADE,
    authorization_id  INTEGER NOT NULL REFERENCES authorizations (id) ON DELETE CASCADE,
    created_at        INTEGER NOT NULL
);
CREATE INDEX idx_allocations_remote_created ON allocations (remote_id, created_at);
CREATE INDEX idx_allocations_local_remote_created ON allocations (local_id, remote_id, created_at);

CREATE TABLE allocations_x_multi_addresses (
    allocation_id     INTEGER NOT NULL REFERENCES allocations (id) ON DELETE CASCADE,
    multi_address_id  INTEGER NOT NULL REFERENCES multi_addresses (id) ON DELETE CASCADE,
    PRIMARY KEY (allocation_id, multi_address_id)
);
CREATE INDEX idx_allocations_x_multi_addresses_maddr
    ON allocations_x_multi_addresses (multi_address_id, allocation_id);

CREATE INDEX idx_port_mappings_result ON port_mappings (hole_punch_result_id);
CREATE INDEX idx_latency_measurements_result ON latency_measurements (hole_punch_result_id);
