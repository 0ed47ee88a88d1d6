//! The store on its own (SQLite and PostgreSQL): sessions scoped by user,
//! archive/restore/delete, idempotent history writes, history paging, the
//! `last_seq` high-water mark that only rises, and stream drafts (hidden, and
//! deleted by their stream's merged text).

mod common;

use std::time::Duration;

use chatgate::store::{DRAFT_PART, HistoryRow, NewSession, Store};
use common::{Db, user};
use serde_json::{Value, json};

/// A migrated store on `db` (SQLite in a temp dir, or the shared PostgreSQL).
async fn store(db: Db) -> (Store, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let url = common::config(db, &dir).database_url;
    let store = Store::connect(&url).await.unwrap();
    store.migrate().await.unwrap();
    // Migrating twice is harmless (serve and `chatgate migrate` both run it).
    store.migrate().await.unwrap();
    (store, dir)
}

async fn new_session(store: &Store, user_id: &str, summary: &str) -> String {
    let id = uuid::Uuid::new_v4().to_string();
    let row = store
        .create_session(NewSession {
            session_id: id.clone(),
            user_id: user_id.to_string(),
            provider: "script".into(),
            project_path: "/work/proj".into(),
            summary: summary.into(),
        })
        .await
        .unwrap();
    assert_eq!((row.session_id.as_str(), row.last_seq, row.is_archived), (id.as_str(), 0, false));
    // Distinct creation times, so "newest first" is well defined.
    tokio::time::sleep(Duration::from_millis(3)).await;
    id
}

fn event(session: &str, seq: u64, content: &str) -> HistoryRow {
    let body = json!({ "id": format!("text_{seq}"), "kind": "text", "role": "assistant", "content": content,
        "sessionId": session });
    HistoryRow {
        session_id: session.into(),
        seq,
        part: 1,
        kind: "text".into(),
        body: body.to_string(),
        supersedes_drafts_from: None,
    }
}

fn prompt(session: &str, seq: u64, content: &str) -> HistoryRow {
    let body = json!({ "id": format!("prompt_{seq}"), "kind": "text", "role": "user", "content": content });
    HistoryRow {
        session_id: session.into(),
        seq,
        part: 0,
        kind: "text".into(),
        body: body.to_string(),
        supersedes_drafts_from: None,
    }
}

async fn ids(store: &Store, user_id: &str, limit: i64, offset: i64) -> (Vec<String>, i64) {
    let (rows, total) = store.list_sessions(user_id, limit, offset).await.unwrap();
    (rows.into_iter().map(|r| r.session_id).collect(), total)
}

async fn contents(store: &Store, session: &str, limit: Option<i64>, offset: i64) -> (Vec<(Value, String)>, i64) {
    let page = store.messages(session, limit, offset, chatgate::store::HistoryView::All).await.unwrap();
    let items = page.messages.iter().map(|m| (m["seq"].clone(), m["content"].as_str().unwrap().to_string())).collect();
    (items, page.total)
}

async fn sessions_are_scoped_by_user(db: Db) {
    let (store, _dir) = store(db).await;
    let (alice, bob) = (user(), user());
    let a1 = new_session(&store, &alice, "first").await;
    let a2 = new_session(&store, &alice, "second").await;
    let b1 = new_session(&store, &bob, "bob's").await;

    assert!(store.session(&alice, &b1).await.unwrap().is_none());
    assert!(store.session(&bob, &a1).await.unwrap().is_none());
    let row = store.session(&alice, &a1).await.unwrap().unwrap();
    assert_eq!(
        (row.user_id.as_str(), row.summary.as_str(), row.provider.as_str()),
        (alice.as_str(), "first", "script")
    );
    assert_eq!(ids(&store, &alice, 50, 0).await, (vec![a2.clone(), a1.clone()], 2));
    assert_eq!(ids(&store, &bob, 50, 0).await, (vec![b1.clone()], 1));
    assert_eq!(ids(&store, &alice, 1, 1).await, (vec![a1.clone()], 2));
    assert_eq!(ids(&store, &user(), 50, 0).await, (vec![], 0));

    // Bob can change nothing of alice's.
    assert!(!store.set_summary(&bob, &a1, "mine").await.unwrap());
    assert!(!store.set_archived(&bob, &a1, true).await.unwrap());
    assert!(!store.delete_session(&bob, &a1).await.unwrap());
    let row = store.session(&alice, &a1).await.unwrap().unwrap();
    assert_eq!((row.summary.as_str(), row.is_archived), ("first", false));

    // Archive hides from the list, restore brings back, delete removes.
    assert!(store.set_summary(&alice, &a1, "renamed").await.unwrap());
    assert!(store.set_archived(&alice, &a1, true).await.unwrap());
    assert_eq!(ids(&store, &alice, 50, 0).await, (vec![a2.clone()], 1));
    let archived = store.session(&alice, &a1).await.unwrap().unwrap();
    assert_eq!((archived.is_archived, archived.summary.as_str()), (true, "renamed"));
    assert!(archived.updated_at >= archived.created_at);
    assert!(store.set_archived(&alice, &a1, false).await.unwrap());
    assert_eq!(ids(&store, &alice, 50, 0).await.1, 2);

    store.append_history(&[prompt(&a1, 1, "hi"), event(&a1, 1, "hello"), event(&b1, 1, "bob's words")]).await.unwrap();
    assert!(store.delete_session(&alice, &a1).await.unwrap());
    assert!(store.session(&alice, &a1).await.unwrap().is_none());
    assert_eq!(
        store.messages(&a1, None, 0, chatgate::store::HistoryView::All).await.unwrap().total,
        0,
        "history goes with the session"
    );
    assert_eq!(
        store.messages(&b1, None, 0, chatgate::store::HistoryView::All).await.unwrap().total,
        1,
        "other sessions keep theirs"
    );
    assert!(!store.delete_session(&alice, &a1).await.unwrap());
    assert_eq!(ids(&store, &alice, 50, 0).await, (vec![a2], 1));
}

