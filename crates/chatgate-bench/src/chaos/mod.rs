//! `chaos`: a soak under faults (issue 8, part 1). Three cluster nodes
//! behind nginx, a private Redis, PostgreSQL; many concurrent `script` runs
//! (tool approvals answered from other sockets, denied, left to time out or
//! aborted; aborts from another node; runs nobody watches for a while) and
//! clients that hop between nginx and the nodes and resume by `lastSeq`;
//! meanwhile, on a schedule: `kill -9` a node and restart it, SIGSTOP one past
//! its lease then SIGCONT it, restart Redis empty, SIGTERM-drain one and
//! restart it. Drivers send every prompt with an idempotency key and resend it
//! with the same key when they cannot tell whether it arrived; a prompt that
//! starts more than one run is a failure. Every invariant is checked for every
//! session and client and reported as a failure count, with totals; the exit
//! code is non-zero if any failed. See docs/reliability.md.
//!
//! - [`stack`]: the nodes, nginx, the private Redis ([`soak_redis`]: one server or a cluster).
//! - [`peer`]: one logical client and its per-frame checks.
//! - [`load`]: drivers (runs), watchers (other tabs), aborts.
//! - [`faults`]: the fault rotation; [`cluster_faults`]: a Redis Cluster's;
//!   [`diagnose`]: what a node that would not exit was doing.
//! - [`monitor`]: running runs and resources while the soak goes on.
//! - [`verify`]: a finished session against history; [`redis_usage`]: Redis after retention.
//! - [`ledger`]: the shared book of observations and the tally.

mod cluster_faults;
mod diagnose;
mod faults;
mod ledger;
mod load;
mod monitor;
mod peer;
mod redis_usage;
mod soak_redis;
mod stack;
mod verify;

use std::{
    collections::{HashMap, VecDeque},
    path::Path,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, SystemTime},
};

use anyhow::bail;
use serde_json::{Value, json};
use tokio::{sync::watch, time::Instant};

use crate::{client::SECRET, cluster::ClusterArgs};
use faults::FaultRecord;
use ledger::Book;
use stack::{NodeSettings, Stack};

/// Nodes of the soak.
const NODES: usize = 3;
/// How long a retired session rests before it is checked against history.
const SETTLE: Duration = Duration::from_secs(6);
/// How often resources are sampled.
const SAMPLE_EVERY: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, clap::Args)]
pub struct ChaosArgs {
    /// Minutes of load under faults (then the load stops and the checks run).
    #[arg(long, default_value_t = 2.0)]
    pub minutes: f64,
    /// Drivers: each sends runs on its own session, a new session every `--runs-per-session`.
    #[arg(long, default_value_t = 12)]
    pub drivers: usize,
    /// Watchers per session: other tabs of the user, one of which answers each tool approval.
    #[arg(long, default_value_t = 2)]
    pub watchers: usize,
    /// Users the drivers are spread over.
    #[arg(long, default_value_t = 3)]
    pub users: usize,
    #[arg(long, default_value_t = 6)]
    pub runs_per_session: usize,
    /// `--run-lease` of the nodes, in milliseconds.
    #[arg(long, default_value_t = 3000)]
    pub lease_ms: u64,
    /// `--replay-retention` of the nodes, in seconds.
    #[arg(long, default_value_t = 10)]
    pub retention_s: u64,
    /// `--drain-grace` of the nodes, in milliseconds.
    #[arg(long, default_value_t = 3000)]
    pub drain_grace_ms: u64,
    /// `--replay-max-events` of the nodes (small, so that long runs outgrow it).
    #[arg(long, default_value_t = 256)]
    pub replay_max_events: u64,
    /// Seconds from the start of one fault to the start of the next.
    #[arg(long, default_value_t = 8)]
    pub fault_every_s: u64,
    /// Seconds of load before the first fault.
    #[arg(long, default_value_t = 8)]
    pub warmup_s: u64,
    /// A known gateway bug (docs/reliability.md) not to count as a failure while it is open
    /// (repeatable; its occurrences are still counted and shown): `cut-stream-history`,
    /// `prompt-lost`, `rows-lost-on-kill`, `run-superseded-after-redis-loss`.
    #[arg(long = "tolerate-known-bug", value_parser = known_bug)]
    pub tolerate: Vec<String>,
    /// Run on a private Redis Cluster (3 primaries, 1 replica each; `--redis-mode cluster`):
    /// the Redis restart fault is replaced by a primary killed (failed over, then restarted
    /// as a replica) and live sessions' slots migrated between primaries.
    #[arg(long)]
    pub redis_cluster: bool,
}

