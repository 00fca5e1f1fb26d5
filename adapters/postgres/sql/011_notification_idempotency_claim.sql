-- Which request holds an in-flight idempotency key: a request that takes over an
-- abandoned key gets a new claim, so the one it replaced can no longer commit under it.
ALTER TABLE notification_idempotency ADD COLUMN claim_id uuid;
