//! Where a PostgreSQL `--database-url` leads and how it is secured, for clear start-up errors.
//!
//! TLS follows libpq's settings, read by sqlx's PostgreSQL driver (rustls, `ring`): `sslmode`
//! (`disable`, `prefer` (the default), `require`, `verify-ca`, `verify-full`) and `sslrootcert`
//! (a PEM CA file) in the URL, else the `PGSSLMODE` and `PGSSLROOTCERT` environment variables.
//! `verify-ca` and `verify-full` trust the system's roots plus `sslrootcert`; `verify-full`
//! also checks that the certificate names the URL's host. A failed connection is reported
//! with the server, the database and these settings (never the password), and with what a
//! TLS failure means; an unreadable `sslrootcert` is reported before any connection.

use std::{fmt, path::PathBuf, str::FromStr};

use sqlx::{
    ConnectOptions,
    postgres::{PgConnectOptions, PgSslMode},
};

use super::StoreError;

/// The CA bundle the certificate is checked against, besides the system's roots.
#[derive(Debug, Clone, PartialEq, Eq)]
enum RootCert {
    /// A PEM file (`sslrootcert=/path`).
    File(PathBuf),
    /// PEM text given in place of a path (`PGSSLROOTCERT` holding the certificates).
    Inline,
}

/// A PostgreSQL URL's server, database and TLS settings, without its password.
#[derive(Debug, Clone)]
pub(crate) struct PgTarget {
    user: String,
    /// `host:port`, or the Unix socket's directory.
    server: String,
    host: String,
    database: Option<String>,
    ssl_mode: PgSslMode,
    root_cert: Option<RootCert>,
}

impl PgTarget {
    /// The target of `url` (with the `PG*` variables the driver reads).
    pub(crate) fn parse(url: &str) -> Result<PgTarget, sqlx::Error> {
        let options = PgConnectOptions::from_str(url)?;
        let server = match options.get_socket() {
            Some(socket) => socket.display().to_string(),
            None => format!("{}:{}", options.get_host(), options.get_port()),
        };
        // The options have no getter for it: their lossy URL names it (`file: <path>` or the PEM).
        let root_cert = options.to_url_lossy().query_pairs().find(|(key, _)| key == "sslrootcert").map(|(_, value)| {
            match value.strip_prefix("file: ") {
                Some(path) => RootCert::File(PathBuf::from(path)),
                None => RootCert::Inline,
            }
        });
        Ok(PgTarget {
            user: options.get_username().to_string(),
            server,
            host: options.get_host().to_string(),
            database: options.get_database().map(str::to_string),
            ssl_mode: options.get_ssl_mode(),
            root_cert,
        })
    }

    /// Whether the server's certificate is checked against a CA (`verify-ca`, `verify-full`).
    fn verifies(&self) -> bool {
        matches!(self.ssl_mode, PgSslMode::VerifyCa | PgSslMode::VerifyFull)
    }

    /// Before connecting: a `sslrootcert` file that a verifying mode would use must be
    /// readable and hold a PEM certificate (else the driver fails later with a bare I/O
    /// error, or silently trusts only the system's roots).
    pub(crate) fn check_root_cert(&self) -> Result<(), StoreError> {
        let Some(RootCert::File(path)) = &self.root_cert else { return Ok(()) };
        if !self.verifies() {
            return Ok(());
        }
        let problem = match std::fs::read(path) {
            Err(e) => format!("cannot read it: {e}"),
            Ok(pem) if !String::from_utf8_lossy(&pem).contains("-----BEGIN CERTIFICATE-----") => {
                "it holds no PEM certificate (-----BEGIN CERTIFICATE-----)".to_string()
            }
            Ok(_) => return Ok(()),
        };
        Err(StoreError::RootCert { target: self.to_string(), path: path.display().to_string(), problem })
    }

    /// `error`, a failed first connection, named with this target and explained.
    pub(crate) fn connect_error(&self, error: sqlx::Error) -> StoreError {
        let problem = match self.explain(&error) {
            Some(hint) => format!("{hint} ({error})"),
            None => error.to_string(),
        };
        StoreError::Connect { target: self.to_string(), problem, source: error }
    }

