-- Attachments: created by the first phase (metadata + upload URL), finished by the storage
-- webhook or /complete (verify, scan, technical chat message).
CREATE TABLE attachments (
    id            text PRIMARY KEY,
    chat_id       text NOT NULL REFERENCES chats(id),
    uploader      text NOT NULL,
    client_id     text NOT NULL,
    object_key    text NOT NULL UNIQUE,
    file_name     text NOT NULL,
    content_type  text NOT NULL,
    size          bigint NOT NULL,
    state         text NOT NULL DEFAULT 'pending',  -- pending | ready | rejected | expired
    reason        text,
    upload_token  text NOT NULL,
    expires_at    timestamptz NOT NULL,
    message_id    text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    UNIQUE (uploader, client_id)
);
CREATE INDEX attachments_pending ON attachments (expires_at) WHERE state = 'pending';
