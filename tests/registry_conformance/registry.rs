//! `RunRegistry` cases: readiness.

use super::*;

pub(crate) async fn registries_are_ready(make: Factory) {
    let n = make(Opts::default()).await;
    assert_eq!(n.a.ready().await, Ok(()));
    assert_eq!(n.b.ready().await, Ok(()));
}
