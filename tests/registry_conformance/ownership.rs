//! `RunOwnership` cases: the run lock, seqs, fencing, the one `complete`, pending approvals.

use super::*;

fn request_ids(pending: &[Value]) -> BTreeSet<String> {
    pending.iter().map(|p| p["requestId"].as_str().unwrap_or_default().to_string()).collect()
}

pub(crate) async fn start_run_is_exclusive(make: Factory) {
    let n = make(Opts::default()).await;
    let s = unique("s");
    let grant = n.a.start_run(start(&s, "r1", "u", &n.node_a, 0)).await.expect("first run starts");
    assert_eq!(grant.lease.run_id, "r1");
    assert_eq!(grant.lease.session_id, s);
    assert_eq!(n.a.start_run(start(&s, "r2", "u", &n.node_a, 0)).await.err(), Some(RegistryError::RunInProgress));
    assert_eq!(n.b.start_run(start(&s, "r3", "u", &n.node_b, 0)).await.err(), Some(RegistryError::RunInProgress));
    let other = unique("s");
    let other_grant =
        n.b.start_run(start(&other, "r1", "u", &n.node_b, 0)).await.expect("other session is independent");
    n.a.complete(&grant.lease, complete_body(&s, "r1")).await.expect("complete");
    n.b.start_run(start(&s, "r4", "u", &n.node_b, 0)).await.expect("a new run after complete");
    n.b.complete(&other_grant.lease, complete_body(&other, "r1")).await.expect("complete other");

    // Many concurrent attempts on both nodes: exactly one wins.
    let raced = unique("s");
    let attempts = (0..16).map(|i| {
        let registry = if i % 2 == 0 { n.a.clone() } else { n.b.clone() };
        let node = if i % 2 == 0 { n.node_a.clone() } else { n.node_b.clone() };
        let raced = raced.clone();
        tokio::spawn(async move { registry.start_run(start(&raced, &format!("race-{i}"), "u", &node, 0)).await })
    });
    let mut won = 0;
    for attempt in attempts {
        match attempt.await.expect("task") {
            Ok(_) => won += 1,
            Err(e) => assert_eq!(e, RegistryError::RunInProgress),
        }
    }
    assert_eq!(won, 1, "exactly one concurrent start_run wins");
}

pub(crate) async fn seq_is_per_session_and_strictly_increasing(make: Factory) {
    let n = make(Opts::default()).await;
    let s = unique("s");
    let g1 = n.a.start_run(start(&s, "r1", "u", &n.node_a, 0)).await.unwrap();
    assert_eq!(g1.first_seq, 1, "the grant names the seq its first event gets");
    let batch = n.a.append(&g1.lease, bodies(&s, "r1", 3)).await.unwrap();
    assert_eq!(seqs(&batch), vec![1, 2, 3]);
    for (i, event) in batch.iter().enumerate() {
        assert_eq!(&*event.run_id, "r1");
        assert!(!event.terminal);
        let v = frame_json(event);
        assert_eq!(v["seq"], event.seq);
        assert_eq!(v["content"], format!("event {i}"));
        assert_eq!(v["kind"], "text");
    }
    assert_eq!(seqs(&n.a.append(&g1.lease, bodies(&s, "r1", 1)).await.unwrap()), vec![4]);
    assert_eq!(n.a.append(&g1.lease, Vec::new()).await.unwrap(), Vec::new());
    let done = n.a.complete(&g1.lease, complete_body(&s, "r1")).await.unwrap();
    assert_eq!(done.seq, 5);
    assert!(done.terminal);
    assert_eq!(frame_json(&done)["kind"], "complete");
    assert_eq!(frame_json(&done)["seq"], 5);

    // The next run, on the other node, continues the session's seq.
    let g2 = n.b.start_run(start(&s, "r2", "u", &n.node_b, 0)).await.unwrap();
    assert_eq!(g2.first_seq, 6);
    assert_eq!(seqs(&n.b.append(&g2.lease, bodies(&s, "r2", 2)).await.unwrap()), vec![6, 7]);
    assert_eq!(n.b.complete(&g2.lease, complete_body(&s, "r2")).await.unwrap().seq, 8);
    assert_eq!(n.a.snapshot(&s).await.unwrap().last_seq, 8);
    assert_eq!(n.b.snapshot(&s).await.unwrap().last_seq, 8);

    // Another session has its own counter.
    let other = unique("s");
    let g3 = n.a.start_run(start(&other, "r1", "u", &n.node_a, 0)).await.unwrap();
    assert_eq!(seqs(&n.a.append(&g3.lease, bodies(&other, "r1", 1)).await.unwrap()), vec![1]);
}

