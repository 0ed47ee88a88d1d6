//! `RunRouting` cases: aborts and approval answers reach the owner for its user only; running runs on every node.

use super::*;

pub(crate) async fn permission_answers_reach_the_owner_only_for_its_user(make: Factory) {
    let n = make(Opts::default()).await;
    let s = unique("s");
    let rq = unique("rq");
    let mut grant = n.a.start_run(start(&s, "r1", "alice", &n.node_a, 0)).await.unwrap();
    n.a.add_pending(&grant.lease, &rq, json!({"requestId": rq})).await.unwrap();

    assert!(!n.b.route_permission("mallory", &rq, answer(true)).await.unwrap());
    assert!(!n.b.route_permission("alice", "no-such-request", answer(true)).await.unwrap());
    assert_no_control(&mut grant).await;

    assert!(n.b.route_permission("alice", &rq, answer(true)).await.unwrap());
    let expected = Control::Permission { session_id: s.clone(), request_id: rq.clone(), answer: answer(true) };
    assert_eq!(recv_control(&mut grant).await, expected);
    assert!(n.a.route_permission("alice", &rq, answer(false)).await.unwrap());
    let expected = Control::Permission { session_id: s.clone(), request_id: rq.clone(), answer: answer(false) };
    assert_eq!(recv_control(&mut grant).await, expected);

    n.a.remove_pending(&grant.lease, &rq).await.unwrap();
    assert!(!n.b.route_permission("alice", &rq, answer(true)).await.unwrap(), "answered requests are unknown");
    assert_no_control(&mut grant).await;
}

pub(crate) async fn aborts_reach_the_owner_only_for_its_user(make: Factory) {
    let n = make(Opts::default()).await;
    let s = unique("s");
    assert!(!n.b.route_abort(&s, "alice").await.unwrap(), "no run");
    let mut grant = n.a.start_run(start(&s, "r1", "alice", &n.node_a, 0)).await.unwrap();
    assert!(!n.b.route_abort(&s, "mallory").await.unwrap());
    assert_no_control(&mut grant).await;
    assert!(n.b.route_abort(&s, "alice").await.unwrap());
    assert_eq!(recv_control(&mut grant).await, Control::Abort { session_id: s.clone(), run_id: "r1".into() });
    assert!(n.a.route_abort(&s, "alice").await.unwrap());
    assert_eq!(recv_control(&mut grant).await, Control::Abort { session_id: s.clone(), run_id: "r1".into() });
    n.a.complete(&grant.lease, complete_body(&s, "r1")).await.unwrap();
    assert!(!n.b.route_abort(&s, "alice").await.unwrap(), "the run is over");
}

pub(crate) async fn running_runs_lists_the_users_runs_on_every_node(make: Factory) {
    let n = make(Opts::default()).await;
    let (alice, bob) = (unique("alice"), unique("bob"));
    let (s1, s2, s3) = (unique("s"), unique("s"), unique("s"));
    let g1 = n.a.start_run(start(&s1, "r1", &alice, &n.node_a, 0)).await.unwrap();
    let _g2 = n.b.start_run(start(&s2, "r2", &alice, &n.node_b, 0)).await.unwrap();
    let _g3 = n.a.start_run(start(&s3, "r3", &bob, &n.node_a, 0)).await.unwrap();
    n.a.append(&g1.lease, bodies(&s1, "r1", 3)).await.unwrap();

    for registry in [&n.a, &n.b] {
        let mut runs = registry.running_runs(&alice).await.unwrap();
        runs.sort_by(|x, y| x.run_id.cmp(&y.run_id));
        assert_eq!(runs.len(), 2);
        assert_eq!((runs[0].session_id.as_str(), runs[0].run_id.as_str()), (s1.as_str(), "r1"));
        assert_eq!((runs[1].session_id.as_str(), runs[1].run_id.as_str()), (s2.as_str(), "r2"));
        assert_eq!(runs[0].node_id, n.node_a);
        assert_eq!(runs[1].node_id, n.node_b);
        assert_eq!(runs[0].last_seq, 3);
        assert_eq!(runs[1].last_seq, 0);
        assert!(runs.iter().all(|r| r.provider == "script" && r.user_id == alice && !r.started_at.is_empty()));
        let bobs = registry.running_runs(&bob).await.unwrap();
        assert_eq!(bobs.iter().map(|r| r.session_id.as_str()).collect::<Vec<_>>(), vec![s3.as_str()]);
        assert!(registry.running_runs(&unique("nobody")).await.unwrap().is_empty());
    }
    n.a.complete(&g1.lease, complete_body(&s1, "r1")).await.unwrap();
    let left = n.b.running_runs(&alice).await.unwrap();
    assert_eq!(left.iter().map(|r| r.run_id.as_str()).collect::<Vec<_>>(), vec!["r2"]);
}
