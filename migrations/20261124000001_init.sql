-- Sessions and their durable history. Portable between SQLite and PostgreSQL:
-- only TEXT and BIGINT columns, times in milliseconds since the Unix epoch.
CREATE TABLE IF NOT EXISTS sessions (
    session_id          TEXT PRIMARY KEY,
    user_id             TEXT NOT NULL,
    provider            TEXT NOT NULL,
    provider_session_id TEXT,
    project_path        TEXT NOT NULL,
    summary             TEXT NOT NULL DEFAULT '',
    is_archived         BIGINT NOT NULL DEFAULT 0,
    created_at          BIGINT NOT NULL,
    updated_at          BIGINT NOT NULL,
    last_seq            BIGINT NOT NULL DEFAULT 0
);

CREATE INDEX IF NOT EXISTS idx_sessions_user ON sessions (user_id, is_archived, created_at);

-- One row per stored event (part 1) or user prompt (part 0, placed before the
-- run's first event). body is the event JSON without its seq.
CREATE TABLE IF NOT EXISTS messages (
    session_id TEXT NOT NULL,
    seq        BIGINT NOT NULL,
    part       BIGINT NOT NULL,
    kind       TEXT NOT NULL,
    body       TEXT NOT NULL,
    PRIMARY KEY (session_id, seq, part)
);