pub(crate) async fn seq_continues_from_the_floor_and_never_goes_back(make: Factory) {
    let n = make(Opts::default()).await;
    let s = unique("s");
    // The database knows 41 events: the counter never goes below it.
    let g1 = n.a.start_run(start(&s, "r1", "u", &n.node_a, 41)).await.unwrap();
    let first = n.a.append(&g1.lease, bodies(&s, "r1", 3)).await.unwrap();
    assert!(first[0].seq > 41, "first seq {} must be above the floor 41", first[0].seq);
    assert_eq!(g1.first_seq, first[0].seq);
    assert_eq!(seqs(&first), vec![first[0].seq, first[0].seq + 1, first[0].seq + 2]);
    let end1 = n.a.complete(&g1.lease, complete_body(&s, "r1")).await.unwrap();
    assert_eq!(end1.seq, first[0].seq + 3);

    // A lower floor (the database lags) does not move the counter back.
    let g2 = n.b.start_run(start(&s, "r2", "u", &n.node_b, 5)).await.unwrap();
    assert_eq!(g2.first_seq, end1.seq + 1);
    assert_eq!(seqs(&n.b.append(&g2.lease, bodies(&s, "r2", 1)).await.unwrap()), vec![end1.seq + 1]);
    let end2 = n.b.complete(&g2.lease, complete_body(&s, "r2")).await.unwrap();

    // A higher floor (the backend lost events the database has) moves it past the floor.
    let floor = end2.seq + 1000;
    let g3 = n.a.start_run(start(&s, "r3", "u", &n.node_a, floor)).await.unwrap();
    let third = n.a.append(&g3.lease, bodies(&s, "r3", 2)).await.unwrap();
    assert!(third[0].seq > floor);
    assert_eq!(g3.first_seq, third[0].seq);
    assert_eq!(third[1].seq, third[0].seq + 1);
    assert!(n.a.snapshot(&s).await.unwrap().last_seq >= third[1].seq);
}

pub(crate) async fn writes_are_fenced_and_complete_happens_once(make: Factory) {
    let n = make(Opts::default()).await;
    let s = unique("s");
    let grant = n.a.start_run(start(&s, "r1", "u", &n.node_a, 0)).await.unwrap();
    let mut wrong = grant.lease.clone();
    wrong.run_id = "not-the-run".into();
    assert_eq!(n.a.append(&wrong, bodies(&s, "x", 1)).await.err(), Some(RegistryError::Fenced));
    assert_eq!(n.b.complete(&wrong, complete_body(&s, "x")).await.err(), Some(RegistryError::Fenced));
    assert_eq!(n.a.renew(&wrong).await.err(), Some(RegistryError::Fenced));
    assert_eq!(n.a.add_pending(&wrong, "rq", json!({"requestId": "rq"})).await.err(), Some(RegistryError::Fenced));
    n.a.renew(&grant.lease).await.expect("the owner renews");
    n.a.append(&grant.lease, bodies(&s, "r1", 2)).await.expect("the owner appends");

    let done = n.a.complete(&grant.lease, complete_body(&s, "r1")).await.unwrap();
    assert_eq!(done.seq, 3);
    let all = n.b.read_range(&s, 0, u64::MAX).await.unwrap();
    assert_eq!(seqs(&all.events), vec![1, 2, 3]);
    assert_eq!(all.events.iter().map(|e| e.terminal).collect::<Vec<_>>(), vec![false, false, true]);
    assert_eq!(n.a.append(&grant.lease, bodies(&s, "r1", 1)).await.err(), Some(RegistryError::Fenced));
    assert_eq!(n.b.append(&grant.lease, bodies(&s, "r1", 1)).await.err(), Some(RegistryError::Fenced));
    assert_eq!(n.a.complete(&grant.lease, complete_body(&s, "r1")).await.err(), Some(RegistryError::Fenced));
    assert_eq!(n.a.renew(&grant.lease).await.err(), Some(RegistryError::Fenced));
    assert_eq!(n.a.add_pending(&grant.lease, "rq", json!({})).await.err(), Some(RegistryError::Fenced));
    let snapshot = n.b.snapshot(&s).await.unwrap();
    assert!(!snapshot.is_processing);
    assert_eq!(snapshot.last_seq, 3);
    assert_eq!(snapshot.run_id, None);

    // Concurrent completes from both nodes: exactly one lands.
    let g2 = n.a.start_run(start(&s, "r2", "u", &n.node_a, 0)).await.unwrap();
    let tries = (0..6).map(|i| {
        let registry = if i % 2 == 0 { n.a.clone() } else { n.b.clone() };
        let lease = g2.lease.clone();
        let s = s.clone();
        tokio::spawn(async move { registry.complete(&lease, complete_body(&s, "r2")).await })
    });
    let mut landed = Vec::new();
    for attempt in tries {
        match attempt.await.unwrap() {
            Ok(event) => landed.push(event.seq),
            Err(e) => assert_eq!(e, RegistryError::Fenced),
        }
    }
    assert_eq!(landed, vec![4], "exactly one complete");
    let tail = n.b.read_range(&s, 3, u64::MAX).await.unwrap();
    assert_eq!(seqs(&tail.events), vec![4]);
    assert!(tail.events[0].terminal && tail.complete);
}

