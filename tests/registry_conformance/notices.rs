//! `UserNotices` cases: per-user notices reach that user's listeners on every node, no one
//! else's, and no listener after it dropped.

use chatgate::runs::NoticeSink;
use tokio::sync::mpsc;

use super::*;

/// A listening socket, for the test: what it was handed, in order.
struct Inbox(mpsc::Sender<Frame>);

impl NoticeSink for Inbox {
    fn notice(&self, frame: &Frame) {
        self.0.try_send(frame.clone()).expect("the test reads every notice");
    }
}

fn inbox() -> (Arc<dyn NoticeSink>, mpsc::Receiver<Frame>) {
    let (tx, rx) = mpsc::channel(16);
    (Arc::new(Inbox(tx)), rx)
}

pub(crate) async fn user_notices_reach_only_that_user(make: Factory) {
    let n = make(Opts::default()).await;
    let (alice, bob) = (unique("alice"), unique("bob"));
    let (sink, mut alice_b) = inbox();
    let _on_b = n.b.listen_user(&alice, sink).await.unwrap();
    let (sink, mut alice_a) = inbox();
    let on_a = n.a.listen_user(&alice, sink).await.unwrap();
    let (sink, mut bob_a) = inbox();
    let _bob_on_a = n.a.listen_user(&bob, sink).await.unwrap();
    let notice = Frame::from(json!({"kind": "session_upserted", "sessionId": "s1"}).to_string());
    n.a.notify_user(&alice, notice.clone()).await.unwrap();
    for rx in [&mut alice_b, &mut alice_a] {
        assert_eq!(tokio::time::timeout(WAIT, rx.recv()).await.unwrap().unwrap(), notice);
    }
    let for_bob = Frame::from(json!({"kind": "session_upserted", "sessionId": "s2"}).to_string());
    n.b.notify_user(&bob, for_bob.clone()).await.unwrap();
    assert_eq!(tokio::time::timeout(WAIT, bob_a.recv()).await.unwrap().unwrap(), for_bob);
    // A listener that dropped gets nothing more; the user's other listeners still do.
    drop(on_a);
    let later = Frame::from(json!({"kind": "session_upserted", "sessionId": "s3"}).to_string());
    n.b.notify_user(&alice, later.clone()).await.unwrap();
    assert_eq!(tokio::time::timeout(WAIT, alice_b.recv()).await.unwrap().unwrap(), later);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(alice_a.try_recv().is_err() && alice_b.try_recv().is_err(), "alice never sees bob's notices");
    assert!(bob_a.try_recv().is_err(), "bob never sees alice's notices");
}
