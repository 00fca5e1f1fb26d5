-- Notifications: what was accepted, what is still to be sent (outbox), every attempt,
-- and the idempotency keys of POST /v1/notifications.

CREATE TABLE notifications (
    id            uuid PRIMARY KEY,
    subject_id    text NOT NULL,
    subject_name  text,
    contacts      jsonb NOT NULL,
    message       text NOT NULL,
    is_immediate  boolean NOT NULL,
    strategy      text NOT NULL,
    state         text NOT NULL DEFAULT 'accepted',  -- accepted | processing | delivered | partially_delivered | failed
    progress      jsonb NOT NULL DEFAULT '[]',       -- per contact: {status, attempts, lastError}
    created_at    timestamptz NOT NULL,
    updated_at    timestamptz NOT NULL DEFAULT now(),
    finished_at   timestamptz
);
CREATE INDEX notifications_subject ON notifications (subject_id, created_at);

-- One row per notification not yet in a final state. A row is leased while a dispatcher
-- works on it; an expired lease (the process died) makes it claimable again.
CREATE TABLE notification_outbox (
    notification_id uuid PRIMARY KEY REFERENCES notifications(id) ON DELETE CASCADE,
    immediate       boolean NOT NULL,
    round           integer NOT NULL DEFAULT 0,
    due_at          timestamptz NOT NULL DEFAULT now(),
    lease_until     timestamptz
);
CREATE INDEX notification_outbox_due ON notification_outbox (due_at);

CREATE TABLE notification_attempts (
    id              bigserial PRIMARY KEY,
    notification_id uuid NOT NULL REFERENCES notifications(id) ON DELETE CASCADE,
    contact_index   integer NOT NULL,
    channel         text NOT NULL,
    attempt         integer NOT NULL,
    status          text NOT NULL,  -- delivered | transient | permanent | unavailable
    detail          text,
    duration_ms     double precision NOT NULL DEFAULT 0,
    at              timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX notification_attempts_of ON notification_attempts (notification_id, id);

CREATE TABLE notification_idempotency (
    subject_id      text NOT NULL,
    key             text NOT NULL,
    request_hash    text NOT NULL,
    status          text NOT NULL DEFAULT 'in_flight',  -- in_flight | done
    response_status integer,
    response_body   bytea,
    created_at      timestamptz NOT NULL DEFAULT now(),
    lease_until     timestamptz NOT NULL,
    expires_at      timestamptz NOT NULL,
    PRIMARY KEY (subject_id, key)
);
CREATE INDEX notification_idempotency_expiry ON notification_idempotency (expires_at);