async fn history_writes_are_idempotent(db: Db) {
    let (store, _dir) = store(db).await;
    let owner = user();
    let id = new_session(&store, &owner, "").await;
    let batch = vec![prompt(&id, 1, "question"), event(&id, 1, "one"), event(&id, 2, "two"), event(&id, 3, "three")];
    store.append_history(&batch).await.unwrap();
    let first = store.messages(&id, None, 0, chatgate::store::HistoryView::All).await.unwrap();
    // The same rows again (a retried batch), and an overlapping one.
    store.append_history(&batch).await.unwrap();
    assert_eq!(store.messages(&id, None, 0, chatgate::store::HistoryView::All).await.unwrap(), first);
    store.append_history(&[event(&id, 3, "three, rewritten"), event(&id, 4, "four")]).await.unwrap();
    let (items, total) = contents(&store, &id, None, 0).await;
    assert_eq!(total, 5);
    let want: Vec<(Value, String)> = vec![
        (Value::Null, "question".into()),
        (json!(1), "one".into()),
        (json!(2), "two".into()),
        (json!(3), "three".into()),
        (json!(4), "four".into()),
    ];
    assert_eq!(items, want, "the first write of a row wins; prompts carry seq null and come first");
    store.append_history(&[]).await.unwrap();

    // Pages count from the newest, oldest first inside a page.
    assert_eq!(contents(&store, &id, Some(2), 0).await.0, want[3..].to_vec());
    assert_eq!(contents(&store, &id, Some(2), 2).await.0, want[1..3].to_vec());
    assert_eq!(contents(&store, &id, Some(2), 4).await.0, want[..1].to_vec());
    assert_eq!(contents(&store, &id, Some(2), 5).await.0, vec![]);
    assert_eq!(contents(&store, &id, None, 1).await.0, want[..4].to_vec());
}

async fn last_seq_high_water_mark_only_rises(db: Db) {
    let (store, _dir) = store(db).await;
    let owner = user();
    let id = new_session(&store, &owner, "").await;
    let other = new_session(&store, &owner, "").await;
    let last_seq = |id: String| {
        let store = store.clone();
        let owner = owner.clone();
        async move { store.session(&owner, &id).await.unwrap().unwrap().last_seq }
    };
    store.append_history(&[event(&id, 10, "ten")]).await.unwrap();
    assert_eq!(last_seq(id.clone()).await, 10);
    store.append_history(&[event(&id, 5, "five (late)")]).await.unwrap();
    assert_eq!(last_seq(id.clone()).await, 10);
    store.raise_session_seq(&id, 3).await.unwrap();
    assert_eq!(last_seq(id.clone()).await, 10);
    store.raise_session_seq(&id, 12).await.unwrap();
    assert_eq!(last_seq(id.clone()).await, 12);
    store.append_history(&[event(&id, 13, "a"), event(&id, 20, "b"), event(&id, 15, "c")]).await.unwrap();
    assert_eq!(last_seq(id.clone()).await, 20);
    store.append_history(&[event(&id, 20, "b again")]).await.unwrap();
    assert_eq!(last_seq(id.clone()).await, 20);
    assert_eq!(last_seq(other.clone()).await, 0, "other sessions are untouched");
    // A mixed batch raises each session to its own top.
    store.append_history(&[event(&other, 7, "x"), event(&id, 21, "y"), event(&other, 2, "z")]).await.unwrap();
    assert_eq!((last_seq(id).await, last_seq(other).await), (21, 7));
}

