-- V9: coord.event_errors, which a set-based check ([projector.batch_checks])
-- calls to name the events of a batch that must not be applied
-- (docs/decisions/0089-set-based-checks-name-failing-events.md).
--
-- Raises SQLSTATE CO007 when `positions` holds any: the message names the
-- first failing event and how many more there are; the DETAIL is JSON
-- {"positions": [...], "messages": [...]} (same order), which a replay
-- reads to park exactly those events (or, under on_error = "fail", to stop
-- just before the first) without searching the batch. With no positions
-- it does nothing. coord.publish raises it to the caller as it is.

CREATE FUNCTION coord.event_errors(positions bigint[], messages text[])
RETURNS void
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    n integer := coalesce(cardinality(positions), 0);
BEGIN
    IF n = 0 THEN
        RETURN;
    END IF;
    RAISE EXCEPTION USING
        ERRCODE = 'CO007',
        MESSAGE = format('event at position %s: %s%s', positions[1], messages[1],
            CASE WHEN n > 1 THEN format(' (and %s more failing events)', n - 1) ELSE '' END),
        DETAIL = jsonb_build_object('positions', to_jsonb(positions), 'messages', to_jsonb(messages))::text;
END
$$;
