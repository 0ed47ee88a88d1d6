-- The last `clientRequestId` that started a run of the session (docs/protocol.md
-- §Idempotent sends), with that run: a resend after the registry lost its record of
-- the key (a restarted single node, a Redis that came back empty after the run ended)
-- is still told its run instead of starting it again.
ALTER TABLE sessions ADD COLUMN last_request_key TEXT;
ALTER TABLE sessions ADD COLUMN last_request_run_id TEXT;
ALTER TABLE sessions ADD COLUMN last_request_seq BIGINT NOT NULL DEFAULT 0;
