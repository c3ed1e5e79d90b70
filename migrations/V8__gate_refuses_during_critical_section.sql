-- V8: a publisher that meets a critical section in progress gets the
-- retryable ProjectorIsActivating at once instead of queueing on its type
-- lock (docs/decisions/0034-critical-section-attempts.md). coord.gate_inline
-- is V4's with only the lock section changed: type keys are tried first.

-- Raises CO003 when a projector is activating a version that concerns
-- `event_types` (NULL: any type), as coord.gate_inline would after its locks.
CREATE FUNCTION coord.refuse_if_activating(projectors jsonb, event_types text[])
RETURNS void
LANGUAGE plpgsql VOLATILE AS $$
#variable_conflict use_variable
DECLARE
    r record;
    entry jsonb;
BEGIN
    FOR r IN
        SELECT s.name, s.active_version, s.activating_version
        FROM coord.projector_states AS s
        WHERE s.activating_version IS NOT NULL AND (
            event_types IS NULL
            OR NOT EXISTS (
                SELECT 1 FROM coord.projector_versions AS v
                WHERE v.name = s.name AND v.version = s.activating_version)
            OR EXISTS (
                SELECT 1 FROM coord.projector_versions AS v
                WHERE v.name = s.name
                  AND v.version IN (s.activating_version, s.active_version)
                  AND v.event_types && event_types))
        ORDER BY s.name
        LIMIT 1
    LOOP
        entry := projectors -> r.name;
        PERFORM coord.refuse('CO003',
            format('projector %s is activating %s: publishing its events is held back for a moment; retry', r.name, r.activating_version),
            jsonb_build_object('projector', r.name,
                               'running', CASE WHEN jsonb_typeof(entry) = 'object' THEN entry ->> 'version' ELSE entry #>> '{}' END,
                               'activating', r.activating_version, 'active', r.active_version));
    END LOOP;
END
$$;

CREATE OR REPLACE FUNCTION coord.gate_inline(projectors jsonb, event_types text[] DEFAULT NULL)
RETURNS text[]
LANGUAGE plpgsql VOLATILE AS $$
#variable_conflict use_variable
DECLARE
    r record;
    entry jsonb;
    running text;
    fingerprint text;
    inline text[] := '{}';
    h integer;
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

    -- Type keys (or the wildcard key) first, then the global key. A type key
    -- held exclusively belongs to a critical section in progress: when the
    -- state says that an activation concerns these types, refuse at once
    -- (retryable) instead of queueing behind it (decision 0034); otherwise
    -- (rebuild, retire) wait for it as before.
    IF event_types IS NULL THEN
        IF NOT pg_try_advisory_xact_lock_shared(1668247411, 1) THEN
            PERFORM coord.refuse_if_activating(projectors, event_types);
            PERFORM pg_advisory_xact_lock_shared(1668247411, 1);
        END IF;
    ELSIF cardinality(event_types) = 1 THEN
        IF NOT pg_try_advisory_xact_lock_shared(1668247410, hashtext(event_types[1])) THEN
            PERFORM coord.refuse_if_activating(projectors, event_types);
            PERFORM pg_advisory_xact_lock_shared(1668247410, hashtext(event_types[1]));
        END IF;
    ELSE
        FOR h IN SELECT DISTINCT hashtext(t) FROM unnest(event_types) AS t ORDER BY 1 LOOP
            IF NOT pg_try_advisory_xact_lock_shared(1668247410, h) THEN
                PERFORM coord.refuse_if_activating(projectors, event_types);
                PERFORM pg_advisory_xact_lock_shared(1668247410, h);
            END IF;
        END LOOP;
    END IF;
    PERFORM pg_advisory_xact_lock_shared(1668247411, 0);

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