pub(crate) async fn pending_permissions_follow_the_run(make: Factory) {
    let n = make(Opts::default()).await;
    let s = unique("s");
    let (rq1, rq2) = (unique("rq"), unique("rq"));
    let grant = n.a.start_run(start(&s, "r1", "u", &n.node_a, 0)).await.unwrap();
    n.a.add_pending(&grant.lease, &rq1, json!({"requestId": rq1, "toolName": "Bash", "input": {"command": "ls"}}))
        .await
        .unwrap();
    n.a.add_pending(&grant.lease, &rq2, json!({"requestId": rq2, "toolName": "Edit"})).await.unwrap();
    let snapshot = n.b.snapshot(&s).await.unwrap();
    assert!(snapshot.is_processing);
    assert_eq!(snapshot.run_id.as_deref(), Some("r1"));
    assert_eq!(snapshot.owner_node.as_deref(), Some(n.node_a.as_str()));
    assert_eq!(request_ids(&snapshot.pending_permissions), BTreeSet::from([rq1.clone(), rq2.clone()]));
    let first = snapshot.pending_permissions.iter().find(|p| p["requestId"] == rq1.as_str()).unwrap();
    assert_eq!(first["input"]["command"], "ls");

    n.a.remove_pending(&grant.lease, &rq1).await.unwrap();
    let subscription = n.b.subscribe(&s, 0).await.unwrap();
    assert_eq!(request_ids(&subscription.snapshot.pending_permissions), BTreeSet::from([rq2.clone()]));

    n.a.complete(&grant.lease, complete_body(&s, "r1")).await.unwrap();
    assert!(n.b.snapshot(&s).await.unwrap().pending_permissions.is_empty());
    assert!(!n.b.route_permission("u", &rq2, answer(true)).await.unwrap(), "cleared at complete");
    n.a.start_run(start(&s, "r2", "u", &n.node_a, 0)).await.unwrap();
    assert!(n.b.snapshot(&s).await.unwrap().pending_permissions.is_empty(), "a new run starts with none");
}

