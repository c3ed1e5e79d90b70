-- Every active version keeps an exact checkpoint, inline ones included, and
-- coord.publish publishes from any language in one call.
-- See docs/decisions/0009-inline-checkpoints.md and 0010-sql-publish.md.

-- The stored definition of a config-defined version: {"handlers": {type: sql}}
-- (NULL for Rust projectors and versions registered before V4). An object, so
-- later migrations can add keys (batch handlers) without a new column.
ALTER TABLE coord.projector_versions ADD COLUMN definition jsonb;
-- Events applied in publishing transactions whose applied_ahead rows a pass
-- has pruned; applied inline = this + the version's current inline rows.
ALTER TABLE coord.projector_versions ADD COLUMN events_inline bigint NOT NULL DEFAULT 0;
-- Whether a publisher applied the event (true) or a pass did (false).
ALTER TABLE coord.applied_ahead ADD COLUMN inline boolean NOT NULL DEFAULT false;
-- Publishers now insert here on every publish. The foreign key made each of
-- them take FOR KEY SHARE on the same projector_versions row, which turns
-- concurrent publishers into shared multixact lockers of one row (measured:
-- half the publishing throughput). Rows are deleted with their version by
-- coord itself (store::versions::delete), so the key is dropped.
ALTER TABLE coord.applied_ahead DROP CONSTRAINT applied_ahead_name_version_fkey;

-- The text of a refusal: its name and SQLSTATE first, so users find it.
CREATE FUNCTION coord.refuse(code text, message text, detail jsonb) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION USING ERRCODE = code,
        MESSAGE = CASE code
            WHEN 'CO001' THEN 'NewerProjectorIsActive'
            WHEN 'CO002' THEN 'ProjectorNotYetActive'
            WHEN 'CO003' THEN 'ProjectorIsActivating'
            WHEN 'CO004' THEN 'UnknownProjectorActive'
            WHEN 'CO005' THEN 'ProjectorDefinitionMismatch'
            WHEN 'CO006' THEN 'StreamVersionConflict'
        END || ' (' || code || '): ' || message,
        DETAIL = detail::text;
END
$$;

-- The gate (docs/decisions/0003-gate-locks.md), now also checking
-- definitions and failing closed. `projectors` maps each name to its version,
-- either "1.0.0" or {"version": "1.0.0", "fingerprint": "..."}. Returns the
-- names of the configuration's projectors that are active at its version in
-- inline mode: the ones a publisher runs in its transaction.
CREATE FUNCTION coord.gate_inline(projectors jsonb, event_types text[] DEFAULT NULL)
RETURNS text[]
LANGUAGE plpgsql VOLATILE AS $$
#variable_conflict use_variable
DECLARE
    r record;
    entry jsonb;
    running text;
    fingerprint text;
    inline text[] := '{}';
