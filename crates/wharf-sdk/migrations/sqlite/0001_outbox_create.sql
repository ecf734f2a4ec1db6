-- wharf-sdk outbox, version 1: the table the relay claims from (see docs/outbox-contract.md).
CREATE TABLE IF NOT EXISTS wharf_outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    exchange TEXT NOT NULL,
    routing_key TEXT NOT NULL,
    ordering_key TEXT,
    headers TEXT NOT NULL DEFAULT '{}',
    content_type TEXT,
    body BLOB NOT NULL,
    created_at INTEGER NOT NULL,
    status INTEGER NOT NULL DEFAULT 0,
    claimed_by TEXT,
    claimed_until INTEGER,
    attempts INTEGER NOT NULL DEFAULT 0,
    refusals INTEGER NOT NULL DEFAULT 0,
    sent_at INTEGER,
    failure TEXT);
CREATE INDEX IF NOT EXISTS wharf_outbox_pending ON wharf_outbox (seq) WHERE status = 0;
CREATE INDEX IF NOT EXISTS wharf_outbox_unsent_by_key ON wharf_outbox (ordering_key, seq) WHERE status <> 1;
CREATE INDEX IF NOT EXISTS wharf_outbox_sent ON wharf_outbox (sent_at) WHERE status = 1;