fn known_bug(raw: &str) -> Result<String, String> {
    ledger::KNOWN_BUGS.iter().find(|(id, _)| *id == raw).map(|(id, _)| id.to_string()).ok_or_else(|| {
        let ids: Vec<&str> = ledger::KNOWN_BUGS.iter().map(|(id, _)| *id).collect();
        format!("unknown bug {raw:?}; known: {}", ids.join(", "))
    })
}

/// What every task of the soak shares.
pub struct Ctx {
    pub args: ChaosArgs,
    pub settings: NodeSettings,
    pub lb_port: u16,
    pub node_ports: Vec<u16>,
    pub node_ids: Vec<String>,
    /// One token per user.
    pub tokens: Vec<String>,
    pub http: reqwest::Client,
    book: Mutex<Book>,
    pub faults: Mutex<Vec<FaultRecord>>,
    /// Run id → (owner node, start), from `GET …/running`.
    pub owners: Mutex<HashMap<String, (String, SystemTime)>>,
    retired: Mutex<VecDeque<(Instant, String)>>,
    /// Drivers finish their current run and stop.
    pub stop_sending: AtomicBool,
    /// Everything else stops.
    pub stop_all: AtomicBool,
    pub started: Instant,
    pub started_wall: SystemTime,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl Ctx {
    pub fn book(&self) -> MutexGuard<'_, Book> {
        lock(&self.book)
    }

    pub fn fail(&self, invariant: &'static str, example: String) {
        self.book().tally.fail(invariant, example);
    }

    /// An occurrence of a known gateway bug (a failure of `invariant` unless tolerated).
    pub fn known(&self, bug: &'static str, run: &str, invariant: &'static str, example: String) {
        let tolerated = self.args.tolerate.iter().any(|t| t == bug);
        self.book().tally.known(bug, run, invariant, example, tolerated);
    }

    pub fn add(&self, total: &str, n: u64) {
        self.book().tally.add(total, n);
    }

    pub fn elapsed_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    pub fn fault_log(&self) -> Vec<FaultRecord> {
        lock(&self.faults).clone()
    }

    /// A driver is done with a session: it is checked once it settled.
    pub fn retire(&self, session: &str) {
        lock(&self.retired).push_back((Instant::now(), session.to_string()));
    }

    /// The port of the `attempt`-th REST try: nginx first, then the nodes in turn.
    pub fn rest_port(&self, attempt: usize) -> u16 {
        match attempt % (self.node_ports.len() + 1) {
            0 => self.lb_port,
            i => self.node_ports[i - 1],
        }
    }

    /// One GET, its JSON body on success.
    pub async fn get_once(&self, user: usize, path: &str, port: u16) -> Option<Value> {
        let response = self
            .http
            .get(format!("http://127.0.0.1:{port}{path}"))
            .bearer_auth(&self.tokens[user])
            .send()
            .await
            .ok()?;
        if !response.status().is_success() {
            return None;
        }
        response.json().await.ok()
    }

