-- wharf-sdk outbox, version 1: the table the relay claims from (see docs/outbox-contract.md).
CREATE TABLE IF NOT EXISTS wharf_outbox (
    seq BIGSERIAL PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    exchange TEXT NOT NULL,
    routing_key TEXT NOT NULL,
    ordering_key TEXT,
    headers TEXT NOT NULL DEFAULT '{}',
    content_type TEXT,
    body BYTEA NOT NULL,
    created_at BIGINT NOT NULL,
    status SMALLINT NOT NULL DEFAULT 0,
    claimed_by TEXT,
    claimed_until BIGINT,
    attempts INTEGER NOT NULL DEFAULT 0,
    refusals INTEGER NOT NULL DEFAULT 0,
    sent_at BIGINT,
    failure TEXT);
CREATE INDEX IF NOT EXISTS wharf_outbox_pending ON wharf_outbox (seq) WHERE status = 0;
CREATE INDEX IF NOT EXISTS wharf_outbox_unsent_by_key ON wharf_outbox (ordering_key, seq) WHERE status <> 1;
CREATE INDEX IF NOT EXISTS wharf_outbox_sent ON wharf_outbox (sent_at) WHERE status = 1;
