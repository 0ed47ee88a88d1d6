//! A private `redis-server` that speaks only TLS (no persistence), with certificates made at
//! test time by `rcgen`: a CA, a server certificate for `127.0.0.1`/`localhost` and a client
//! certificate, all written as PEM files into a temporary directory. Client certificates
//! can be required (mutual TLS) and an ACL user with a password set, so that tests can check
//! refusals as well as success. Only the process started here is ever signalled; it is
//! killed, and the directory removed, when it is dropped.

use std::{
    path::{Path, PathBuf},
    process::Child,
};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

use crate::{
    ports::free_port,
    redis_proc::{START_WAIT, kill, spawn, tls_server_args, wait_until},
};

/// A CA and the certificates and keys it signed, as PEM text and as files.
#[derive(Clone)]
pub struct TestCerts {
    pub ca_pem: String,
    pub server_cert_pem: String,
    pub server_key_pem: String,
    pub client_cert_pem: String,
    pub client_key_pem: String,
    dir: PathBuf,
}

impl TestCerts {
    /// A fresh CA, a server certificate (SANs `127.0.0.1` and `localhost`, serverAuth) and a
    /// client certificate (clientAuth), written into `dir` as `ca.crt`, `server.{crt,key}`
    /// and `client.{crt,key}`.
    pub fn generate(dir: &Path) -> anyhow::Result<TestCerts> {
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.distinguished_name.push(DnType::CommonName, "chatgate test CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;
        let leaf = |names: Vec<String>, cn: &str, usage: ExtendedKeyUsagePurpose| -> anyhow::Result<(String, String)> {
            let mut params = CertificateParams::new(names)?;
            params.distinguished_name.push(DnType::CommonName, cn);
            params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
            params.extended_key_usages = vec![usage];
            let key = KeyPair::generate()?;
            Ok((params.signed_by(&key, &ca)?.pem(), key.serialize_pem()))
        };
        let names = vec!["127.0.0.1".to_string(), "localhost".to_string()];
        let (server_cert_pem, server_key_pem) = leaf(names, "127.0.0.1", ExtendedKeyUsagePurpose::ServerAuth)?;
        let (client_cert_pem, client_key_pem) =
            leaf(Vec::new(), "chatgate test client", ExtendedKeyUsagePurpose::ClientAuth)?;
        let certs = TestCerts {
            ca_pem: ca.pem(),
            server_cert_pem,
            server_key_pem,
            client_cert_pem,
            client_key_pem,
            dir: dir.to_path_buf(),
        };
        std::fs::write(certs.ca_path(), &certs.ca_pem)?;
        std::fs::write(certs.server_cert_path(), &certs.server_cert_pem)?;
        std::fs::write(certs.server_key_path(), &certs.server_key_pem)?;
        std::fs::write(certs.client_cert_path(), &certs.client_cert_pem)?;
        std::fs::write(certs.client_key_path(), &certs.client_key_pem)?;
        Ok(certs)
    }

    pub fn ca_path(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    pub fn server_cert_path(&self) -> PathBuf {
        self.dir.join("server.crt")
    }

    pub fn server_key_path(&self) -> PathBuf {
        self.dir.join("server.key")
    }

    pub fn client_cert_path(&self) -> PathBuf {
        self.dir.join("client.crt")
    }

    pub fn client_key_path(&self) -> PathBuf {
        self.dir.join("client.key")
    }
}

/// What a [`PrivateRedisTls`] asks of its clients.
#[derive(Clone, Debug, Default)]
pub struct TlsOptions {
    /// `--tls-auth-clients yes`: a client without a certificate signed by the CA is refused.
    pub require_client_cert: bool,
    /// An ACL user (name, password) with every permission, and the `default` user turned
    /// off, so that every client must `AUTH` as it.
    pub user: Option<(String, String)>,
}

/// A TLS-only `redis-server` owned by its creator.
pub struct PrivateRedisTls {
    port: u16,
    options: TlsOptions,
    certs: TestCerts,
    child: Option<Child>,
    _dir: tempfile::TempDir,
}

/// The process-wide server of [`PrivateRedisTls::shared`].
static SHARED: std::sync::OnceLock<Result<PrivateRedisTls, String>> = std::sync::OnceLock::new();

impl PrivateRedisTls {
    /// One TLS-only server, requiring client certificates and an ACL user (`chatgate`), for
    /// every test of this process that only uses it; it lives as long as the process (see
    /// [`crate::redis_cluster::PrivateRedisCluster::shared`]).
    pub fn shared() -> anyhow::Result<&'static PrivateRedisTls> {
        let shared = SHARED.get_or_init(|| {
            crate::redis_proc::process_wide("shared-redis-tls", || {
                let user = Some(("chatgate".to_string(), format!("pw-{}", rand::random::<u64>())));
                PrivateRedisTls::start_with(TlsOptions { require_client_cert: true, user })
            })
        });
        shared.as_ref().map_err(|e| anyhow::anyhow!("the shared TLS Redis did not start: {e}"))
    }

    /// A TLS-only server on a free port, requiring client certificates or not, no ACL user.
    pub fn start(require_client_cert: bool) -> anyhow::Result<PrivateRedisTls> {
        PrivateRedisTls::start_with(TlsOptions { require_client_cert, user: None })
    }

    /// A TLS-only server on a free port (`--port 0 --tls-port P`); returns once it answers
    /// `PING` over TLS.
    pub fn start_with(options: TlsOptions) -> anyhow::Result<PrivateRedisTls> {
        let dir = tempfile::tempdir()?;
        let certs = TestCerts::generate(dir.path())?;
        let port = free_port()?;
        let mut args = tls_server_args(port, &certs, options.require_client_cert);
        if let Some((name, password)) = &options.user {
            args.extend([
                "--user".into(),
                name.clone(),
                "on".into(),
                format!(">{password}"),
                "~*".into(),
                "&*".into(),
                "+@all".into(),
            ]);
            args.extend(["--user".into(), "default".into(), "off".into()]);
        }
        let mut child = spawn(dir.path(), "tls", &args)?;
        let mut redis = PrivateRedisTls { port, options, certs, child: None, _dir: dir };
        let ready = wait_for_ping_tls(&redis, &mut child);
        redis.child = Some(child);
        ready?;
        Ok(redis)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `rediss://127.0.0.1:P` (no credentials).
    pub fn url(&self) -> String {
        format!("rediss://127.0.0.1:{}", self.port)
    }

    /// `rediss://user:password@127.0.0.1:P` when an ACL user is set, else [`PrivateRedisTls::url`].
    pub fn url_with_auth(&self) -> String {
        match &self.options.user {
            Some((name, password)) => format!("rediss://{name}:{password}@127.0.0.1:{}", self.port),
            None => self.url(),
        }
    }

    /// The CA, server and client certificates and keys (PEM text and paths).
    pub fn certs(&self) -> &TestCerts {
        &self.certs
    }

    /// The ACL user (name, password), if any.
    pub fn user(&self) -> Option<(&str, &str)> {
        self.options.user.as_ref().map(|(n, p)| (n.as_str(), p.as_str()))
    }

    /// The server's pid while it runs (for its CPU time).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `redis-cli` arguments that reach this server over TLS with the CA and, when `with_cert`,
    /// the client certificate (and the ACL user's credentials, when set).
    pub fn cli_args(&self, with_cert: bool) -> Vec<String> {
        let path = |p: PathBuf| p.to_string_lossy().into_owned();
        let mut args = vec!["-h".into(), "127.0.0.1".into(), "-p".into(), self.port.to_string(), "--tls".into()];
        args.extend(["--cacert".into(), path(self.certs.ca_path())]);
        if with_cert {
            args.extend([
                "--cert".into(),
                path(self.certs.client_cert_path()),
                "--key".into(),
                path(self.certs.client_key_path()),
            ]);
        }
        if let Some((name, password)) = &self.options.user {
            args.extend(["--user".into(), name.clone(), "--pass".into(), password.clone(), "--no-auth-warning".into()]);
        }
        args
    }

    /// SIGKILL and reap; a no-op when it is down.
    pub fn kill(&mut self) {
        if let Some(child) = self.child.take() {
            kill(child);
        }
    }
}

impl Drop for PrivateRedisTls {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Returns once `redis-cli --tls … PING` says `PONG`; fails if `child` exits first.
fn wait_for_ping_tls(redis: &PrivateRedisTls, child: &mut Child) -> anyhow::Result<()> {
    let args = redis.cli_args(true);
    wait_until(START_WAIT, "the TLS server's PING", || {
        if let Ok(Some(_)) = child.try_wait() {
            return true;
        }
        std::process::Command::new("redis-cli")
            .args(&args)
            .arg("PING")
            .output()
            .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).trim() == "PONG")
    })?;
    if let Ok(Some(status)) = child.try_wait() {
        anyhow::bail!("TLS redis-server on port {} exited at start ({status})", redis.port);
    }
    Ok(())
}
