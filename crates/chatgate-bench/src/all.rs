//! `all`: every scenario at the size of docs/benchmarks.md, one after another
//! on fresh nodes, then one Markdown table (figure, chatgate, target, peers)
//! and the Redis ceiling with the gateway's ratios to it.

use std::path::Path;

use chatgate_testkit::redis::PrivateRedis;
use serde_json::{Value, json};

use crate::{
    ceiling,
    cluster::{Cluster, ClusterArgs},
    fanout::{self, FanoutArgs},
    idle::{self, IdleArgs},
    reconnect::{self, ReconnectArgs},
    replay::{self, ReplayArgs},
    start::{self, StartArgs},
};

/// Runs one scenario on fresh cluster nodes.
macro_rules! on_cluster {
    ($bin:expr, $args:expr, $nodes:expr, |$c:ident| $body:expr) => {{ on_cluster!($bin, $args, $nodes, &[], |$c| $body) }};
    ($bin:expr, $args:expr, $nodes:expr, $flags:expr, |$c:ident| $body:expr) => {{
        let $c = Cluster::start($bin, $args, $nodes, $flags).await?;
        let result = $body.await;
        $c.stop().await;
        result?
    }};
}

pub async fn run(bin: &Path, args: &ClusterArgs, idle_sockets: usize, storm_clients: usize) -> anyhow::Result<Value> {
    let say = |what: &str| eprintln!("chatgate-bench all: {what}");
    say("ceiling");
    let ceiling = {
        let private = if args.private_redis { Some(PrivateRedis::start()?) } else { None };
        let url = private.as_ref().map_or(args.redis_url.clone(), |r| r.url());
        let result = ceiling::measure(&url).await;
        drop(private);
        result?
    };
    let shape = FanoutArgs { runs: 100, subscribers: 10, events: 1000, payload_bytes: 64, rate: None, seconds: 10.0 };
    say("fanout, flat out");
    let flat_out = on_cluster!(bin, args, 3, |c| fanout::measure(&c, &shape));
    say("latency, paced at 10 000 deliveries/s");
    let paced =
        on_cluster!(bin, args, 3, |c| fanout::measure(&c, &FanoutArgs { rate: Some(10_000.0), ..shape.clone() }));
    let capacity = flat_out["delivered_per_sec"].as_f64().unwrap_or(10_000.0).min(fanout::max_paced_rate(&shape));
    say("latency, paced at the flat-out rate");
    let saturated =
        on_cluster!(bin, args, 3, |c| fanout::measure(&c, &FanoutArgs { rate: Some(capacity), ..shape.clone() }));
    say("reconnect, 200 missed events");
    let missed = ReconnectArgs { clients: 1, sessions: 1, missed: 200, interval_ms: 1, run_ms: 3000, rounds: 5 };
    let reconnect = on_cluster!(bin, args, 3, |c| reconnect::measure(&c, &missed));
    say("storm");
    let storm_shape = ReconnectArgs {
        clients: storm_clients,
        sessions: 100,
        missed: 0,
        interval_ms: 1000,
        run_ms: 40_000,
        rounds: 1,
    };
    let storm = on_cluster!(bin, args, 3, |c| reconnect::measure(&c, &storm_shape));
    say("replay of 10 000 events");
    let replay_shape = ReplayArgs { events: 10_000, readers: 3, payload_bytes: 64 };
    let replay = on_cluster!(bin, args, 3, &replay::node_flags(&replay_shape), |c| replay::measure(&c, &replay_shape));
    say("start");
    let start_shape = StartArgs { starters: 10, sends: 20, load_rate: 10_000.0, pause_ms: 0 };
    let start = on_cluster!(bin, args, 3, |c| start::measure(&c, &start_shape));
    let idle_shape = |cluster| IdleArgs { sockets: idle_sockets, cluster, processes: 0, compare_bin: None, repeat: 1 };
    say("idle, single node");
    let idle_single = idle::run(bin, args, &idle_shape(false)).await?;
    say("idle, cluster node");
    let idle_cluster = idle::run(bin, args, &idle_shape(true)).await?;

    let rows = table(&Figures {
        ceiling: &ceiling,
        flat_out: &flat_out,
        paced: &paced,
        saturated: &saturated,
        reconnect: &reconnect,
        storm: &storm,
        replay: &replay,
        start: &start,
        idle_single: &idle_single,
        idle_cluster: &idle_cluster,
    });
    Ok(json!({
        "markdown": rows,
        "ceiling": ceiling, "fanout": flat_out, "paced": paced, "paced_at_capacity": saturated,
        "reconnect": reconnect, "storm": storm, "replay": replay, "start": start,
        "idle_single_node": idle_single, "idle_cluster_node": idle_cluster,
    }))
}

struct Figures<'a> {
    ceiling: &'a Value,
    flat_out: &'a Value,
    paced: &'a Value,
    saturated: &'a Value,
    reconnect: &'a Value,
    storm: &'a Value,
    replay: &'a Value,
    start: &'a Value,
    idle_single: &'a Value,
    idle_cluster: &'a Value,
}

fn num(value: &Value, pointer: &str) -> String {
    match value.pointer(pointer) {
        Some(Value::Number(n)) => match n.as_f64() {
            Some(x) if x.fract() == 0.0 && x.abs() < 1e15 => format!("{}", x as i64),
            _ => n.to_string(),
        },
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
        None => "?".into(),
    }
}

fn ratio(a: &Value, pa: &str, b: &Value, pb: &str) -> String {
    match (a.pointer(pa).and_then(Value::as_f64), b.pointer(pb).and_then(Value::as_f64)) {
        (Some(x), Some(y)) if y > 0.0 => format!("{:.2}", x / y),
        _ => "?".into(),
    }
}