pub(crate) async fn a_request_key_starts_at_most_one_run(make: Factory) {
    let n = make(Opts::default()).await;
    let s = unique("s");
    let started = |run_id: &str, first_seq: u64, is_processing: bool| {
        RegistryError::AlreadySent(PriorSend::Started { run_id: run_id.into(), first_seq, is_processing })
    };
    let grant = n.a.start_run(keyed(&s, "r1", &n.node_a, "k1")).await.expect("a keyed send starts");
    assert_eq!(grant.first_seq, 1);
    // The same key again, from either node, starts nothing and names the first run.
    assert_eq!(n.b.start_run(keyed(&s, "r2", &n.node_b, "k1")).await.err(), Some(started("r1", 1, true)));
    assert_eq!(n.a.start_run(keyed(&s, "r3", &n.node_a, "k1")).await.err(), Some(started("r1", 1, true)));
    let running = PriorSend::Started { run_id: "r1".into(), first_seq: 1, is_processing: true };
    assert_eq!(n.b.prior_send(&s, "k1").await.unwrap(), Some(running));
    // A new key while r1 runs is refused, and the refusal is what the key answers from then on.
    assert_eq!(n.b.start_run(keyed(&s, "r4", &n.node_b, "k2")).await.err(), Some(RegistryError::RunInProgress));
    let refused = Some(RegistryError::AlreadySent(PriorSend::RefusedBusy));
    assert_eq!(n.a.start_run(keyed(&s, "r5", &n.node_a, "k2")).await.err(), refused);
    assert_eq!(n.a.prior_send(&s, "k2").await.unwrap(), Some(PriorSend::RefusedBusy));
    n.a.append(&grant.lease, bodies(&s, "r1", 2)).await.unwrap();
    n.a.complete(&grant.lease, complete_body(&s, "r1")).await.unwrap();
    // After the run: the key still names it, no longer processing; the refused key stays refused.
    assert_eq!(n.b.start_run(keyed(&s, "r6", &n.node_b, "k1")).await.err(), Some(started("r1", 1, false)));
    assert_eq!(n.b.start_run(keyed(&s, "r7", &n.node_b, "k2")).await.err(), refused);
    // A fresh key, a keyless send, another session with a used key: all start.
    let g3 = n.b.start_run(keyed(&s, "r8", &n.node_b, "k3")).await.expect("a fresh key starts");
    assert_eq!(g3.first_seq, 4, "after r1's 2 events and its complete: refusals take no seq");
    n.b.complete(&g3.lease, complete_body(&s, "r8")).await.unwrap();
    let g4 = n.a.start_run(start(&s, "r9", "u", &n.node_a, 0)).await.expect("a keyless send starts");
    n.a.complete(&g4.lease, complete_body(&s, "r9")).await.unwrap();
    let other = unique("s");
    let g5 = n.a.start_run(keyed(&other, "r1", &n.node_a, "k1")).await.expect("keys are per session");
    n.a.complete(&g5.lease, complete_body(&other, "r1")).await.unwrap();
    assert_eq!(n.a.prior_send(&s, "never-sent").await.unwrap(), None);
}

pub(crate) async fn request_keys_race_to_one_run_across_nodes(make: Factory) {
    let n = make(Opts::default()).await;
    let s = unique("s");
    let attempts = (0..16).map(|i| {
        let (registry, node) =
            if i % 2 == 0 { (n.a.clone(), n.node_a.clone()) } else { (n.b.clone(), n.node_b.clone()) };
        let s = s.clone();
        tokio::spawn(async move { registry.start_run(keyed(&s, &format!("race-{i}"), &node, "one-key")).await })
    });
    let (mut won, mut named) = (Vec::new(), Vec::new());
    for attempt in attempts {
        match attempt.await.expect("task") {
            Ok(grant) => won.push(grant.lease.run_id),
            Err(RegistryError::AlreadySent(PriorSend::Started { run_id, first_seq: 1, is_processing: true })) => {
                named.push(run_id)
            }
            Err(other) => panic!("a racing send with the key got {other:?}"),
        }
    }
    assert_eq!(won.len(), 1, "one send with the key starts a run");
    assert!(named.iter().all(|r| *r == won[0]), "every other send is told the winner: {named:?} vs {won:?}");
}

pub(crate) async fn request_keys_are_forgotten_after_the_window(make: Factory) {
    let window = Duration::from_millis(400);
    let n = make(Opts { idempotency_window: window, ..Opts::default() }).await;
    let s = unique("s");
    let grant = n.a.start_run(keyed(&s, "r1", &n.node_a, "k")).await.unwrap();
    n.a.complete(&grant.lease, complete_body(&s, "r1")).await.unwrap();
    assert!(matches!(n.b.start_run(keyed(&s, "r2", &n.node_b, "k")).await, Err(RegistryError::AlreadySent(_))));
    tokio::time::sleep(window + Duration::from_millis(200)).await;
    assert_eq!(n.b.prior_send(&s, "k").await.unwrap(), None);
    let again = n.b.start_run(keyed(&s, "r3", &n.node_b, "k")).await.expect("a key past its window is a new send");
    n.b.complete(&again.lease, complete_body(&s, "r3")).await.unwrap();
}