fn draft(session: &str, seq: u64, content: &str) -> HistoryRow {
    HistoryRow { part: DRAFT_PART, ..event(session, seq, content) }
}

/// A stream's merged text, superseding its drafts from `from`.
fn merged(session: &str, seq: u64, from: u64, content: &str) -> HistoryRow {
    HistoryRow { supersedes_drafts_from: Some(from), ..event(session, seq, content) }
}

async fn drafts_are_not_history_and_their_merged_text_deletes_them(db: Db) {
    let (store, _dir) = store(db).await;
    let owner = user();
    let id = new_session(&store, &owner, "").await;
    store.append_history(&[prompt(&id, 1, "question"), event(&id, 1, "tool")]).await.unwrap();
    store.append_history(&[draft(&id, 3, "ab"), draft(&id, 5, "cd")]).await.unwrap();
    let (items, total) = contents(&store, &id, None, 0).await;
    assert_eq!((items.len(), total), (2, 2), "drafts are neither listed nor counted");
    assert_eq!(contents(&store, &id, Some(1), 0).await, (vec![(json!(1), "tool".into())], 2));
    assert_eq!(store.session(&owner, &id).await.unwrap().unwrap().last_seq, 5, "drafts raise the mark");
    let drafts = store.drafts(&id, 2, 9).await.unwrap();
    assert_eq!(drafts.iter().map(|(seq, _)| *seq).collect::<Vec<_>>(), [3, 5]);
    assert_eq!(serde_json::from_str::<Value>(&drafts[1].1).unwrap()["content"], "cd");
    assert_eq!(store.drafts(&id, 4, 9).await.unwrap().len(), 1);

    // The merged text deletes its stream's drafts in its transaction, not a later stream's
    // draft written with it.
    store.append_history(&[merged(&id, 6, 2, "abcde"), draft(&id, 8, "f")]).await.unwrap();
    assert_eq!(store.drafts(&id, 0, 100).await.unwrap().iter().map(|(seq, _)| *seq).collect::<Vec<_>>(), [8]);
    let (items, total) = contents(&store, &id, None, 0).await;
    assert_eq!(items.last(), Some(&(json!(6), "abcde".into())));
    assert_eq!(total, 3);
    // A cut stream's merged text sits at its last delta's seq, beside that delta's draft.
    store.append_history(&[merged(&id, 8, 8, "f")]).await.unwrap();
    assert!(store.drafts(&id, 0, 100).await.unwrap().is_empty());
    assert_eq!(contents(&store, &id, None, 0).await.1, 4);
}

/// A large batch (as the history writer makes under load): every row in seq order, two sessions
/// interleaved, a row repeated inside the batch keeps its first text, and a merged text in the
/// middle deletes the drafts written before it, as if every row were written on its own.
async fn large_batches_write_every_row_once_in_order(db: Db) {
    let (store, _dir) = store(db).await;
    let owner = user();
    let (id, other) = (new_session(&store, &owner, "").await, new_session(&store, &owner, "").await);
    let mut batch = vec![prompt(&id, 1, "question")];
    for seq in 1..=150 {
        batch.push(event(&id, seq, &format!("e{seq}")));
        if seq % 50 == 0 {
            batch.push(event(&other, seq, &format!("o{seq}")));
        }
    }
    batch.push(event(&id, 7, "seven again"));
    batch.extend([draft(&id, 152, "ab"), draft(&id, 154, "cd"), merged(&id, 155, 151, "abcde")]);
    // A draft in the merged text's range but after it in the batch was written after the delete.
    batch.extend([draft(&id, 153, "late"), draft(&id, 157, "f"), event(&id, 158, "last")]);
    store.append_history(&batch).await.unwrap();

    let (items, total) = contents(&store, &id, None, 0).await;
    let mut want: Vec<(Value, String)> = vec![(Value::Null, "question".into())];
    want.extend((1..=150).map(|seq| (json!(seq), format!("e{seq}"))));
    want.extend([(json!(155), "abcde".into()), (json!(158), "last".into())]);
    assert_eq!(total, 153);
    assert_eq!(items, want, "every row once, in seq order, the first text of a repeated row");
    assert_eq!(contents(&store, &other, None, 0).await.0.len(), 3);
    assert_eq!(store.drafts(&id, 0, 1000).await.unwrap().iter().map(|(seq, _)| *seq).collect::<Vec<_>>(), [153, 157]);
    assert_eq!(store.session(&owner, &id).await.unwrap().unwrap().last_seq, 158);
}

db_tests!(
    sessions_are_scoped_by_user,
    history_writes_are_idempotent,
    last_seq_high_water_mark_only_rises,
    drafts_are_not_history_and_their_merged_text_deletes_them,
    large_batches_write_every_row_once_in_order,
);
