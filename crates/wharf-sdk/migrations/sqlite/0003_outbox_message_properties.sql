-- wharf-sdk outbox, version 2: the AMQP type (a typed message's name), correlation id and reply-to.
ALTER TABLE wharf_outbox ADD COLUMN message_type TEXT;
ALTER TABLE wharf_outbox ADD COLUMN correlation_id TEXT;
ALTER TABLE wharf_outbox ADD COLUMN reply_to TEXT;
