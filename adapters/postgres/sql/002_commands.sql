-- Commands (edit, react, delete) are events in the chat's seq stream, stored as rows of
-- messages with kind = the op and target_id = the message they act on; their effect is
-- applied to the target in the same transaction (edited body, tombstone, reactions).
ALTER TABLE messages ADD COLUMN target_id text;
ALTER TABLE messages ADD COLUMN data jsonb;

CREATE TABLE reactions (
    message_id  text NOT NULL,
    user_id     text NOT NULL,
    emoji       text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (message_id, user_id, emoji)
);
