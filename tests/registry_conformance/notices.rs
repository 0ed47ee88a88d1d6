//! `UserNotices` cases: per-user notices reach that user's receivers on every node, and no one else's.

use super::*;

pub(crate) async fn user_notices_reach_only_that_user(make: Factory) {
    let n = make(Opts::default()).await;
    let (alice, bob) = (unique("alice"), unique("bob"));
    let mut alice_b = n.b.user_notices(&alice).await.unwrap();
    let mut alice_a = n.a.user_notices(&alice).await.unwrap();
    let mut bob_a = n.a.user_notices(&bob).await.unwrap();
    let notice = Frame::from(json!({"kind": "session_upserted", "sessionId": "s1"}).to_string());
    n.a.notify_user(&alice, notice.clone()).await.unwrap();
    for rx in [&mut alice_b, &mut alice_a] {
        assert_eq!(tokio::time::timeout(WAIT, rx.recv()).await.unwrap().unwrap(), notice);
    }
    let for_bob = Frame::from(json!({"kind": "session_upserted", "sessionId": "s2"}).to_string());
    n.b.notify_user(&bob, for_bob.clone()).await.unwrap();
    assert_eq!(tokio::time::timeout(WAIT, bob_a.recv()).await.unwrap().unwrap(), for_bob);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(alice_a.try_recv().is_err() && alice_b.try_recv().is_err(), "alice never sees bob's notices");
    assert!(bob_a.try_recv().is_err(), "bob never sees alice's notices");
}
