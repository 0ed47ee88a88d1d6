//! `SendLimiter` cases: the `chat.send` budget, counted per user across nodes.

use super::*;

pub(crate) async fn sends_are_counted_per_user_across_nodes(make: Factory) {
    let n = make(Opts::default()).await;
    let (alice, bob) = (unique("alice"), unique("bob"));
    let window = Duration::from_millis(1500);
    let before_first = tokio::time::Instant::now();
    // Three per window, counted on whichever node the send arrives.
    assert!(n.a.admit_send(&alice, 3, window).await.unwrap());
    // The window opened during that call: it is over by `after_first + window`.
    let after_first = tokio::time::Instant::now();
    assert!(n.b.admit_send(&alice, 3, window).await.unwrap());
    assert!(n.a.admit_send(&alice, 3, window).await.unwrap());
    assert!(!n.b.admit_send(&alice, 3, window).await.unwrap(), "4th send of the window, on the other node");
    assert!(!n.a.admit_send(&alice, 3, window).await.unwrap(), "refused sends do not reopen the budget");
    // Another user has a budget of their own.
    for _ in 0..3 {
        assert!(n.b.admit_send(&bob, 3, window).await.unwrap());
    }
    assert!(!n.a.admit_send(&bob, 3, window).await.unwrap());
    assert!(before_first.elapsed() < window, "the calls above took longer than the window");
    // The next window opens with a fresh budget.
    tokio::time::sleep_until(after_first + window + Duration::from_millis(50)).await;
    assert!(n.b.admit_send(&alice, 3, window).await.unwrap());
    assert!(n.a.admit_send(&alice, 3, window).await.unwrap());
    assert!(n.b.admit_send(&alice, 3, window).await.unwrap());
    assert!(!n.a.admit_send(&alice, 3, window).await.unwrap());
}
