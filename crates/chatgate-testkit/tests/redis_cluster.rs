//! The private Redis Cluster against real `redis-server`s: it starts and agrees, finds a
//! key's primary, fails a killed primary over and takes it back as a replica, and migrates a
//! slot by hand, whole or stopped half-way, as clients see it (`redis-cli -c`, raw replies).

use std::{process::Command, time::Instant};

use chatgate_testkit::redis_cluster::{PrivateRedisCluster, Role};

/// `redis-cli -c -p <port> <args>` (follows MOVED and ASK), its trimmed output.
fn cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli").args(["-c", "-p", &port.to_string()]).args(args).output().expect("redis-cli");
    assert!(out.status.success(), "redis-cli {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// `redis-cli -c -p <port>` reading its commands from `script`, its trimmed output.
fn cli_session(port: u16, script: &str) -> String {
    use std::io::Write;
    let mut child = Command::new("redis-cli")
        .args(["-c", "-p", &port.to_string()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("redis-cli");
    child.stdin.take().unwrap().write_all(script.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// One command on one node, without following redirections.
fn raw(port: u16, cmd: &redis::Cmd) -> redis::RedisResult<redis::Value> {
    let mut conn = redis::Client::open(format!("redis://127.0.0.1:{port}")).unwrap().get_connection().unwrap();
    cmd.query(&mut conn)
}

#[test]
fn a_killed_primary_is_failed_over_and_rejoins_as_a_replica() {
    let started = Instant::now();
    let mut cluster = PrivateRedisCluster::start(3, 1).expect("cluster");
    eprintln!("cluster of 6 up in {:?}", started.elapsed());
    assert!(cli(cluster.ports()[0], &["CLUSTER", "INFO"]).contains("cluster_state:ok"));
    let nodes = cluster.nodes().unwrap();
    assert_eq!(nodes.len(), 6);
    assert_eq!(cluster.pids().len(), 6);
    assert_eq!(cluster.seed_urls().len(), 6);
    let primaries: Vec<_> = nodes.iter().filter(|n| n.role == Role::Primary).collect();
    assert_eq!(primaries.len(), 3);
    let served: usize = primaries.iter().flat_map(|n| &n.slots).map(|r| r.clone().count()).sum();
    assert_eq!(served, 16384);
    for replica in nodes.iter().filter(|n| n.role == Role::Replica) {
        assert!(primaries.iter().any(|p| Some(&p.id) == replica.primary_id.as_ref()), "{replica:?}");
    }

    let key = "chatgate:{failover}:k";
    let slot = cluster.slot_of(key).unwrap();
    let owner = cluster.primary_for_key(key).unwrap();
    assert!(primaries.iter().any(|p| p.port == owner && p.slots.iter().any(|r| r.contains(&slot))));
    // WAIT counts the replicas that have its own connection's last write: one redis-cli
    // session, whose connection follows the MOVED to the owner.
    let seed = *cluster.ports().iter().find(|p| **p != owner).unwrap();
    let session = cli_session(seed, &format!("SET {key} before\nWAIT 1 5000\n"));
    assert!(session.ends_with("OK\n1"), "written, and the write reached the replica: {session}");

    let killed = cluster.kill_primary_of(key).unwrap();
    assert_eq!(killed, owner);
    let took = cluster.wait_for_failover(slot).unwrap();
    eprintln!("failover after kill -9 of {killed}: {took:?}");
    let promoted = cluster.primary_for_key(key).unwrap();
    assert_ne!(promoted, killed);
    assert_eq!(cli(seed, &["GET", key]), "before");

    let started = Instant::now();
    cluster.restart_node(killed).unwrap();
    eprintln!("killed node rejoined in {:?}", started.elapsed());
    let rejoined = cluster.nodes().unwrap().into_iter().find(|n| n.port == killed).unwrap();
    assert_eq!(rejoined.role, Role::Replica);
    assert!(rejoined.pid.is_some());
    assert_eq!(cluster.primary_for_key(key).unwrap(), promoted);
    assert_eq!(cli(killed, &["GET", key]), "before");
}

#[test]
fn a_slot_migrated_by_hand_moves_its_keys_and_redirects_clients() {
    let cluster = PrivateRedisCluster::start(3, 1).expect("cluster");
    let seed = cluster.ports()[0];
    let keys: Vec<String> = (0..300).map(|i| format!("chatgate:{{moving}}:{i}")).collect();
    for key in &keys {
        assert_eq!(cli(seed, &["SET", key, key]), "OK");
    }
    let slot = cluster.slot_of(&keys[0]).unwrap();
    let from = cluster.primary_for_slot(slot).unwrap();
    let nodes = cluster.nodes().unwrap();
    let to = nodes.iter().find(|n| n.role == Role::Primary && n.port != from).unwrap().port;

    let took = cluster.migrate_slot(slot, to).unwrap();
    eprintln!("slot {slot} with {} keys migrated {from} -> {to} in {took:?}", keys.len());
    assert_eq!(cluster.primary_for_slot(slot).unwrap(), to);
    let moved = raw(from, redis::cmd("GET").arg(&keys[0])).unwrap_err();
    assert_eq!(moved.code(), Some("MOVED"), "{moved}");
    assert_eq!(moved.redirect_node(), Some((format!("127.0.0.1:{to}").as_str(), slot)));
    for key in [&keys[0], &keys[299]] {
        assert_eq!(cli(from, &["GET", key]), *key);
    }

    // Half-way back: some keys on each side, the slot MIGRATING on `to`, IMPORTING on `from`.
    let half = cluster.begin_slot_migration(slot, from, 150).unwrap();
    let (mut asked, mut here) = (Vec::new(), Vec::new());
    for key in &keys {
        match raw(to, redis::cmd("GET").arg(key)) {
            Ok(_) => here.push(key.clone()),
            Err(e) if e.code() == Some("ASK") => {
                assert_eq!(e.redirect_node(), Some((format!("127.0.0.1:{from}").as_str(), slot)));
                asked.push(key.clone());
            }
            Err(e) => panic!("GET {key} half-way: {e}"),
        }
    }
    assert_eq!((asked.len(), here.len()), (150, 150));
    let state = cli(to, &["CLUSTER", "NODES"]);
    assert!(state.contains(&format!("[{slot}->-")), "MIGRATING shows on the source: {state}");
    let mixed = raw(to, redis::cmd("MGET").arg(&asked[0]).arg(&here[0])).unwrap_err();
    assert_eq!(mixed.code(), Some("TRYAGAIN"), "{mixed}");
    assert_eq!(cli(to, &["GET", &asked[0]]), asked[0], "redis-cli -c follows ASK");
    assert_eq!(cli(to, &["GET", &here[0]]), here[0]);

    let took = cluster.finish_slot_migration(&half).unwrap();
    eprintln!("half-way migration of slot {slot} back to {from} finished, {took:?} since it began");
    assert_eq!(cluster.primary_for_slot(slot).unwrap(), from);
    for key in &keys {
        assert_eq!(cli(to, &["GET", key]), *key);
    }
}
