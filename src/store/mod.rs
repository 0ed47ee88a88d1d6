//! Sessions and durable history in SQL through sqlx (SQLite or PostgreSQL).
//!
//! One code path serves both databases through sqlx's `Any` driver: the
//! queries use `$N` placeholders and portable types (TEXT, BIGINT), and the
//! embedded migrations in `migrations/` run on either. Every session query is
//! scoped by the owner's user id, so another user's session looks absent.
//! PostgreSQL may be reached over TLS (libpq's `sslmode` and `sslrootcert`, see
//! `store/postgres.rs`); a failed first connection names the server and the TLS problem.

mod messages;
mod postgres;
mod sessions;

use std::{str::FromStr, time::Duration};

use sqlx::{
    AnyPool,
    any::{AnyConnectOptions, AnyPoolOptions},
};

pub use messages::{CONVERSATION_KINDS, DRAFT_PART, EVENT_PART, HistoryRow, HistoryView, MessagePage, PROMPT_PART};
pub use sessions::{LastRequest, NewSession, SessionRow};

/// Database failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// The first connection to PostgreSQL failed (`target` holds no password).
    #[error("cannot connect to {target}: {problem}")]
    Connect {
        target: String,
        problem: String,
        #[source]
        source: sqlx::Error,
    },
    /// The `sslrootcert` of a verifying `sslmode` cannot be used.
    #[error("cannot connect to {target}: sslrootcert {path}: {problem}")]
    RootCert { target: String, path: String, problem: String },
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

/// The embedded migrations.
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// A pool on the sessions database.
#[derive(Clone, Debug)]
pub struct Store {
    pool: AnyPool,
}

impl Store {
    /// Connects (creating a SQLite file when the URL says `mode=rwc`). A PostgreSQL URL's
    /// TLS settings come from it or from `PGSSLMODE` / `PGSSLROOTCERT` (see `store/postgres.rs`).
    pub async fn connect(url: &str) -> Result<Store, StoreError> {
        sqlx::any::install_default_drivers();
        let options = AnyConnectOptions::from_str(url)?;
        let postgres = if url.starts_with("postgres") { Some(postgres::PgTarget::parse(url)?) } else { None };
        if let Some(target) = &postgres {
            target.check_root_cert()?;
        }
        let sqlite = url.starts_with("sqlite:");
        let in_memory = sqlite && url.contains(":memory:");
        let pool = AnyPoolOptions::new()
            .max_connections(if in_memory {
                1
            } else if sqlite {
                4
            } else {
                16
            })
            .min_connections(if in_memory { 1 } else { 0 })
            .idle_timeout(if in_memory { None } else { Some(Duration::from_secs(300)) })
            .max_lifetime(if in_memory { None } else { Some(Duration::from_secs(1800)) })
            .acquire_timeout(Duration::from_secs(5))
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if sqlite && !in_memory {
                        sqlx::query("PRAGMA journal_mode = WAL").execute(&mut *conn).await?;
                        sqlx::query("PRAGMA busy_timeout = 5000").execute(&mut *conn).await?;
                    }
                    Ok(())
                })
            })
            .connect_with(options)
            .await
            .map_err(|error| match &postgres {
                Some(target) => target.connect_error(error),
                None => StoreError::Database(error),
            })?;
        Ok(Store { pool })
    }

    /// Applies the embedded migrations.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        MIGRATOR.run(&self.pool).await?;
        Ok(())
    }

    /// Checks the database answers (for `/readyz`).
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// Closes the pool.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> i64 {
    let now = time::OffsetDateTime::now_utc();
    (now.unix_timestamp_nanos() / 1_000_000) as i64
}

/// ISO-8601 (`…Z`, milliseconds) of a millisecond timestamp.
pub(crate) fn iso_ms(ms: i64) -> String {
    let format =
        time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z");
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(format).ok())
        .unwrap_or_default()
}
