-- wharf-sdk outbox, version 4 (MySQL only): one row per ordering key, locked by each writer of
-- the key until its commit, so seq order is commit order. (PostgreSQL uses an advisory lock;
-- SQLite serialises writers anyway; MySQL has no transaction-scoped advisory lock.)
CREATE TABLE IF NOT EXISTS wharf_outbox_keys (
    ordering_key VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL PRIMARY KEY
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;
