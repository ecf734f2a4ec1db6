-- wharf-sdk inbox, version 1: the ids each consumer processed, written with the effect.
CREATE TABLE IF NOT EXISTS wharf_inbox (
    consumer VARCHAR(191) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    message_id VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    processed_at BIGINT NOT NULL,
    PRIMARY KEY (consumer, message_id),
    KEY wharf_inbox_processed (processed_at)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;