    /// A GET retried over nginx and the nodes for up to 20 s.
    pub async fn get_json(&self, user: usize, path: &str) -> Option<Value> {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut attempt = 0;
        while Instant::now() < deadline {
            if let Some(body) = self.get_once(user, path, self.rest_port(attempt)).await {
                return Some(body);
            }
            attempt += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        None
    }

    /// A session's whole record (`kinds=all`: every stored event, each `complete` too), oldest first.
    pub async fn history(&self, user: usize, session: &str) -> Option<Vec<Value>> {
        let body = self.get_json(user, &format!("/api/providers/sessions/{session}/messages?kinds=all")).await?;
        body["data"]["messages"].as_array().cloned()
    }
}

/// Checks retired sessions once they settled, until the soak stops and none is left.
async fn verifier(ctx: Arc<Ctx>) {
    loop {
        let due = {
            let mut retired = lock(&ctx.retired);
            match retired.front() {
                Some((at, _)) if at.elapsed() >= SETTLE => retired.pop_front().map(|(_, id)| id),
                None if ctx.stop_all.load(Ordering::SeqCst) => return,
                _ => None,
            }
        };
        match due {
            Some(id) => {
                let log = ctx.book().sessions.remove(&id);
                if let Some(log) = log {
                    verify::session(&ctx, log).await;
                    ctx.add("sessions_verified", 1);
                }
            }
            None => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// What became of the drivers' keyed sends (every prompt carries a `clientRequestId`).
fn idempotency(tally: &ledger::Tally) -> Value {
    let total = |name: &str| tally.totals.get(name).copied().unwrap_or(0);
    let failures = |name: &str| tally.failures.get(name).copied().unwrap_or(0);
    json!({
        "sends": total("prompt_sends"),
        "resends_same_key": total("prompt_resends"),
        "accepted_fresh": total("sends_accepted"),
        "resends_answered_duplicate": total("resends_answered_duplicate_accepted")
            + total("resends_answered_duplicate_run_in_progress"),
        "resends_answered_duplicate_accepted": total("resends_answered_duplicate_accepted"),
        "resends_answered_duplicate_run_in_progress": total("resends_answered_duplicate_run_in_progress"),
        "outcome_unknown_answers": total("outcome_unknown_answers"),
        "sockets_lost_right_after_a_send": total("sockets_lost_right_after_a_send"),
        "racing_sends_from_another_node": total("racing_sends"),
        "racing_sends_answered_fresh": total("racing_sends_answered_duplicate_false"),
        "racing_sends_answered_duplicate": total("racing_sends_answered_duplicate_true"),
        "keys_renewed_after_run_in_progress": total("keys_renewed"),
        "runs_sent_again_and_started_twice": failures(ledger::RUNS_SENT_AGAIN_AND_STARTED_TWICE),
        "idempotency_answers_failed": failures(ledger::IDEMPOTENCY_ANSWERS),
    })
}

/// Runs the soak; the result's `passed` is false if any invariant failed.
pub async fn run(bin: &Path, cluster: &ClusterArgs, args: &ChaosArgs) -> anyhow::Result<Value> {
    if args.watchers == 0 || args.users == 0 || args.drivers == 0 || args.runs_per_session == 0 {
        bail!("--drivers, --watchers, --users and --runs-per-session must be at least 1");
    }
    if args.minutes.is_nan() || args.minutes <= 0.0 {
        bail!("--minutes must be positive");
    }
    let settings = NodeSettings {
        lease: Duration::from_millis(args.lease_ms),
        retention: Duration::from_secs(args.retention_s),
        drain_grace: Duration::from_millis(args.drain_grace_ms),
        replay_max_events: args.replay_max_events,
    };
    let stack = Arc::new(Stack::start(bin, cluster, NODES, settings.clone(), args.redis_cluster).await?);
    let outcome = soak(&stack, args, settings).await;
    let failed = outcome.as_ref().map_or(true, |r| r["passed"] != true);
    if failed {
        eprintln!("{}", stack.log_tails(30));
    }
    let Ok(stack) = Arc::try_unwrap(stack) else { bail!("the stack is still in use after the soak") };
    let kept = stack.stop(failed).await;
    let mut result = outcome?;
    if let Some(dir) = kept {
        result["logs_kept_in"] = json!(dir.display().to_string());
    }
    Ok(result)
}

async fn soak(stack: &Arc<Stack>, args: &ChaosArgs, settings: NodeSettings) -> anyhow::Result<Value> {
    let baseline = redis_usage::redis_usage(&stack.redis.key_holders().await?).await?;
    let auth = chatgate::auth::Auth::new(SECRET.as_bytes());
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let tokens = (0..args.users)
        .map(|i| auth.mint(&format!("chaos-{}-{i}", &tag[..8]), Duration::from_secs(48 * 3600)))
        .collect::<Result<Vec<_>, _>>()?;
    let ctx = Arc::new(Ctx {
        args: args.clone(),
        settings: settings.clone(),
        lb_port: stack.lb_port(),
        node_ports: stack.node_ports.clone(),
        node_ids: stack.node_ids.clone(),
        tokens,
        http: reqwest::Client::builder().timeout(Duration::from_secs(3)).build()?,
        book: Mutex::default(),
        faults: Mutex::default(),
        owners: Mutex::default(),
        retired: Mutex::default(),
        stop_sending: AtomicBool::new(false),
        stop_all: AtomicBool::new(false),
        started: Instant::now(),
        started_wall: SystemTime::now(),
    });
    let load_for = Duration::from_secs_f64(args.minutes * 60.0);
    let until = ctx.started + load_for;
    let running = tokio::spawn(monitor::running(ctx.clone()));
    let sampler = tokio::spawn(monitor::sample(ctx.clone(), stack.clone(), SAMPLE_EVERY));
    let checker = tokio::spawn(verifier(ctx.clone()));
    let injector = tokio::spawn(faults::inject(
        ctx.clone(),
        stack.clone(),
        ctx.started + Duration::from_secs(args.warmup_s),
        Duration::from_secs(args.fault_every_s),
        until,
    ));
    let mut drivers = Vec::new();
    let mut watchers = Vec::new();
    for slot in 0..args.drivers {
        let (tx, rx) = watch::channel(None);
        drivers.push(tokio::spawn(load::driver(ctx.clone(), slot, tx)));
        for index in 0..args.watchers {
            watchers.push(tokio::spawn(load::watcher(ctx.clone(), slot, index, rx.clone())));
        }
    }
    tokio::time::sleep_until(until).await;
    ctx.stop_sending.store(true, Ordering::SeqCst);
    let _ = injector.await;
    let load_ended = Instant::now();
    for driver in drivers {
        let _ = driver.await;
    }
    let drivers_done_in = load_ended.elapsed();
    ctx.stop_all.store(true, Ordering::SeqCst);
    for watcher in watchers {
        let _ = watcher.await;
    }
    let _ = running.await;
    let samples = sampler.await.unwrap_or_default();
    let _ = checker.await;
    let redis = redis_usage::redis_after_retention(&ctx, &stack.redis, &baseline).await;

    let origin = ctx.started_wall;
    let fault_log: Vec<Value> = ctx.fault_log().iter().map(|f| f.to_json(origin)).collect();
    let book = ctx.book();
    let tally = book.tally.to_json();
    let failed = book.tally.failed();
    let faults: serde_json::Map<String, Value> = faults::FaultKind::rotation(args.redis_cluster)
        .iter()
        .map(|k| {
            (k.name().to_string(), json!(book.tally.totals.get(&format!("faults_{}", k.name())).copied().unwrap_or(0)))
        })
        .collect();
    Ok(json!({
        "passed": failed == 0,
        "failed_checks": failed,
        "minutes": args.minutes,
        "nodes": NODES,
        "redis_mode": if args.redis_cluster {
            format!("Redis Cluster, {} primaries × {} replica", soak_redis::CLUSTER_PRIMARIES, soak_redis::CLUSTER_REPLICAS)
        } else {
            "one redis-server".to_string()
        },
        "drivers": args.drivers,
        "watchers_per_session": args.watchers,
        "users": args.users,
        "lease_ms": args.lease_ms,
        "retention_s": args.retention_s,
        "drain_grace_ms": args.drain_grace_ms,
        "replay_max_events": args.replay_max_events,
        "failures": tally["failures"],
        "idempotency": idempotency(&book.tally),
        "faults": faults,
        "totals": tally["totals"],
        "examples": tally["examples"],
        "known_bugs_tolerated": args.tolerate,
        "known_bug_examples": tally["known_bug_examples"],
        "redis": redis,
        "resources": monitor::summary(&samples),
        "drivers_finished_s_after_load": drivers_done_in.as_secs(),
        "fault_log": fault_log,
    }))
}
