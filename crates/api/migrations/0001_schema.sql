# The measurement store's schema, written once in PostgreSQL's dialect; src/store/schema.rs
# renders it for each backend. Lines starting with `@sqlite ` or `@postgres ` belong to that
# backend only; lines starting with `#` are notes on this file and belong to neither. SQLite's
# column lines are derived from PostgreSQL's: its types (INTEGER for ids, integers, timestamps
# and booleans; TEXT for text, addresses, arrays as JSON, and enums; REAL for intervals and
# floats; BLOB for bytes), a CHECK for booleans and enums (the values of the enum's CREATE
# TYPE), and '[]' for an empty array default.
#
# sqlx keeps the SHA-384 of each backend's rendered SQL in every database it migrated and
# refuses to open one whose migration changed; store::schema's tests pin both. Change the schema
# with a new migration, never by editing this one.
@sqlite -- natpunch's measurement store on SQLite. Table, column and enum names follow punchr's schema,
@sqlite -- so its published dataset and notebooks map onto it; what punchr got wrong is fixed here:
@sqlite -- api_key is unique, the allocation and dedup queries have indexes, a report carries an
@sqlite -- idempotency key, latency statistics leave failed pings out.
@sqlite --
@sqlite -- SQLite has no arrays, enums or time zones: lists are JSON text, enums are TEXT with a CHECK,
@sqlite -- timestamps are INTEGER Unix nanoseconds (what the API carries), durations REAL seconds.
@postgres -- natpunch's measurement store on PostgreSQL. Table, column, type and enum names follow
@postgres -- punchr's schema (timestamps TIMESTAMPTZ, durations INTERVAL, lists as arrays, outcomes as
@postgres -- enum types), so its published dataset and notebooks map onto it. What punchr got wrong is
@postgres -- fixed here: api_key is unique, clients are unique per (peer, authorization), the allocation
@postgres -- and dedup queries have indexes, a report carries an idempotency key, network information is
@postgres -- linked to its result, latency statistics leave failed pings out.

@postgres CREATE TYPE hole_punch_outcome AS ENUM (
@postgres     'UNKNOWN', 'NO_CONNECTION', 'NO_STREAM', 'CONNECTION_REVERSED', 'CANCELLED', 'FAILED',
@postgres     'SUCCESS'
@postgres );
@postgres CREATE TYPE hole_punch_attempt_outcome AS ENUM (
@postgres     'UNKNOWN', 'DIRECT_DIAL', 'PROTOCOL_ERROR', 'CANCELLED', 'TIMEOUT', 'FAILED', 'SUCCESS'
@postgres );
@postgres CREATE TYPE hole_punch_multi_address_relationship AS ENUM ('INITIAL', 'FINAL');
@postgres CREATE TYPE latency_measurement_type AS ENUM (
@postgres     'TO_RELAY', 'TO_REMOTE_THROUGH_RELAY', 'TO_REMOTE_AFTER_HOLEPUNCH'
@postgres );
@postgres
CREATE TABLE authorizations (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    api_key     TEXT        NOT NULL UNIQUE,
    username    TEXT        NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL
);

CREATE TABLE peers (
    id             BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    multi_hash     TEXT        NOT NULL UNIQUE,
    agent_version  TEXT,
    protocols      TEXT[]      NOT NULL DEFAULT '{}',
    updated_at     TIMESTAMPTZ NOT NULL,
    created_at     TIMESTAMPTZ NOT NULL
);

CREATE TABLE clients (
    id                BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    peer_id           BIGINT      NOT NULL REFERENCES peers (id) ON DELETE CASCADE,
    authorization_id  BIGINT      NOT NULL REFERENCES authorizations (id) ON DELETE CASCADE,
    created_at        TIMESTAMPTZ NOT NULL,
    UNIQUE (peer_id, authorization_id)
);

CREATE TABLE multi_addresses (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    maddr       TEXT        NOT NULL UNIQUE,
    addr        INET,
    transport   TEXT,
    is_relay    BOOLEAN     NOT NULL,
    is_public   BOOLEAN     NOT NULL,
    updated_at  TIMESTAMPTZ NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL
);

CREATE TABLE multi_addresses_sets (
    id                   BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    digest               BYTEA    NOT NULL UNIQUE,
    multi_addresses_ids  BIGINT[] NOT NULL
);

