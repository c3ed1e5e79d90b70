-- The publisher gate, callable from any language. See docs/decisions/0003-gate-locks.md.
--
-- Lock keys (pg_advisory_xact_lock*(classid, objid)):
--   (1668247410, hashtext(event_type))  one per event type
--   (1668247411, 1)                     publishers that did not name their event types
--   (1668247411, 0)                     every publisher (taken last, shared)
-- Publishers take them shared, activation exclusive, always in this order, so
-- the two never deadlock and publishers never wait for each other.

-- Semantic-version precedence (semver.org section 11): -1, 0 or 1.
-- Build metadata is ignored, as the specification says.
CREATE FUNCTION coord.semver_cmp(a text, b text) RETURNS integer
LANGUAGE plpgsql IMMUTABLE STRICT AS $$
DECLARE
    re constant text := '^(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)(?:-([0-9A-Za-z.-]+))?(?:\+[0-9A-Za-z.-]+)?$';
    ma text[] := regexp_match(a, re);
    mb text[] := regexp_match(b, re);
    pa text[];
    pb text[];
    x text;
    y text;
    i integer;
BEGIN
    IF ma IS NULL OR mb IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = format('coord: %L is not a semantic version', CASE WHEN ma IS NULL THEN a ELSE b END);
    END IF;
    FOR i IN 1..3 LOOP
        IF ma[i]::numeric <> mb[i]::numeric THEN
            RETURN sign(ma[i]::numeric - mb[i]::numeric)::integer;
        END IF;
    END LOOP;
    IF ma[4] IS NULL AND mb[4] IS NULL THEN RETURN 0; END IF;
    IF ma[4] IS NULL THEN RETURN 1; END IF;
    IF mb[4] IS NULL THEN RETURN -1; END IF;
    pa := string_to_array(ma[4], '.');
    pb := string_to_array(mb[4], '.');
    FOR i IN 1..least(cardinality(pa), cardinality(pb)) LOOP
        x := pa[i];
        y := pb[i];
        CONTINUE WHEN x = y;
        IF x ~ '^[0-9]+$' AND y ~ '^[0-9]+$' THEN
            RETURN sign(x::numeric - y::numeric)::integer;
        ELSIF x ~ '^[0-9]+$' THEN
            RETURN -1;
        ELSIF y ~ '^[0-9]+$' THEN
            RETURN 1;
        ELSE
            RETURN CASE WHEN x COLLATE "C" < y COLLATE "C" THEN -1 ELSE 1 END;
        END IF;
    END LOOP;
    RETURN sign(cardinality(pa) - cardinality(pb))::integer;
END
$$;

-- The gate. Returns the names of the publisher's projectors that are active at
-- the publisher's version (the ones it must run inline); raises CO001..CO004
-- when publishing is refused. DETAIL carries a JSON object with the projector
-- and versions, for clients that want them typed.
CREATE FUNCTION coord.gate(projectors jsonb, event_types text[] DEFAULT NULL)
RETURNS text[]
LANGUAGE plpgsql VOLATILE AS $$
#variable_conflict use_variable
DECLARE
    r record;
    running text;
    inline text[] := '{}';
BEGIN
    IF projectors IS NULL OR jsonb_typeof(projectors) <> 'object' THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = 'coord.check_publish: projectors must be a JSON object mapping projector name to version, e.g. {"balances": "1.0.0"}';
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
        SELECT s.name, s.active_version, s.activating_version
        FROM coord.projector_states AS s
        WHERE s.active_version IS NOT NULL OR s.activating_version IS NOT NULL
        ORDER BY s.name
    LOOP
        running := projectors ->> r.name;
        IF running IS NULL THEN
            RAISE EXCEPTION USING ERRCODE = 'CO004',
                MESSAGE = format('projector %s is active at %s but this publisher''s configuration does not have it: this code is older than the database; route traffic to the new deployment',
                                 r.name, coalesce(r.active_version, r.activating_version)),
                DETAIL = jsonb_build_object('projector', r.name, 'active', coalesce(r.active_version, r.activating_version))::text;
        END IF;
        IF r.activating_version IS NOT NULL AND (
            event_types IS NULL OR EXISTS (
                SELECT 1 FROM coord.projector_versions AS v
                WHERE v.name = r.name
                  AND v.version IN (r.activating_version, r.active_version)
                  AND v.event_types && event_types))
        THEN
            RAISE EXCEPTION USING ERRCODE = 'CO003',
                MESSAGE = format('projector %s is activating %s: publishing its events is held back for a moment; retry', r.name, r.activating_version),
                DETAIL = jsonb_build_object('projector', r.name, 'running', running, 'activating', r.activating_version, 'active', r.active_version)::text;
        END IF;
        IF r.active_version IS NULL THEN
            CONTINUE;
        END IF;
        IF running = r.active_version THEN
            inline := inline || r.name;
        ELSIF coord.semver_cmp(running, r.active_version) > 0 THEN
            RAISE EXCEPTION USING ERRCODE = 'CO002',
                MESSAGE = format('projector %s %s is not yet active: %s is active; activate the new version before this code publishes', r.name, running, r.active_version),
                DETAIL = jsonb_build_object('projector', r.name, 'running', running, 'active', r.active_version)::text;
        ELSE
            RAISE EXCEPTION USING ERRCODE = 'CO001',
                MESSAGE = format('projector %s %s is stale: %s is active; route traffic to the new deployment', r.name, running, r.active_version),
                DETAIL = jsonb_build_object('projector', r.name, 'running', running, 'active', r.active_version)::text;
        END IF;
    END LOOP;
    RETURN inline;
END
$$;

-- The gate for publishers not written in Rust: call it, then insert into
-- coord.events, in the same READ COMMITTED transaction.
CREATE FUNCTION coord.check_publish(projectors jsonb, event_types text[] DEFAULT NULL)
RETURNS void
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    PERFORM coord.gate(projectors, event_types);
END
$$;