BEGIN
    IF projectors IS NULL OR jsonb_typeof(projectors) <> 'object' THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = 'coord.check_publish: projectors must be a JSON object mapping projector name to version, e.g. {"balances": "1.0.0"} or {"balances": {"version": "1.0.0", "fingerprint": "..."}}';
    END IF;
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        -- Under REPEATABLE READ the snapshot predates the lock below, so an
        -- activation that committed in between would be invisible.
        RAISE EXCEPTION USING ERRCODE = '0A000',
            MESSAGE = format('coord.check_publish needs a READ COMMITTED transaction, not %s', current_setting('transaction_isolation'));
    END IF;

    -- Select-list items are evaluated left to right: type keys, then global.
    IF event_types IS NULL THEN
        PERFORM pg_advisory_xact_lock_shared(1668247411, 1), pg_advisory_xact_lock_shared(1668247411, 0);
    ELSIF cardinality(event_types) = 1 THEN
        PERFORM pg_advisory_xact_lock_shared(1668247410, hashtext(event_types[1])),
                pg_advisory_xact_lock_shared(1668247411, 0);
    ELSE
        PERFORM pg_advisory_xact_lock_shared(1668247410, h)
        FROM (SELECT DISTINCT hashtext(t) AS h FROM unnest(event_types) AS t ORDER BY 1) AS keys;
        PERFORM pg_advisory_xact_lock_shared(1668247411, 0);
    END IF;

    -- A new statement, so a new snapshot: it sees every state change that
    -- committed before the locks above were granted.
    FOR r IN
        SELECT s.name, s.active_version, s.activating_version, v.mode, v.fingerprint
        FROM coord.projector_states AS s
        LEFT JOIN coord.projector_versions AS v ON v.name = s.name AND v.version = s.active_version
        WHERE s.active_version IS NOT NULL OR s.activating_version IS NOT NULL
        ORDER BY s.name
    LOOP
        entry := projectors -> r.name;
        IF jsonb_typeof(entry) = 'object' THEN
            running := entry ->> 'version';
            fingerprint := entry ->> 'fingerprint';
        ELSE
            running := entry #>> '{}';
            fingerprint := NULL;
        END IF;
        IF running IS NULL THEN
            PERFORM coord.refuse('CO004',
                format('projector %s is active at %s but this publisher''s configuration does not have it: this code is older than the database; route traffic to the new deployment',
                       r.name, coalesce(r.active_version, r.activating_version)),
                jsonb_build_object('projector', r.name, 'active', coalesce(r.active_version, r.activating_version)));
        END IF;
        -- Fails closed: an activating version whose event types coord does
        -- not know holds back every event type.
        IF r.activating_version IS NOT NULL AND (
            event_types IS NULL
            OR NOT EXISTS (
                SELECT 1 FROM coord.projector_versions AS v
                WHERE v.name = r.name AND v.version = r.activating_version)
            OR EXISTS (
                SELECT 1 FROM coord.projector_versions AS v
                WHERE v.name = r.name
                  AND v.version IN (r.activating_version, r.active_version)
                  AND v.event_types && event_types))
        THEN
            PERFORM coord.refuse('CO003',
                format('projector %s is activating %s: publishing its events is held back for a moment; retry', r.name, r.activating_version),
                jsonb_build_object('projector', r.name, 'running', running, 'activating', r.activating_version, 'active', r.active_version));
        END IF;
        IF r.active_version IS NULL THEN
            CONTINUE;
        END IF;
        IF running = r.active_version THEN
            IF fingerprint IS NOT NULL AND r.fingerprint IS NOT NULL AND r.fingerprint <> fingerprint THEN
                PERFORM coord.refuse('CO005',
                    format('projector %s %s has another definition (fingerprint %s) than the active %s (fingerprint %s): tables or handlers changed under the same version; bump the version',
                           r.name, running, left(fingerprint, 12), r.active_version, left(r.fingerprint, 12)),
                    jsonb_build_object('projector', r.name, 'running', running, 'active', r.active_version,
                                       'fingerprint', fingerprint, 'active_fingerprint', r.fingerprint));
            END IF;
            IF coalesce(r.mode, 'inline') = 'inline' THEN
                inline := inline || r.name;
            END IF;
        ELSIF coord.semver_cmp(running, r.active_version) > 0 THEN
            PERFORM coord.refuse('CO002',
                format('projector %s %s is not yet active: %s is active; activate the new version before this code publishes', r.name, running, r.active_version),
                jsonb_build_object('projector', r.name, 'running', running, 'active', r.active_version));
        ELSE
            PERFORM coord.refuse('CO001',
                format('projector %s %s is stale: %s is active; route traffic to the new deployment', r.name, running, r.active_version),
                jsonb_build_object('projector', r.name, 'running', running, 'active', r.active_version));
        END IF;
    END LOOP;
    RETURN inline;
END
$$;

-- Publishers built before V4 call coord.gate and apply what it returns
-- inline without recording it in coord.applied_ahead. It still checks
-- everything but now returns no projector, so such publishers leave their
-- events to the follower (`coord run`, catch-up) instead of applying them
-- unrecorded, which a follower would then apply a second time.
CREATE OR REPLACE FUNCTION coord.gate(projectors jsonb, event_types text[] DEFAULT NULL)
RETURNS text[]
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    PERFORM coord.gate_inline(projectors, event_types);
    RETURN '{}'::text[];
END
$$;

CREATE OR REPLACE FUNCTION coord.check_publish(projectors jsonb, event_types text[] DEFAULT NULL)
RETURNS void
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    PERFORM coord.gate_inline(projectors, event_types);
END
$$;

-- The inline versions among `names` (active at the versions in `projectors`)
-- that may apply new events of `stream` in the publishing transaction: the
-- stream's last handled event is already applied by the version (below its
-- horizon, or in applied_ahead). Applied events of a stream always form a
-- prefix of it, so the new events then come next in stream order; otherwise
-- they are left to the follower, which applies the whole stream in order.
-- Procedural on purpose: each lookup is one index probe with a cached plan
-- (as one SQL statement the planner hashed all of applied_ahead instead).
CREATE FUNCTION coord.inline_runnable(projectors jsonb, names text[], stream text)
RETURNS text[]
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v record;
    last_position bigint;
    last_xact xid8;
    runnable text[] := '{}';