-- Written by the honeypot: a peer connected, advertising these addresses.
CREATE TABLE connection_events (
    id                     BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    local_id               BIGINT      NOT NULL REFERENCES peers (id) ON DELETE CASCADE,
    remote_id              BIGINT      NOT NULL REFERENCES peers (id) ON DELETE CASCADE,
    conn_multi_address_id  BIGINT      NOT NULL REFERENCES multi_addresses (id) ON DELETE CASCADE,
    opened_at              TIMESTAMPTZ NOT NULL,
    created_at             TIMESTAMPTZ NOT NULL
);
CREATE INDEX idx_connection_events_opened_at ON connection_events (opened_at);
CREATE INDEX idx_connection_events_remote_opened_at ON connection_events (remote_id, opened_at);

CREATE TABLE connection_events_x_multi_addresses (
    connection_event_id  BIGINT NOT NULL REFERENCES connection_events (id) ON DELETE CASCADE,
    multi_address_id     BIGINT NOT NULL REFERENCES multi_addresses (id) ON DELETE CASCADE,
    PRIMARY KEY (connection_event_id, multi_address_id)
);
CREATE INDEX idx_connection_events_x_multi_addresses_maddr
    ON connection_events_x_multi_addresses (multi_address_id, connection_event_id);

CREATE TABLE hole_punch_results (
    id                             BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    local_id                       BIGINT             NOT NULL REFERENCES peers (id) ON DELETE CASCADE,
    remote_id                      BIGINT             NOT NULL REFERENCES peers (id) ON DELETE CASCADE,
    authorization_id               BIGINT             NOT NULL REFERENCES authorizations (id),
    connect_started_at             TIMESTAMPTZ        NOT NULL,
    connect_ended_at               TIMESTAMPTZ        NOT NULL,
    has_direct_conns               BOOLEAN            NOT NULL,
    error                          TEXT,
    outcome                        hole_punch_outcome NOT NULL,
    ended_at                       TIMESTAMPTZ        NOT NULL,
    protocol_filters               INT[]              NOT NULL DEFAULT '{}',
    listen_multi_addresses_set_id  BIGINT REFERENCES multi_addresses_sets (id),
    idempotency_key                TEXT UNIQUE,
    technique                      TEXT,
    time_to_direct                 INTERVAL,
    client_nat                     TEXT,
    remote_nat                     TEXT,
    transport                      TEXT,
    updated_at                     TIMESTAMPTZ        NOT NULL,
    created_at                     TIMESTAMPTZ        NOT NULL
);
@sqlite -- The per-remote rate limit (results per remote in the last minute).
CREATE INDEX idx_hole_punch_results_remote_created ON hole_punch_results (remote_id, created_at);
@sqlite -- The per-client dedup (this client's results to a remote in the last 10 minutes).
CREATE INDEX idx_hole_punch_results_local_remote_created
    ON hole_punch_results (local_id, remote_id, created_at);

CREATE TABLE hole_punch_attempt (
    id                    BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    hole_punch_result_id  BIGINT                     NOT NULL REFERENCES hole_punch_results (id) ON DELETE CASCADE,
    opened_at             TIMESTAMPTZ                NOT NULL,
    started_at            TIMESTAMPTZ,
    ended_at              TIMESTAMPTZ                NOT NULL,
    start_rtt             INTERVAL,
    elapsed_time          INTERVAL                   NOT NULL,
    outcome               hole_punch_attempt_outcome NOT NULL,
    error                 TEXT,
    direct_dial_error     TEXT,
    updated_at            TIMESTAMPTZ                NOT NULL,
    created_at            TIMESTAMPTZ                NOT NULL
);
CREATE INDEX idx_hole_punch_attempt_result ON hole_punch_attempt (hole_punch_result_id);

-- INITIAL: the addresses served for the punch; FINAL: the connections open after it.
CREATE TABLE hole_punch_results_x_multi_addresses (
    hole_punch_result_id  BIGINT NOT NULL REFERENCES hole_punch_results (id) ON DELETE CASCADE,
    multi_address_id      BIGINT NOT NULL REFERENCES multi_addresses (id) ON DELETE CASCADE,
    relationship          hole_punch_multi_address_relationship NOT NULL,
    PRIMARY KEY (hole_punch_result_id, multi_address_id, relationship)
);
CREATE INDEX idx_hole_punch_results_x_multi_addresses_maddr
    ON hole_punch_results_x_multi_addresses (multi_address_id, relationship);

CREATE TABLE hole_punch_attempt_x_multi_addresses (
    hole_punch_attempt  BIGINT NOT NULL REFERENCES hole_punch_attempt (id) ON DELETE CASCADE,
    multi_address_id    BIGINT NOT NULL REFERENCES multi_addresses (id) ON DELETE CASCADE,
    PRIMARY KEY (multi_address_id, hole_punch_attempt)
);

CREATE TABLE port_mappings (
    id                    BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    hole_punch_result_id  BIGINT NOT NULL REFERENCES hole_punch_results (id) ON DELETE CASCADE,
    internal_port         INT    NOT NULL,
    external_port         INT    NOT NULL,
    protocol              TEXT   NOT NULL,
    addr                  TEXT   NOT NULL,
    addr_network          TEXT   NOT NULL
);
@postgres CREATE INDEX idx_port_mappings_result ON port_mappings (hole_punch_result_id);

-- Linked to the result it came with (punchr linked it to the peer only).
CREATE TABLE network_information (
    id                    BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    peer_id               BIGINT      NOT NULL REFERENCES peers (id) ON DELETE CASCADE,
    hole_punch_result_id  BIGINT REFERENCES hole_punch_results (id) ON DELETE CASCADE,
    supports_ipv6         BOOLEAN,
    supports_ipv6_error   TEXT,
    router_html           TEXT,
    router_html_error     TEXT,
    created_at            TIMESTAMPTZ NOT NULL
);

-- rtts keeps what the client sent (-1 marks a failed ping); the statistics cover successful
-- pings only and are NULL when there were none.
CREATE TABLE latency_measurements (
    id                    BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    remote_id             BIGINT                   NOT NULL REFERENCES peers (id) ON DELETE CASCADE,
    hole_punch_result_id  BIGINT                   NOT NULL REFERENCES hole_punch_results (id) ON DELETE CASCADE,
    multi_address_id      BIGINT                   NOT NULL REFERENCES multi_addresses (id) ON DELETE CASCADE,
    mtype                 latency_measurement_type NOT NULL,
    rtts                  FLOAT8[]                 NOT NULL,
    rtt_errs              TEXT[]                   NOT NULL,
    rtt_avg               FLOAT8,
    rtt_max               FLOAT8,
    rtt_min               FLOAT8,
    rtt_std               FLOAT8,
    created_at            TIMESTAMPTZ              NOT NULL
);
@postgres CREATE INDEX idx_latency_measurements_result ON latency_measurements (hole_punch_result_id);

-- What GetAddrInfo served: the per-remote cap and the per-client dedup count these, so that a
-- remote is not handed out again before the first report about it arrives (punchr counted
-- results only, which lets concurrent requests get the same remote).
CREATE TABLE allocations (
    id                BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    local_id          BIGINT      NOT NULL REFERENCES peers (id) ON DELETE CASCADE,
    remote_id         BIGINT      NOT NULL REFERENCES peers (id) ON DELETE CASCADE,
    authorization_id  BIGINT      NOT NULL REFERENCES authorizations (id) ON DELETE CASCADE,
    created_at        TIMESTAMPTZ NOT NULL
);
CREATE INDEX idx_allocations_remote_created ON allocations (remote_id, created_at);
CREATE INDEX idx_allocations_local_remote_created ON allocations (local_id, remote_id, created_at);

CREATE TABLE allocations_x_multi_addresses (
    allocation_id     BIGINT NOT NULL REFERENCES allocations (id) ON DELETE CASCADE,
    multi_address_id  BIGINT NOT NULL REFERENCES multi_addresses (id) ON DELETE CASCADE,
    PRIMARY KEY (allocation_id, multi_address_id)
);
CREATE INDEX idx_allocations_x_multi_addresses_maddr
    ON allocations_x_multi_addresses (multi_address_id, allocation_id);
@sqlite
@sqlite CREATE INDEX idx_port_mappings_result ON port_mappings (hole_punch_result_id);
@sqlite CREATE INDEX idx_latency_measurements_result ON latency_measurements (hole_punch_result_id);
