-- coord.publish runs set-based batch handlers too (issue 11).
-- See docs/decisions/0041-sql-publish-runs-batch-handlers.md.
--
-- The stored definition of a config-defined version gains a key:
--   {"handlers": {type: sql}, "batch_handlers": [{"event_type": t, "sql": s}, ...]}
-- where s is the batch statement with its `batch_events` CTE in front, an
-- unnest of $1..$7 as arrays (text[], bigint[], bigint[], text[], jsonb[],
-- jsonb[], timestamptz[]), exactly as the Rust publisher sends it inline.
-- "batch_handlers" is in file order. Versions registered before V5 with
-- batch handlers stored no definition (NULL) and stay with the follower
-- until a command stores their definition (same fingerprint, so the same
-- statements); coord.inline_runnable keeps each stream's applied events a
-- prefix of it across that change.
--
-- Only the handler loop differs from V4's coord.publish.

CREATE OR REPLACE FUNCTION coord.publish(projectors jsonb, stream_id text, expected_version bigint, events jsonb)
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
    b record;
    handler text;
    caller_path text;
    stream_ids text[];
    n integer;
    run_first integer;
    run_last integer;
    b_streams text[];
    b_versions bigint[];
    b_positions bigint[];
    b_types text[];
    b_datas jsonb[];
    b_metas jsonb[];
    b_recorded timestamptz[];
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
        n := cardinality(positions);
        stream_ids := array_fill(stream_id, ARRAY[n]);
        FOR p IN
            SELECT v.name, v.version, v.event_types, v.schema_name,
                   coalesce(v.definition -> 'handlers', '{}') AS handlers,
                   coalesce(v.definition -> 'batch_handlers', '[]') AS batch,
                   ARRAY(SELECT h ->> 'event_type' FROM jsonb_array_elements(v.definition -> 'batch_handlers') AS h) AS batch_types
            FROM coord.projector_versions AS v
            WHERE v.name = ANY(runnable)
              AND v.version = coalesce(projectors -> v.name ->> 'version', projectors ->> v.name)
              AND (v.definition ? 'handlers' OR v.definition ? 'batch_handlers')
            ORDER BY v.name
        LOOP
            PERFORM set_config('search_path', quote_ident(p.schema_name), true);
            -- As SqlProjector::apply: events with per-event handlers split
            -- the publish into runs; each run of consecutive events with
            -- batch handlers gets each batch statement once (in the order
            -- stored, over the run's events of its type), per-event
            -- statements run in position order between runs. Events of
            -- other types neither run anything nor split a run.
            run_first := NULL;
            FOR i IN 1 .. n + 1 LOOP
                handler := NULL;
                IF i <= n THEN
                    handler := p.handlers ->> event_types[i];
                    IF handler IS NULL THEN
                        IF event_types[i] = ANY(p.batch_types) THEN
                            run_first := coalesce(run_first, i);
                            run_last := i;
                        END IF;
                        CONTINUE;
                    END IF;
                END IF;
                IF run_first IS NOT NULL THEN
                    FOR b IN
                        SELECT h ->> 'event_type' AS event_type, h ->> 'sql' AS sql
                        FROM jsonb_array_elements(p.batch) WITH ORDINALITY AS x(h, ord)
                        ORDER BY x.ord
                    LOOP
                        SELECT array_agg(u.s ORDER BY u.o), array_agg(u.sv ORDER BY u.o), array_agg(u.pos ORDER BY u.o),
                               array_agg(u.t ORDER BY u.o), array_agg(u.d ORDER BY u.o), array_agg(u.m ORDER BY u.o),
                               array_agg(u.r ORDER BY u.o)
                        INTO b_streams, b_versions, b_positions, b_types, b_datas, b_metas, b_recorded
                        FROM unnest(stream_ids, versions, positions, event_types, datas, metas, recorded)
                             WITH ORDINALITY AS u(s, sv, pos, t, d, m, r, o)
                        WHERE u.o BETWEEN run_first AND run_last AND u.t = b.event_type;
                        IF b_positions IS NOT NULL THEN
                            -- The statement carries its batch_events CTE over
                            -- $1..$7 as arrays (stored at registration).
                            EXECUTE b.sql USING b_streams, b_versions, b_positions, b_types, b_datas, b_metas, b_recorded;
                        END IF;
                    END LOOP;
                    run_first := NULL;
                END IF;
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