/// `<appended/s> ÷ <XADD/s> = <ratio>`.
fn appended_ratio(flat_out: &Value, ceiling: &Value) -> String {
    let appended = flat_out.pointer("/appended_events").and_then(Value::as_f64).unwrap_or(0.0);
    let secs = flat_out.pointer("/seconds").and_then(Value::as_f64).unwrap_or(0.0);
    let xadd = ceiling.pointer("/xadd_per_sec_pipelined").and_then(Value::as_f64).unwrap_or(0.0);
    if secs <= 0.0 || xadd <= 0.0 {
        return "?".into();
    }
    let rate = appended / secs;
    format!("{rate:.0} ÷ {xadd:.0} = {:.3}", rate / xadd)
}

/// The Markdown result table.
fn table(f: &Figures) -> String {
    let seq_clean = |v: &Value| {
        if v["seq"]["gaps"] == 0 && v["seq"]["duplicates"] == 0 && v["seq"]["reorders"] == 0 { "0" } else { "NOT 0" }
    };
    let rows: Vec<[String; 5]> = vec![
        [
            "RSS per idle subscribed socket, single node / cluster node".into(),
            format!(
                "{} / {} KiB",
                num(f.idle_single, "/node_rss_kib_per_socket"),
                num(f.idle_cluster, "/node_rss_kib_per_socket")
            ),
            "≤ 6 KiB".into(),
            "12.6–13.5 KiB".into(),
            "156 KiB (52 tuned)".into(),
        ],
        [
            "CPU per delivered event, nodes + Redis, flat-out fan-out".into(),
            format!("{} µs", num(f.flat_out, "/cpu_us_per_delivered_event/nodes_plus_redis")),
            "≤ 4 µs".into(),
            "22 µs".into(),
            "48 µs".into(),
        ],
        [
            "delivered events/s, 3 nodes, 100 runs × 10 subscribers".into(),
            num(f.flat_out, "/delivered_per_sec"),
            "≥ 150 000".into(),
            "~63 k".into(),
            "~30 k".into(),
        ],
        [
            "latency p50 / p99 paced at 10 k deliveries/s".into(),
            format!("{} / {} ms", num(f.paced, "/latency/p50_ms"), num(f.paced, "/latency/p99_ms")),
            "p99 ≤ 1 ms".into(),
            "0.77 / 4.9 ms".into(),
            "1.1 / 5.5 ms".into(),
        ],
        [
            "latency p99 at saturation (paced at the flat-out rate)".into(),
            format!(
                "{} ms (at {} deliveries/s)",
                num(f.saturated, "/latency/p99_ms"),
                num(f.saturated, "/delivered_per_sec")
            ),
            "≤ 10 ms".into(),
            "190 ms".into(),
            "126 ms".into(),
        ],
        [
            "200 missed events replayed on another node".into(),
            format!(
                "{} missed (min), {} % of the run delivered; {} ms incl. reconnect (p50), {} ms after the ack",
                num(f.reconnect, "/missed_events_per_client/min"),
                num(f.reconnect, "/delivery_percent"),
                num(f.reconnect, "/reconnect_to_last_missed_event/p50_ms"),
                num(f.reconnect, "/ack_to_last_missed_event/p50_ms")
            ),
            "≤ 5 ms after the ack".into(),
            "200/200, 26 ms".into(),
            "0/200".into(),
        ],
        [
            "Redis round trips per appended event, flat out".into(),
            num(f.flat_out, "/redis_round_trips_per_appended_event"),
            "≤ 0.1".into(),
            "".into(),
            "".into(),
        ],
        [
            "gaps / duplicates / reorders (fan-out, paced, saturated)".into(),
            format!("{} / {} / {}", seq_clean(f.flat_out), seq_clean(f.paced), seq_clean(f.saturated)),
            "0".into(),
            "".into(),
            "".into(),
        ],
        [
            "replay of 10 000 events, subscribe → last event (p50)".into(),
            format!("{} ms", num(f.replay, "/subscribe_to_last_replayed_event/p50_ms")),
            "≤ 100 ms".into(),
            "".into(),
            "".into(),
        ],
        [
            format!(
                "storm: {} sockets reconnect at once, delivery; resume p50 / p99",
                num(f.storm, "/clients_per_round")
            ),
            format!(
                "{} %; {} / {} ms",
                num(f.storm, "/delivery_percent"),
                num(f.storm, "/reconnect_to_last_missed_event/p50_ms"),
                num(f.storm, "/reconnect_to_last_missed_event/p99_ms")
            ),
            "100 %, p99 ≤ 1 s".into(),
            "".into(),
            "".into(),
        ],
        [
            "start: chat.send → first event p50 / p99 (under 10 k deliveries/s)".into(),
            format!(
                "{} / {} ms",
                num(f.start, "/send_to_first_event/p50_ms"),
                num(f.start, "/send_to_first_event/p99_ms")
            ),
            "p99 ≤ 5 ms".into(),
            "".into(),
            "".into(),
        ],
        [
            "appended events/s, flat out ÷ Redis XADD/s pipelined".into(),
            appended_ratio(f.flat_out, f.ceiling),
            "".into(),
            "".into(),
            "".into(),
        ],
        [
            "deliveries/s, flat out ÷ Redis PUBLISH/s pipelined".into(),
            ratio(f.flat_out, "/delivered_per_sec", f.ceiling, "/publish_per_sec_pipelined"),
            "".into(),
            "".into(),
            "".into(),
        ],
    ];
    let mut out = String::from("| figure | chatgate | target | Socket.IO 4.8 | Sockudo 5.2 |\n|---|---|---|---|---|\n");
    for row in rows {
        out.push_str(&format!("| {} |\n", row.join(" | ")));
    }
    out
}
