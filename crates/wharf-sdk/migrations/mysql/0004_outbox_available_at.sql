-- wharf-sdk outbox, version 3: rows not to be published before a time (deliver_after).
ALTER TABLE wharf_outbox ADD COLUMN available_at BIGINT;
