-- Chats, members with delivery pointers, messages, and the delivery outbox.
CREATE TABLE chats (
    id          text PRIMARY KEY,
    title       text,
    created_by  text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    last_seq    bigint NOT NULL DEFAULT 0
);

-- One row per member. delivered_seq / read_seq: everything up to that seq was received /
-- read by the user (cumulative receipts, as Tinode keeps them): a receipt is one UPDATE of
-- one row, and replay is "seq > delivered_seq".
CREATE TABLE chat_members (
    chat_id        text NOT NULL REFERENCES chats(id),
    user_id        text NOT NULL,
    delivered_seq  bigint NOT NULL DEFAULT 0,
    read_seq       bigint NOT NULL DEFAULT 0,
    joined_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (chat_id, user_id)
);
CREATE INDEX chat_members_by_user ON chat_members (user_id);

CREATE TABLE messages (
    chat_id     text NOT NULL REFERENCES chats(id),
    seq         bigint NOT NULL,
    id          text NOT NULL UNIQUE,
    sender_id   text NOT NULL,
    client_id   text NOT NULL,
    kind        text NOT NULL DEFAULT 'text',
    body        text,
    attachment  jsonb,
    created_at  timestamptz NOT NULL,
    edited_at   timestamptz,
    deleted_at  timestamptz,
    PRIMARY KEY (chat_id, seq),
    UNIQUE (sender_id, client_id)
);

-- One entry per chat per persisted batch, covering a seq range. Removed by the delivery
-- stage once the range was handed to the hub; the relay takes entries left behind.
CREATE TABLE outbox (
    id            bigserial PRIMARY KEY,
    chat_id       text NOT NULL,
    from_seq      bigint NOT NULL,
    to_seq        bigint NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    available_at  timestamptz NOT NULL DEFAULT now(),
    attempts      integer NOT NULL DEFAULT 0
);
CREATE INDEX outbox_available ON outbox (available_at);
