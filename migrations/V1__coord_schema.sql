-- coord's own schema: the public state table, the per-version table, the
-- transition history, the parked-event table and the bundled event store.
CREATE SCHEMA IF NOT EXISTS coord;

-- The public face: one row per projector name. Other languages and dashboards
-- read it; only coord writes it.
CREATE TABLE coord.projector_states (
    name               text PRIMARY KEY,
    active_version     text,
    activating_version text,
    replaying_version  text,
    updated_at         timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT projector_states_not_replaying_and_activating
        CHECK (replaying_version IS NULL OR activating_version IS NULL)
);

-- One row per projector version that coord has ever built.
CREATE TABLE coord.projector_versions (
    name                text        NOT NULL,
    version             text        NOT NULL,
    -- replaying | activating | active | retired | aborted
    status              text        NOT NULL,
    schema_name         text        NOT NULL UNIQUE,
    fingerprint         text        NOT NULL,
    event_types         text[]      NOT NULL,
    mode                text        NOT NULL,
    -- Checkpoint (see docs/decisions/0002-checkpoint-horizon.md): every
    -- handled event whose transaction id is below `horizon` is applied, and
    -- so is every event listed in coord.applied_ahead for this version.
    -- A pass in progress reads the events visible in `pass_snapshot` in
    -- position order; `pass_cursor` is the last position it applied.
    horizon             xid8        NOT NULL DEFAULT '0'::xid8,
    pass_snapshot       pg_snapshot,
    pass_cursor         bigint,
    last_position       bigint      NOT NULL DEFAULT 0,
    events_processed    bigint      NOT NULL DEFAULT 0,
    events_skipped      bigint      NOT NULL DEFAULT 0,
    events_parked       bigint      NOT NULL DEFAULT 0,
    events_total        bigint,
    rate_per_s          double precision,
    eta_s               double precision,
    last_error          text,
    created_at          timestamptz NOT NULL DEFAULT now(),
    replay_started_at   timestamptz,
    replay_finished_at  timestamptz,
    activated_at        timestamptz,
    retired_at          timestamptz,
    updated_at          timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (name, version),
    CONSTRAINT projector_versions_status CHECK
        (status IN ('replaying', 'activating', 'active', 'retired', 'aborted')),
    CONSTRAINT projector_versions_mode CHECK (mode IN ('inline', 'async'))
);

-- Events applied by a version although their transaction id is not yet below
-- the version's horizon (their transaction committed while an older one was
-- still running). Pruned as the horizon passes them.
CREATE TABLE coord.applied_ahead (
    name     text   NOT NULL,
    version  text   NOT NULL,
    position bigint NOT NULL,
    xact_id  xid8   NOT NULL,
    PRIMARY KEY (name, version, position),
    FOREIGN KEY (name, version) REFERENCES coord.projector_versions ON DELETE CASCADE
);

-- Events whose handler failed during a replay of a projector with
-- on_error = "park".
CREATE TABLE coord.parked_events (
    name           text        NOT NULL,
    version        text        NOT NULL,
    position       bigint      NOT NULL,
    stream_id      text        NOT NULL,
    stream_version bigint      NOT NULL,
    event_type     text        NOT NULL,
    error          text        NOT NULL,
    parked_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (name, version, position),
    FOREIGN KEY (name, version) REFERENCES coord.projector_versions ON DELETE CASCADE
);

-- Append-only audit trail of every state transition.
CREATE TABLE coord.transitions (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name        text        NOT NULL,
    version     text,
    from_status text,
    to_status   text        NOT NULL,
    at          timestamptz NOT NULL DEFAULT clock_timestamp(),
    host        text        NOT NULL,
    command     text        NOT NULL,
    detail      text
);
CREATE INDEX transitions_name_at ON coord.transitions (name, at);

-- The bundled event store. An external store is read through a view with the
-- same columns.
CREATE TABLE coord.events (
    position       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    xact_id        xid8        NOT NULL DEFAULT pg_current_xact_id(),
    stream_id      text        NOT NULL,
    stream_version bigint      NOT NULL,
    event_type     text        NOT NULL,
    data           jsonb       NOT NULL,
    metadata       jsonb       NOT NULL DEFAULT '{}',
    recorded_at    timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT events_stream_version UNIQUE (stream_id, stream_version)
);
-- Catch-up reads the events of transactions at or above a version's horizon:
-- a range scan whose cost follows the delta, not the store.
CREATE INDEX events_xact_id ON coord.events (xact_id);

-- Timestamps as ISO 8601 text in UTC, for status output in every language.
CREATE FUNCTION coord.iso(t timestamptz) RETURNS text
LANGUAGE sql STABLE AS $$ SELECT to_char(t AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"') $$;