BEGIN
    FOR v IN
        SELECT pv.name, pv.version, pv.event_types, pv.horizon
        FROM coord.projector_versions AS pv
        WHERE pv.name = ANY(names)
          AND pv.version = coalesce(projectors -> pv.name ->> 'version', projectors ->> pv.name)
        ORDER BY pv.name
    LOOP
        SELECT e.position, e.xact_id INTO last_position, last_xact
        FROM coord.events AS e
        WHERE e.stream_id = stream AND e.event_type = ANY(v.event_types)
        ORDER BY e.stream_version DESC LIMIT 1;
        IF NOT FOUND OR last_xact < v.horizon OR EXISTS (
            SELECT 1 FROM coord.applied_ahead AS a
            WHERE a.name = v.name AND a.version = v.version AND a.position = last_position)
        THEN
            runnable := runnable || v.name;
        END IF;
    END LOOP;
    RETURN runnable;
END
$$;

-- The gate for a publisher that applies inline projectors itself (the Rust
-- publisher): coord.gate_inline, then the versions that may run on new
-- events of `stream` now (coord.inline_runnable).
CREATE FUNCTION coord.gate_run(projectors jsonb, event_types text[], stream text)
RETURNS text[]
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    names text[];
BEGIN
    names := coord.gate_inline(projectors, event_types);
    IF cardinality(names) = 0 THEN
        RETURN names;
    END IF;
    RETURN coord.inline_runnable(projectors, names, stream);
END
$$;

-- The whole publish for any language, inside the caller's READ COMMITTED
-- transaction: the gate, the append with optimistic concurrency, and the
-- handlers of the active inline config-defined versions (stored at
-- registration), recorded in coord.applied_ahead. Returns the positions.
--
--   events: [{"type": "MoneyDeposited", "data": {...}, "metadata": {...}}, ...]
--   expected_version: NULL (any), 0 (the stream must not exist) or N.
--
-- Raises CO001..CO005 like coord.check_publish, CO006 StreamVersionConflict
-- when the stream is not at expected_version (or a concurrent publisher
-- appended first), 22023 for malformed arguments.
CREATE FUNCTION coord.publish(projectors jsonb, stream_id text, expected_version bigint, events jsonb)
RETURNS bigint[]
LANGUAGE plpgsql VOLATILE AS $$
#variable_conflict use_variable
DECLARE
    types text[];
    inline text[];
    runnable text[] := '{}';
    current_version bigint;
    positions bigint[];
    versions bigint[];
    event_types text[];
    datas jsonb[];
    metas jsonb[];
    recorded timestamptz[];
    xacts xid8[];
    p record;
    handler text;
    caller_path text;
    i integer;
