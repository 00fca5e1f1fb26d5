-- Events for the event bus (PROTOCOL.md "Kafka"), written in the transaction that commits
-- what they describe; the relay publishes them and deletes each one only after the broker
-- acknowledged it. value is the encoded record (its eventId fixed), so a retry publishes
-- the same bytes. A row is leased (leased_until) while a relay publishes it.
CREATE TABLE event_outbox (
    id            bigserial PRIMARY KEY,
    event_id      text NOT NULL,
    key           text NOT NULL,
    value         text NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    leased_until  timestamptz,
    attempts      integer NOT NULL DEFAULT 0
);
-- Claims skip keys that have a row leased elsewhere, so one key's events keep their order.
CREATE INDEX event_outbox_key ON event_outbox (key) WHERE leased_until IS NOT NULL;
