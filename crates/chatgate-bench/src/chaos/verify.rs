//! Checks of a session once it is done (its driver moved on and history had
//! time to settle): its SQL history (REST) against what every client saw,
//! with the transcript rules of `src/gateway/transcript.rs` (the user's
//! prompt as a row without seq before the run's first event; consecutive
//! `stream_delta`s folded into one assistant `text` at their `stream_end`'s
//! seq, or at the last delta's when the run was cut; every other event as it
//! streamed), one `complete` per run and nothing after it, runs' seq ranges
//! apart, each run's events in its script's order, the jumps clients were not
//! told about, and how soon runs ended after their owner died. Redis's keys
//! and memory against the baseline: [`super::redis_usage`].

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    time::{Duration, SystemTime},
};

use serde_json::Value;
use tokio::time::Instant;

use super::{
    Ctx,
    cluster_faults::session_slot,
    faults::FaultKind,
    ledger::{self, Kind, SessionLog},
};

/// One history row with a seq.
struct Row {
    run: u32,
    kind: Kind,
    digest: u64,
    value: Value,
}

/// A merged assistant text: its seq and chunk numbers.
struct Merged {
    seq: u64,
    chunks: Vec<u32>,
}

#[derive(Default)]
struct RunView {
    completes: Vec<u64>,
    complete: Option<Value>,
    merged: Vec<Merged>,
    prompts: Vec<String>,
    in_history: bool,
    /// When its first event was recorded (the prompt row's timestamp) and when it ended.
    started: Option<SystemTime>,
    ended: Option<SystemTime>,
}

impl RunView {
    /// Whether Redis was restarted while the run went on (its seqs may jump then).
    fn spans_redis_restart(&self, restarts: &[SystemTime]) -> bool {
        let (Some(from), Some(to)) = (self.started, self.ended) else { return !restarts.is_empty() };
        let from = from.checked_sub(Duration::from_secs(2)).unwrap_or(from);
        restarts.iter().any(|at| *at >= from && *at <= to)
    }

    fn cut_by_owner_loss(&self) -> bool {
        self.complete.as_ref().is_some_and(|c| c["error"] == "run owner lost")
    }
}

fn parse_time(value: &Value) -> Option<SystemTime> {
    humantime::parse_rfc3339(value.as_str()?).ok()
}