BEGIN
    IF stream_id IS NULL OR stream_id = '' THEN
        RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = 'coord.publish: stream_id must be a non-empty text';
    END IF;
    IF events IS NULL OR jsonb_typeof(events) <> 'array' THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = 'coord.publish: events must be a JSON array of {"type": ..., "data": {...}, "metadata": {...}}';
    END IF;
    IF jsonb_array_length(events) = 0 THEN
        RETURN '{}'::bigint[];
    END IF;
    IF EXISTS (SELECT 1 FROM jsonb_array_elements(events) AS x(ev)
               WHERE jsonb_typeof(ev) <> 'object'
                  OR jsonb_typeof(ev -> 'type') IS DISTINCT FROM 'string' OR ev ->> 'type' = ''
                  OR ev -> 'data' IS NULL
                  OR (ev ? 'metadata' AND jsonb_typeof(ev -> 'metadata') <> 'object')) THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = 'coord.publish: every event must be an object with a non-empty "type", a "data" value and an optional "metadata" object';
    END IF;
    SELECT array_agg(DISTINCT x.ev ->> 'type' ORDER BY x.ev ->> 'type') INTO types
    FROM jsonb_array_elements(events) AS x(ev);

    inline := coord.gate_inline(projectors, types);

    SELECT coalesce(max(s.stream_version), 0) INTO current_version
    FROM coord.events AS s WHERE s.stream_id = stream_id;
    IF expected_version IS NOT NULL AND current_version <> expected_version THEN
        PERFORM coord.refuse('CO006',
            format('stream %s is at version %s, not %s: reload it and retry', stream_id, current_version, expected_version),
            jsonb_build_object('stream', stream_id, 'expected', expected_version, 'actual', current_version));
    END IF;

    -- Decided before the append: which inline versions run on these events
    -- (config-defined ones with stored handlers; Rust-coded ones are left to
    -- the follower).
    IF cardinality(inline) > 0 THEN
        runnable := coord.inline_runnable(projectors, inline, stream_id);
    END IF;

    WITH ins AS (
        INSERT INTO coord.events AS t (stream_id, stream_version, event_type, data, metadata)
        SELECT stream_id, current_version + x.ord, x.ev ->> 'type', x.ev -> 'data', coalesce(x.ev -> 'metadata', '{}')
        FROM jsonb_array_elements(events) WITH ORDINALITY AS x(ev, ord)
        ORDER BY x.ord
        ON CONFLICT ON CONSTRAINT events_stream_version DO NOTHING
        RETURNING t.position, t.stream_version, t.event_type, t.data, t.metadata, t.recorded_at, t.xact_id)
    SELECT array_agg(ins.position ORDER BY ins.stream_version), array_agg(ins.stream_version ORDER BY ins.stream_version),
           array_agg(ins.event_type ORDER BY ins.stream_version), array_agg(ins.data ORDER BY ins.stream_version),
           array_agg(ins.metadata ORDER BY ins.stream_version), array_agg(ins.recorded_at ORDER BY ins.stream_version),
           array_agg(ins.xact_id ORDER BY ins.stream_version)
    INTO positions, versions, event_types, datas, metas, recorded, xacts
    FROM ins;
    IF coalesce(cardinality(positions), 0) <> jsonb_array_length(events) THEN
        PERFORM coord.refuse('CO006',
            format('stream %s was appended to by a concurrent publisher: reload it and retry', stream_id),
            jsonb_build_object('stream', stream_id, 'expected', current_version, 'actual', -1));
    END IF;

    IF cardinality(runnable) > 0 THEN
        caller_path := current_setting('search_path');
        FOR p IN
            SELECT v.name, v.version, v.event_types, v.schema_name, v.definition -> 'handlers' AS handlers
            FROM coord.projector_versions AS v
            WHERE v.name = ANY(runnable)
              AND v.version = coalesce(projectors -> v.name ->> 'version', projectors ->> v.name)
              AND v.definition ? 'handlers'
            ORDER BY v.name
        LOOP
            PERFORM set_config('search_path', quote_ident(p.schema_name), true);
            FOR i IN 1 .. cardinality(positions) LOOP
                handler := p.handlers ->> event_types[i];
                IF handler IS NOT NULL THEN
                    EXECUTE handler USING stream_id, versions[i], positions[i], event_types[i], datas[i], metas[i], recorded[i];
                END IF;
            END LOOP;
            PERFORM set_config('search_path', caller_path, true);
            INSERT INTO coord.applied_ahead (name, version, position, xact_id, inline)
            SELECT p.name, p.version, u.pos, u.x, true
            FROM unnest(positions, event_types, xacts) AS u(pos, t, x)
            WHERE u.t = ANY(p.event_types);
        END LOOP;
    END IF;
    RETURN positions;
END
$$;

-- Versions active inline before V4 applied their events in publishing
-- transactions without recording them. Record them now, exactly as of one
-- snapshot, with every publisher held back (the gate's global key,
-- exclusively), so that a follower applies only what comes after. A
-- function so that the step is tested; only this migration calls it.
CREATE FUNCTION coord.v4_record_inline_applied() RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    snap pg_snapshot;
BEGIN
    PERFORM pg_advisory_xact_lock(1668247411, 0);
    snap := pg_current_snapshot();
    DELETE FROM coord.applied_ahead AS a USING coord.projector_versions AS v
    WHERE v.status = 'active' AND v.mode = 'inline' AND a.name = v.name AND a.version = v.version;
    INSERT INTO coord.applied_ahead (name, version, position, xact_id, inline)
    SELECT v.name, v.version, e.position, e.xact_id, true
    FROM coord.projector_versions AS v
    JOIN coord.events AS e ON e.event_type = ANY(v.event_types)
    WHERE v.status = 'active' AND v.mode = 'inline'
      AND e.xact_id >= pg_snapshot_xmin(snap) AND pg_visible_in_snapshot(e.xact_id, snap);
    UPDATE coord.projector_versions
    SET horizon = pg_snapshot_xmin(snap), pass_snapshot = NULL, pass_cursor = NULL,
        last_position = greatest(last_position, coalesce((SELECT max(e.position) FROM coord.events AS e), 0)),
        updated_at = now()
    WHERE status = 'active' AND mode = 'inline';
END
$$;
SELECT coord.v4_record_inline_applied();
