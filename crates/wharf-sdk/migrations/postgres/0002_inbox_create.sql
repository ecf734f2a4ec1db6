-- wharf-sdk inbox, version 1: the ids each consumer processed, written with the effect.
CREATE TABLE IF NOT EXISTS wharf_inbox (
    consumer TEXT NOT NULL,
    message_id TEXT NOT NULL,
    processed_at BIGINT NOT NULL,
    PRIMARY KEY (consumer, message_id));
CREATE INDEX IF NOT EXISTS wharf_inbox_processed ON wharf_inbox (processed_at);