    /// What a TLS failure (or a refusal of plaintext) means, in the gateway's terms.
    fn explain(&self, error: &sqlx::Error) -> Option<String> {
        let mode = ssl_mode_name(self.ssl_mode);
        if let Some(tls) = rustls_error(error) {
            let why = match tls {
                rustls::Error::InvalidCertificate(cert) => match cert {
                    // BadSignature: a CA of the same name as the real issuer, but another key.
                    rustls::CertificateError::UnknownIssuer | rustls::CertificateError::BadSignature => {
                        "the server's certificate is not signed by a trusted CA (sslrootcert / PGSSLROOTCERT, or \
                         the system's roots)"
                            .to_string()
                    }
                    rustls::CertificateError::NotValidForName
                    | rustls::CertificateError::NotValidForNameContext { .. } => format!(
                        "the server's certificate does not name the host {} (sslmode=verify-full checks the URL's \
                         host; use the name the certificate was issued for)",
                        self.host
                    ),
                    rustls::CertificateError::Expired | rustls::CertificateError::ExpiredContext { .. } => {
                        "the server's certificate has expired".to_string()
                    }
                    rustls::CertificateError::NotValidYet | rustls::CertificateError::NotValidYetContext { .. } => {
                        "the server's certificate is not valid yet (check the clocks)".to_string()
                    }
                    _ => "the server's certificate was refused".to_string(),
                },
                _ => "the TLS handshake failed".to_string(),
            };
            return Some(format!("TLS: {why}"));
        }
        match error {
            sqlx::Error::Tls(inner) if inner.to_string().contains("does not support TLS") => Some(format!(
                "TLS: the server does not offer TLS (its `ssl` setting is off), which sslmode={mode} requires"
            )),
            sqlx::Error::Database(db)
                if db.message().contains("no encryption")
                    && matches!(self.ssl_mode, PgSslMode::Disable | PgSslMode::Allow) =>
            {
                Some(format!(
                    "the server accepts TLS connections only, and sslmode={mode} does not use TLS: use \
                     sslmode=verify-full (or require)"
                ))
            }
            _ => None,
        }
    }
}

impl fmt::Display for PgTarget {
    /// `PostgreSQL user@host:port/database (sslmode=…, sslrootcert …)`: no password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PostgreSQL {}@{}", self.user, self.server)?;
        if let Some(database) = &self.database {
            write!(f, "/{database}")?;
        }
        write!(f, " (sslmode={}", ssl_mode_name(self.ssl_mode))?;
        match &self.root_cert {
            Some(RootCert::File(path)) => write!(f, ", sslrootcert={}", path.display())?,
            Some(RootCert::Inline) => write!(f, ", sslrootcert=<PEM text>")?,
            None => {}
        }
        write!(f, ")")
    }
}

fn ssl_mode_name(mode: PgSslMode) -> &'static str {
    match mode {
        PgSslMode::Disable => "disable",
        PgSslMode::Allow => "allow",
        PgSslMode::Prefer => "prefer",
        PgSslMode::Require => "require",
        PgSslMode::VerifyCa => "verify-ca",
        PgSslMode::VerifyFull => "verify-full",
    }
}

/// The rustls error behind a failed handshake: the driver returns it inside an I/O error
/// (`error communicating with database: …`) or, for its own checks, a TLS error.
fn rustls_error(error: &sqlx::Error) -> Option<&rustls::Error> {
    let inner: &(dyn std::error::Error + 'static) = match error {
        sqlx::Error::Io(io) => io.get_ref()?,
        sqlx::Error::Tls(tls) => tls.as_ref(),
        _ => return None,
    };
    let mut cause = Some(inner);
    while let Some(current) = cause {
        if let Some(tls) = current.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        cause = current.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_target_names_server_database_and_tls_settings_but_never_the_password() {
        let target =
            PgTarget::parse("postgres://app:s3cr3t@db.internal:6432/chat?sslmode=verify-full&sslrootcert=/etc/ca.crt")
                .unwrap();
        let shown = target.to_string();
        assert_eq!(shown, "PostgreSQL app@db.internal:6432/chat (sslmode=verify-full, sslrootcert=/etc/ca.crt)");
        assert!(!shown.contains("s3cr3t"));
        let prefer = PgTarget::parse("postgresql://app@db/chat").unwrap();
        assert!(prefer.to_string().starts_with("PostgreSQL app@db:5432/chat (sslmode="), "{prefer}");
    }

    #[test]
    fn an_unreadable_or_empty_root_cert_is_refused_before_connecting() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.crt");
        let url = format!("postgres://app@db/chat?sslmode=verify-full&sslrootcert={}", missing.display());
        let error = PgTarget::parse(&url).unwrap().check_root_cert().unwrap_err().to_string();
        assert!(error.contains("sslrootcert") && error.contains("cannot read it"), "{error}");
        let empty = dir.path().join("empty.crt");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let url = format!("postgres://app@db/chat?sslmode=verify-ca&sslrootcert={}", empty.display());
        let error = PgTarget::parse(&url).unwrap().check_root_cert().unwrap_err().to_string();
        assert!(error.contains("no PEM certificate"), "{error}");
        // `require` does not check the certificate, so it does not read the file either.
        let url = format!("postgres://app@db/chat?sslmode=require&sslrootcert={}", missing.display());
        PgTarget::parse(&url).unwrap().check_root_cert().unwrap();
    }
}
