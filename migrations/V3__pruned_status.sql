-- A retired or aborted version whose schema `coord prune` dropped.
ALTER TABLE coord.projector_versions DROP CONSTRAINT projector_versions_status;
ALTER TABLE coord.projector_versions ADD CONSTRAINT projector_versions_status CHECK
    (status IN ('replaying', 'activating', 'active', 'retired', 'aborted', 'pruned'));
