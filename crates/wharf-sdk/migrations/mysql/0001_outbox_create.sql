-- wharf-sdk outbox, version 1: the table the relay claims from (see docs/outbox-contract.md).
-- MySQL 8 and MariaDB 10.6+ (SKIP LOCKED). Writers always set headers ('{}' for none). Ids and
-- keys compare byte for byte (utf8mb4_bin): a case-insensitive default collation would take two
-- different ids for one.
CREATE TABLE IF NOT EXISTS wharf_outbox (
    seq BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
    id VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    exchange VARCHAR(255) NOT NULL,
    routing_key VARCHAR(255) NOT NULL,
    ordering_key VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin,
    headers MEDIUMTEXT NOT NULL,
    content_type VARCHAR(255),
    body LONGBLOB NOT NULL,
    created_at BIGINT NOT NULL,
    status SMALLINT NOT NULL DEFAULT 0,
    claimed_by VARCHAR(64),
    claimed_until BIGINT,
    attempts INT NOT NULL DEFAULT 0,
    refusals INT NOT NULL DEFAULT 0,
    sent_at BIGINT,
    failure TEXT,
    UNIQUE KEY wharf_outbox_id (id),
    KEY wharf_outbox_pending (status, seq),
    KEY wharf_outbox_unsent_by_key (ordering_key, status, seq),
    KEY wharf_outbox_sent (status, sent_at)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;
