-- Attachment checks claim their record: pending → verifying under a claim token, so a
-- repeated storage event, a concurrent /complete or the expiry sweep cannot take a record
-- that is being checked (a claim older than the lease is presumed dead and may be taken
-- over). A deleted attachment message marks its attachment 'deleted'; the relay then
-- removes the bytes and sets removed_at.
ALTER TABLE attachments ADD COLUMN claim text;
ALTER TABLE attachments ADD COLUMN claimed_at timestamptz;
ALTER TABLE attachments ADD COLUMN removed_at timestamptz;
CREATE INDEX attachments_verifying ON attachments (claimed_at) WHERE state = 'verifying';
CREATE INDEX attachments_to_remove ON attachments (created_at)
    WHERE state = 'deleted' AND removed_at IS NULL;

-- Deleting a message also clears the bodies of its edit events: find them by target.
CREATE INDEX messages_by_target ON messages (target_id) WHERE target_id IS NOT NULL;
