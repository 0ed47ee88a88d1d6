//! The private TLS-only server against `redis-cli --tls`: certificates made at test time
//! verify both ways; a client without the client certificate is refused when one is
//! required; with an ACL user, a wrong password is refused and the right one answers.

use std::process::{Command, Output};

use chatgate_testkit::redis_tls::{PrivateRedisTls, TlsOptions};

/// `redis-cli <args> <command>`.
fn cli(args: &[String], command: &[&str]) -> Output {
    Command::new("redis-cli").args(args).args(command).output().expect("redis-cli")
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)).trim().to_string()
}

#[test]
fn mutual_tls_needs_the_client_certificate() {
    let redis = PrivateRedisTls::start(true).expect("TLS redis");
    assert!(redis.url().starts_with("rediss://127.0.0.1:"));
    assert!(redis.pid().is_some());
    assert!(redis.certs().ca_pem.starts_with("-----BEGIN CERTIFICATE-----"));
    assert!(redis.certs().client_key_pem.contains("PRIVATE KEY"));
    assert_eq!(text(&cli(&redis.cli_args(true), &["PING"])), "PONG");
    let localhost: Vec<String> =
        redis.cli_args(true).into_iter().map(|a| if a == "127.0.0.1" { "localhost".into() } else { a }).collect();
    assert_eq!(text(&cli(&localhost, &["PING"])), "PONG", "the server certificate names localhost too");

    let refused = text(&cli(&redis.cli_args(false), &["PING"]));
    eprintln!("without a client certificate: {refused}");
    assert!(!refused.contains("PONG"), "{refused}");
    let plain = text(&cli(&["-p".into(), redis.port().to_string()], &["PING"]));
    eprintln!("plain TCP: {plain}");
    assert!(!plain.contains("PONG"), "{plain}");
    let untrusted = text(&cli(&["-p".into(), redis.port().to_string(), "--tls".into()], &["PING"]));
    eprintln!("without our CA: {untrusted}");
    assert!(!untrusted.contains("PONG"), "{untrusted}");
}

#[test]
fn tls_without_client_certificates_and_with_an_acl_user() {
    let user = Some(("chatgate".to_string(), "s3cret".to_string()));
    let redis = PrivateRedisTls::start_with(TlsOptions { require_client_cert: false, user }).expect("TLS redis");
    assert_eq!(redis.user(), Some(("chatgate", "s3cret")));
    assert_eq!(redis.url_with_auth(), format!("rediss://chatgate:s3cret@127.0.0.1:{}", redis.port()));
    assert_eq!(text(&cli(&redis.cli_args(false), &["PING"])), "PONG");
    assert_eq!(text(&cli(&redis.cli_args(false), &["ACL", "WHOAMI"])), "chatgate");

    let wrong: Vec<String> =
        redis.cli_args(false).into_iter().map(|a| if a == "s3cret" { "wrong".into() } else { a }).collect();
    let refused = text(&cli(&wrong, &["PING"]));
    eprintln!("wrong password: {refused}");
    assert!(refused.contains("WRONGPASS") || refused.contains("AUTH failed"), "{refused}");
    let anonymous: Vec<String> = redis.cli_args(false).into_iter().take_while(|a| a != "--user").collect();
    let refused = text(&cli(&anonymous, &["PING"]));
    eprintln!("no password: {refused}");
    assert!(refused.contains("NOAUTH"), "{refused}");
}
