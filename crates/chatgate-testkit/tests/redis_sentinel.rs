//! The private Sentinel setup against real `redis-server`s: the sentinels report the
//! primary; `SENTINEL FAILOVER`, and a killed primary, each make them report the other node,
//! which then says `role:master` and holds the data; a killed primary comes back as a replica.

use std::{process::Command, time::Instant};

use chatgate_testkit::redis_sentinel::PrivateRedisSentinel;

/// `redis-cli -p <port> <args>`, its trimmed output.
fn cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli").args(["-p", &port.to_string()]).args(args).output().expect("redis-cli");
    assert!(out.status.success(), "redis-cli {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn start() -> (PrivateRedisSentinel, u16, u16) {
    let started = Instant::now();
    let setup = PrivateRedisSentinel::start().expect("sentinel setup");
    eprintln!("primary, replica and 3 sentinels up in {:?}", started.elapsed());
    let [first, second] = setup.data_ports().try_into().unwrap();
    (setup, first, second)
}

/// `SET key value` and `WAIT 1` on one connection to `port`: the replica has it.
fn set_replicated(port: u16, key: &str, value: &str) {
    let mut conn = redis::Client::open(format!("redis://127.0.0.1:{port}")).unwrap().get_connection().unwrap();
    let (replicated,): (u32,) =
        redis::pipe().cmd("SET").arg(key).arg(value).ignore().cmd("WAIT").arg(1).arg(5000).query(&mut conn).unwrap();
    assert_eq!(replicated, 1);
}

#[test]
fn a_requested_failover_moves_the_primary() {
    let (setup, first, second) = start();
    assert_eq!(setup.sentinel_urls().len(), 3);
    assert_eq!(setup.pids().len(), 5);
    assert_eq!(setup.primary().unwrap(), first);
    let sentinel: u16 = setup.sentinel_urls()[1].rsplit(':').next().unwrap().parse().unwrap();
    let reported = cli(sentinel, &["SENTINEL", "get-master-addr-by-name", setup.master_name()]);
    assert_eq!(reported, format!("127.0.0.1\n{first}"));
    set_replicated(first, "k", "v1");

    let took = setup.failover().unwrap();
    eprintln!("SENTINEL FAILOVER: {took:?}");
    assert_eq!(setup.primary().unwrap(), second);
    assert!(cli(second, &["INFO", "replication"]).contains("role:master"));
    assert_eq!(cli(second, &["GET", "k"]), "v1");
    assert_eq!(cli(second, &["SET", "k", "v2"]), "OK");
}

#[test]
fn a_killed_primary_is_replaced_and_comes_back_as_a_replica() {
    let (mut setup, first, second) = start();
    set_replicated(first, "k", "v1");

    let took = setup.kill_primary().unwrap();
    eprintln!("kill -9 of the primary to promotion: {took:?}");
    assert_eq!(setup.primary().unwrap(), second);
    assert!(cli(second, &["INFO", "replication"]).contains("role:master"));
    assert_eq!(cli(second, &["GET", "k"]), "v1");
    assert_eq!(setup.pids().len(), 4);

    let started = Instant::now();
    setup.restart(first).unwrap();
    eprintln!("killed primary back as a replica in {:?}", started.elapsed());
    assert!(cli(first, &["INFO", "replication"]).contains("role:slave"));
    assert_eq!(cli(first, &["GET", "k"]), "v1");

    let took = setup.failover().unwrap();
    eprintln!("SENTINEL FAILOVER back: {took:?}");
    assert_eq!(setup.primary().unwrap(), first);
}