/// Verifies one finished session; failures go to the tally.
pub async fn session(ctx: &Ctx, mut log: SessionLog) {
    let observed_runs: HashSet<u32> = log.known.values().map(|o| o.run).collect();
    // History settles shortly after a run ends (the owner's, or the reaper's, writer).
    let deadline = Instant::now() + Duration::from_secs(20);
    let history = loop {
        let history = ctx.history(log.user, &log.id).await;
        if let Some(messages) = &history {
            let complete_runs: HashSet<&str> =
                messages.iter().filter(|m| m["kind"] == "complete").filter_map(|m| m["runId"].as_str()).collect();
            let runs_with_rows: HashSet<&str> = messages.iter().filter_map(|m| m["runId"].as_str()).collect();
            let observed_complete =
                observed_runs.iter().all(|r| complete_runs.contains(log.run_ids[*r as usize].as_str()));
            if observed_complete && runs_with_rows.iter().all(|r| complete_runs.contains(r)) {
                break history;
            }
        }
        if Instant::now() > deadline {
            break history;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let Some(history) = history else {
        ctx.fail(ledger::AVAILABILITY, format!("session {}: history could not be read", log.id));
        return;
    };
    let id = log.id.clone();
    // The moments Redis may have lost this session's state: restarts of the one Redis, kills
    // of the primary serving its slot.
    let slot = session_slot(&log.id);
    let restarts: Vec<SystemTime> = ctx.fault_log().iter().filter(|f| f.loses_state_of(slot)).map(|f| f.at).collect();

    // History rows by seq, and per run.
    let mut rows: BTreeMap<u64, Row> = BTreeMap::new();
    let mut runs: HashMap<u32, RunView> = HashMap::new();
    for message in &history {
        let run = log.run(message["runId"].as_str().unwrap_or_default());
        let view = runs.entry(run).or_default();
        view.in_history = true;
        let Some(seq) = message["seq"].as_u64() else {
            view.prompts.push(message["content"].as_str().unwrap_or_default().to_string());
            view.started = parse_time(&message["timestamp"]);
            continue;
        };
        let kind = Kind::parse(message["kind"].as_str().unwrap_or_default());
        if kind == Kind::Complete {
            view.completes.push(seq);
            view.complete = Some(message.clone());
            view.ended = parse_time(&message["timestamp"]);
        }
        if kind == Kind::Text && message["role"] == "assistant" {
            match message["content"].as_str().and_then(ledger::merged_chunks) {
                Some(chunks) => {
                    if !chunks.windows(2).all(|w| w[1] == w[0] + 1) {
                        ctx.fail(
                            ledger::HISTORY_MISMATCH,
                            format!("session {id} seq {seq}: merged deltas out of order: {chunks:?}"),
                        );
                    }
                    view.merged.push(Merged { seq, chunks });
                }
                None => ctx.fail(
                    ledger::HISTORY_MISMATCH,
                    format!("session {id} seq {seq}: assistant text that is no merge of script deltas: {message}"),
                ),
            }
        }
        rows.insert(seq, Row { run, kind, digest: ledger::digest(message), value: message.clone() });
    }
    for run in &observed_runs {
        runs.entry(*run).or_default();
    }

    // Which seqs are known to belong to which run: seen by a client, in history, or folded into a merge.
    let mut owner_of: BTreeMap<u64, u32> = log.known.iter().map(|(seq, o)| (*seq, o.run)).collect();
    for (seq, row) in &rows {
        owner_of.entry(*seq).or_insert(row.run);
    }
    for (run, view) in &runs {
        for merged in &view.merged {
            for seq in merged_seqs(&log, *run, merged, view.spans_redis_restart(&restarts)) {
                owner_of.entry(seq).or_insert(*run);
            }
        }
    }

    // Plans by nonce (from the drivers' sends).
    let plans: HashMap<String, (&'static str, u64, SystemTime, Option<String>)> =
        log.sent.iter().map(|s| (s.nonce.clone(), (s.plan, s.events, s.sent_at, s.node.clone()))).collect();
    let nonce_of = |prompt: &str| -> Option<String> {
        serde_json::from_str::<Value>(prompt).ok()?["nonce"].as_str().map(str::to_string)
    };
    let plan_of = |view: &RunView| view.prompts.first().and_then(|p| nonce_of(p)).and_then(|n| plans.get(&n).cloned());

    // Runs that ended (as a client saw) just before their owner was killed: what their owner had
    // not written to SQL yet is lost (known bug).
    let faults = ctx.fault_log();
    // A run nobody saw end counts when its whole stream is in history (its merged text holds
    // the planned last delta), the seq after that merge is no other run's (its complete had it),
    // and its owner was killed after it started.
    let ended_unseen = |run: u32, view: &RunView, node: &str, started: SystemTime| {
        let Some((_, events, _, _)) = plan_of(view) else { return false };
        let Some(last) = view.merged.iter().find(|m| m.chunks.last() == Some(&(events as u32))) else { return false };
        let next_is_free = owner_of.get(&(last.seq + 1)).is_none_or(|r| *r == run);
        next_is_free
            && view.completes.is_empty()
            && faults.iter().any(|f| f.kind == FaultKind::Kill && f.node.as_deref() == Some(node) && f.at > started)
    };
    let killed_after_end: HashSet<u32> = runs
        .iter()
        .filter(|(run, view)| {
            let sent = plan_of(view).map(|p| (p.2, p.3));
            let Some((node, started)) = run_owner(ctx, &log.run_ids[**run as usize], sent) else { return false };
            let Some(done) = log.completed_at.get(run) else { return ended_unseen(**run, view, &node, started) };
            faults.iter().any(|f| {
                f.kind == FaultKind::Kill
                    && f.node.as_deref() == Some(node.as_str())
                    && f.at + Duration::from_millis(500) >= *done
                    && f.at <= *done + Duration::from_secs(3)
            })
        })
        .map(|(run, _)| *run)
        .collect();
    let missing = |run: u32, invariant: &'static str, what: String| {
        if killed_after_end.contains(&run) {
            ctx.known(ledger::ROWS_LOST_ON_KILL, &log.run_ids[run as usize], invariant, what);
        } else {
            ctx.fail(invariant, what);
        }
    };

    // Every event a client saw is in history as it streamed.
    for (seq, seen) in &log.known {
        let run_id = &log.run_ids[seen.run as usize];
        match seen.kind {
            Kind::Delta => {
                let Some(view) = runs.get(&seen.run) else { continue };
                // The merge that took this delta: the run's first one at or after it.
                let placed = view
                    .merged
                    .iter()
                    .filter(|m| m.seq >= *seq)
                    .min_by_key(|m| m.seq)
                    .is_some_and(|m| m.chunks.contains(&seen.chunk));
                if placed {
                    continue;
                }
                let what = format!(
                    "session {id} seq {seq}: delta chunk {} of run {run_id} is in no merged history text{}",
                    seen.chunk,
                    if view.cut_by_owner_loss() { " (run cut by its owner's loss)" } else { "" }
                );
                let window_outgrown =
                    view.completes.first().is_some_and(|c| c.saturating_sub(*seq) >= ctx.settings.replay_max_events);
                if view.merged.iter().all(|m| m.seq < *seq) && killed_after_end.contains(&seen.run) {
                    ctx.known(ledger::ROWS_LOST_ON_KILL, run_id, ledger::HISTORY_MISMATCH, what);
                } else if view.cut_by_owner_loss() && (window_outgrown || view.spans_redis_restart(&restarts)) {
                    // The reaper copies the run's stream, which no longer held these deltas.
                    ctx.known(ledger::CUT_STREAM_HISTORY, run_id, ledger::HISTORY_MISMATCH, what);
                } else {
                    ctx.fail(ledger::HISTORY_MISMATCH, what);
                }
            }
            Kind::StreamEnd => {
                if !rows.get(seq).is_some_and(|r| r.kind == Kind::Text && r.run == seen.run) {
                    missing(
                        seen.run,
                        ledger::HISTORY_MISMATCH,
                        format!(
                            "session {id} seq {seq}: stream_end of run {run_id} without the merged text in history"
                        ),
                    );
                }
            }
            _ => match rows.get(seq) {
                Some(row) if row.digest == seen.digest && row.run == seen.run => {}
                Some(row) => ctx.fail(
                    ledger::HISTORY_MISMATCH,
                    format!(
                        "session {id} seq {seq}: streamed {:?} of run {run_id}, history has {}",
                        seen.kind, row.value
                    ),
                ),
                None => missing(
                    seen.run,
                    ledger::HISTORY_MISMATCH,
                    format!("session {id} seq {seq}: streamed {:?} of run {run_id} is missing from history", seen.kind),
                ),
            },
        }
    }

    // Runs without a complete that a later run superseded after a Redis restart they were alive
    // for (known bug): the second run may even reuse their seqs.
    let superseded: HashSet<u32> = runs
        .iter()
        .filter(|(run, view)| {
            view.completes.is_empty()
                && !killed_after_end.contains(run)
                && view.started.is_some_and(|start| {
                    restarts
                        .iter()
                        .any(|at| *at > start && runs.values().any(|other| other.started.is_some_and(|s| s > *at)))
                })
        })
        .map(|(run, _)| *run)
        .collect();
    for suspect in &log.suspects {
        match suspect.runs.iter().find(|r| superseded.contains(r)) {
            Some(run) => ctx.known(
                ledger::RUN_SUPERSEDED_AFTER_REDIS_LOSS,
                &log.run_ids[*run as usize],
                suspect.invariant,
                suspect.text.clone(),
            ),
            None => ctx.fail(suspect.invariant, suspect.text.clone()),
        }
    }

    // Per run: one complete, nothing after it, a prompt, script order.
    let mut ranges: Vec<(u64, u64, u32)> = Vec::new();
    // The runs each prompt (nonce) shows up as in history: one at most, whatever was sent again.
    let mut nonces_seen: HashMap<String, Vec<u32>> = HashMap::new();
    for (run, view) in &runs {
        let run_id = &log.run_ids[*run as usize];
        if !view.in_history {
            missing(
                *run,
                ledger::HISTORY_MISMATCH,
                format!("session {id}: run {run_id} streamed but has no row in history"),
            );
        }
        if view.completes.is_empty() {
            let what = format!("session {id}: run {run_id} has no complete in history");
            if superseded.contains(run) {
                ctx.known(ledger::RUN_SUPERSEDED_AFTER_REDIS_LOSS, run_id, ledger::COMPLETE_NOT_ONCE, what);
            } else {
                missing(*run, ledger::COMPLETE_NOT_ONCE, what);
            }
        } else if view.completes.len() > 1 {
            ctx.fail(
                ledger::COMPLETE_NOT_ONCE,
                format!(
                    "session {id}: run {run_id} has {} completes in history {:?}",
                    view.completes.len(),
                    view.completes
                ),
            );
        }
        if view.in_history && view.prompts.is_empty() && view.cut_by_owner_loss() {
            ctx.known(
                ledger::PROMPT_LOST,
                run_id,
                ledger::HISTORY_MISMATCH,
                format!("session {id}: run {run_id}, ended for its lost owner, has no prompt row in history"),
            );
        } else if view.in_history && view.prompts.len() != 1 {
            let what = format!("session {id}: run {run_id} has {} prompt rows in history", view.prompts.len());
            // A run that reused a superseded run's first seq lost its prompt row to the other's.
            let first = owner_of.iter().find(|(_, r)| **r == *run).map(|(s, _)| *s);
            let reused = superseded.iter().find(|other| {
                let seqs = owner_of.iter().filter(|(_, r)| **r == **other).map(|(s, _)| *s);
                first.is_some_and(|f| {
                    seqs.clone().min().is_some_and(|lo| lo <= f) && seqs.max().is_some_and(|hi| f <= hi)
                })
            });
            match reused {
                Some(other) => ctx.known(
                    ledger::RUN_SUPERSEDED_AFTER_REDIS_LOSS,
                    &log.run_ids[*other as usize],
                    ledger::HISTORY_MISMATCH,
                    what,
                ),
                None => ctx.fail(ledger::HISTORY_MISMATCH, what),
            }
        }
        let plan = view.prompts.first().and_then(|p| nonce_of(p)).and_then(|nonce| {
            nonces_seen.entry(nonce.clone()).or_default().push(*run);
            plans.get(&nonce).cloned()
        });
        let seqs: Vec<u64> = owner_of.iter().filter(|(_, r)| **r == *run).map(|(s, _)| *s).collect();
        if let (Some(first), Some(last)) = (seqs.first(), seqs.last()) {
            ranges.push((*first, *last, *run));
        }
        let complete_seq = view.completes.iter().min().copied();
        if let Some(complete_seq) = complete_seq {
            let after: Vec<u64> = seqs.iter().copied().filter(|s| *s > complete_seq).collect();
            if !after.is_empty() {
                ctx.fail(
                    ledger::EVENT_AFTER_COMPLETE,
                    format!("session {id}: run {run_id} has events at {after:?} after its complete at {complete_seq}"),
                );
            }
        }
        script_order(ctx, &log, &rows, *run, &id, view.spans_redis_restart(&restarts));
        if let Some(complete) = &view.complete {
            outcome(ctx, complete);
            if complete["success"] == true
                && let Some((_, events, _, _)) = plan
                && events > 0
            {
                let has_last =
                    log.known.values().any(|o| o.run == *run && o.kind == Kind::Delta && o.chunk as u64 == events)
                        || view.merged.iter().any(|m| m.chunks.contains(&(events as u32)));
                if !has_last {
                    ctx.fail(
                        ledger::SCRIPT_ORDER,
                        format!("session {id}: run {run_id} succeeded but its delta {events} is nowhere"),
                    );
                }
            }
            stuck(ctx, &log, *run, view, plan.as_ref().map(|p| (p.2, p.3.clone())));
        }
    }
    // Runs that ended while their driver was away are in history with their complete.
    for (nonce, base, detail) in &log.ended_away {
        let by_nonce = runs.values().any(|v| v.prompts.first().and_then(|p| nonce_of(p)).as_deref() == Some(nonce));
        if by_nonce {
            continue; // its complete was checked with the run
        }
        if runs.values().any(|v| v.prompts.is_empty() && v.completes.iter().any(|c| c > base)) {
            ctx.add("runs_ended_away_found_without_prompt", 1);
        } else {
            ctx.fail(
                ledger::COMPLETE_NOT_ONCE,
                format!(
                    "session {id}: run {nonce} ended while its driver was away but history has no such run ({detail})"
                ),
            );
        }
    }
    ctx.add("runs", runs.values().filter(|v| v.in_history).count() as u64);
    for (nonce, started) in nonces_seen.iter().filter(|(_, runs)| runs.len() > 1) {
        let plan = plans.get(nonce).map_or("?", |p| p.0);
        let run_ids: Vec<&str> = started.iter().take(4).map(|r| log.run_ids[*r as usize].as_str()).collect();
        let more = if started.len() > run_ids.len() { ", …" } else { "" };
        ctx.fail(
            ledger::RUNS_SENT_AGAIN_AND_STARTED_TWICE,
            format!("session {id}: prompt {nonce} ({plan}) started {} runs: {run_ids:?}{more}", started.len()),
        );
    }
    ranges.sort();
    for pair in ranges.windows(2) {
        if pair[1].0 <= pair[0].1 {
            let what = format!(
                "session {id}: runs {} (seqs {}..={}) and {} (seqs {}..={}) overlap",
                log.run_ids[pair[0].2 as usize],
                pair[0].0,
                pair[0].1,
                log.run_ids[pair[1].2 as usize],
                pair[1].0,
                pair[1].1
            );
            match [pair[0].2, pair[1].2].into_iter().find(|r| superseded.contains(r)) {
                Some(run) => ctx.known(
                    ledger::RUN_SUPERSEDED_AFTER_REDIS_LOSS,
                    &log.run_ids[run as usize],
                    ledger::SEQ_REUSED,
                    what,
                ),
                None => ctx.fail(ledger::SEQ_REUSED, what),
            }
        }
    }

    // Jumps clients were not told about.
    for gap in &log.gaps {
        let between: Vec<(u64, u32)> = owner_of.range(gap.after + 1..gap.seq).map(|(s, r)| (*s, *r)).collect();
        let run_id = &log.run_ids[gap.run as usize];
        let failure = if gap.previous_run == Some(gap.run) {
            Some(format!("seq jumped from {} to {} inside run {run_id}", gap.after, gap.seq))
        } else if let Some((missed, _)) = between.iter().find(|(_, r)| *r == gap.run) {
            Some(format!(
                "got seq {} after {}; seq {missed} of the same run {run_id} was never delivered",
                gap.seq, gap.after
            ))
        } else {
            None
        };
        match failure {
            Some(what) => ctx.fail(
                ledger::SEQ_GAP_UNTOLD,
                format!("{} session {id}: {what}, without replayTruncated; trace: {}", gap.client, gap.trace),
            ),
            None if between.is_empty() => ctx.add("run_starts_after_a_seq_jump", 1),
            None => ctx.add("resubscribes_past_ended_runs", 1),
        }
    }

    // The session is idle now, at the seq history ends with.
    let top = rows.keys().next_back().copied().unwrap_or(0);
    if let Some(shown) = ctx.get_json(log.user, &format!("/api/providers/sessions/{id}")).await {
        if shown["data"]["isProcessing"] != false {
            ctx.fail(
                ledger::STUCK_PROCESSING,
                format!("session {id}: still processing after its driver is done: {shown}"),
            );
        }
        if shown["data"]["lastSeq"].as_u64() != Some(top) {
            let what = format!("session {id}: lastSeq {} but history ends at seq {top}", shown["data"]["lastSeq"]);
            if killed_after_end.is_empty() {
                ctx.fail(ledger::HISTORY_MISMATCH, what);
            } else {
                ctx.known(ledger::ROWS_LOST_ON_KILL, &id, ledger::HISTORY_MISMATCH, what);
            }
        }
    }
    let mut owners = ctx.owners.lock().unwrap_or_else(|e| e.into_inner());
    for run_id in &log.run_ids {
        owners.remove(run_id);
    }
}

/// The seqs of the deltas folded into a merged text. Exact when clients saw
/// some of them (one offset from chunk number to seq); else, when the run's
/// seqs cannot have jumped, the ones that are deltas whether a `stream_end`
/// or the last delta holds the merge.
fn merged_seqs(log: &SessionLog, run: u32, merged: &Merged, may_jump: bool) -> Vec<u64> {
    let offsets: HashSet<i64> = log
        .known
        .iter()
        .filter(|(_, o)| o.run == run && o.kind == Kind::Delta && merged.chunks.contains(&o.chunk))
        .map(|(seq, o)| *seq as i64 - i64::from(o.chunk))
        .collect();
    if offsets.len() == 1 {
        let offset = offsets.into_iter().next().unwrap_or(0);
        return merged.chunks.iter().filter_map(|c| u64::try_from(offset + i64::from(*c)).ok()).collect();
    }
    if !offsets.is_empty() || may_jump {
        return Vec::new();
    }
    let span = merged.chunks.len() as u64;
    ((merged.seq + 1).saturating_sub(span)..merged.seq).collect()
}

/// Events of one run (seen by clients, or in history) in its script's order.
/// Its deltas keep one chunk-to-seq offset, which may only grow when Redis
/// restarted during the run (seqs jump ahead then).
fn script_order(ctx: &Ctx, log: &SessionLog, rows: &BTreeMap<u64, Row>, run: u32, id: &str, may_jump: bool) {
    let mut items: BTreeMap<u64, (Kind, u32)> = BTreeMap::new();
    for (seq, row) in rows.iter().filter(|(_, r)| r.run == run && r.kind != Kind::Text) {
        items.insert(*seq, (row.kind, 0));
    }
    for (seq, seen) in log.known.iter().filter(|(_, o)| o.run == run) {
        items.insert(*seq, (seen.kind, seen.chunk));
    }
    let run_id = &log.run_ids[run as usize];
    let mut previous: Option<(u64, Kind)> = None;
    let mut delta_offset: Option<i64> = None;
    for (seq, (kind, chunk)) in &items {
        if let Some((prev_seq, prev_kind)) = previous
            && (prev_kind.rank() > kind.rank() || prev_kind == Kind::Complete)
        {
            ctx.fail(
                ledger::SCRIPT_ORDER,
                format!("session {id} run {run_id}: {kind:?} at seq {seq} after {prev_kind:?} at seq {prev_seq}"),
            );
        }
        if *kind == Kind::Delta {
            let offset = *seq as i64 - i64::from(*chunk);
            match delta_offset {
                Some(known) if offset > known && may_jump => {
                    ctx.add("in_run_seq_jumps_after_redis_restart", 1);
                    delta_offset = Some(offset);
                }
                Some(known) if known != offset => ctx.fail(
                    ledger::SCRIPT_ORDER,
                    format!("session {id} run {run_id}: delta chunk {chunk} at seq {seq} out of place"),
                ),
                _ => delta_offset = Some(offset),
            }
        }
        previous = Some((*seq, *kind));
    }
}

fn outcome(ctx: &Ctx, complete: &Value) {
    let name = match (complete["error"].as_str(), complete["aborted"] == true, complete["success"] == true) {
        (Some("run owner lost"), _, _) => "outcome_owner_lost",
        (Some("node draining"), _, _) => "outcome_ended_by_drain",
        (_, true, _) => "outcome_aborted",
        (_, _, true) => "outcome_success",
        _ => "outcome_failed_as_scripted",
    };
    ctx.add(name, 1);
}

/// A run's owner node and start: from `GET …/running`, else the driver's socket when it sent it.
fn run_owner(ctx: &Ctx, run_id: &str, sent: Option<(SystemTime, Option<String>)>) -> Option<(String, SystemTime)> {
    let owner = ctx.owners.lock().unwrap_or_else(|e| e.into_inner()).get(run_id).cloned();
    match (owner, sent) {
        (Some(owner), _) => Some(owner),
        (None, Some((sent_at, Some(node)))) => Some((node, sent_at)),
        _ => None,
    }
}

/// A run alive when its owner died (or began to drain) must have ended by the fault's deadline.
fn stuck(ctx: &Ctx, log: &SessionLog, run: u32, view: &RunView, sent: Option<(SystemTime, Option<String>)>) {
    let run_id = &log.run_ids[run as usize];
    let Some((node, started)) = run_owner(ctx, run_id, sent) else { return };
    // A run without a complete never ended (a failure of its own); acks may still show it stuck.
    let never_ended = view.ended.is_none();
    let ended = view.ended.unwrap_or(SystemTime::now());
    let settings = &ctx.settings;
    let acks: Vec<SystemTime> = log.processing_acks.iter().filter(|(_, r)| *r == run).map(|(t, _)| *t).collect();
    for fault in ctx.fault_log().iter().filter(|f| f.node.as_deref() == Some(node.as_str())) {
        let Some(deadline) = fault.deadline(settings.lease, settings.drain_grace) else { continue };
        if started >= fault.at || ended <= fault.at {
            continue;
        }
        ctx.add("runs_whose_owner_failed", 1);
        let late_ack = acks.iter().any(|t| *t > deadline);
        if (ended > deadline && !never_ended) || late_ack {
            ctx.fail(
                ledger::STUCK_PROCESSING,
                format!(
                    "session {} run {run_id} on {node}: owner {} at {:?}, run ended {:.1}s later (limit {:.1}s){}",
                    log.id,
                    fault.kind.name(),
                    fault.at,
                    ended.duration_since(fault.at).unwrap_or_default().as_secs_f64(),
                    deadline.duration_since(fault.at).unwrap_or_default().as_secs_f64(),
                    if late_ack { "; an ack showed it processing after the limit" } else { "" }
                ),
            );
        }
    }
}
