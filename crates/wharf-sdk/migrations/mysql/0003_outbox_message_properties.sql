-- wharf-sdk outbox, version 2: the AMQP type (a typed message's name), correlation id and reply-to.
ALTER TABLE wharf_outbox ADD COLUMN message_type VARCHAR(255) CHARACTER SET utf8mb4,
    ADD COLUMN correlation_id VARCHAR(255) CHARACTER SET utf8mb4, ADD COLUMN reply_to VARCHAR(255) CHARACTER SET utf8mb4;
