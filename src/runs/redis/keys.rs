//! Redis key and channel names (docs/cluster.md §Redis keys).
//!
//! Every key of one session carries the hash tag `{S}`, so one Lua script may
//! touch them together and Redis Cluster keeps them on one shard. The run
//! indexes (`cg:runs`, `cg:user:{U}:runs`) are outside the session's slot and
//! are written next to the session scripts, never inside them.

/// The run lock: `SET NX PX`, the owner record as JSON.
pub fn run(session_id: &str) -> String {
    format!("cg:{{{session_id}}}:run")
}

/// The owner record: the lock's JSON without a lease, deleted by the terminal
/// `complete`. "Record present, lock gone" is an orphaned run.
pub fn owner(session_id: &str) -> String {
    format!("cg:{{{session_id}}}:owner")
}

/// The session's last seq.
pub fn seq(session_id: &str) -> String {
    format!("cg:{{{session_id}}}:seq")
}

/// The replay stream: entry id `<seq>-0`, fields `r` (run id), `t` (terminal), `b` (body).
pub fn events(session_id: &str) -> String {
    format!("cg:{{{session_id}}}:events")
}

/// Pending tool approvals of the current run: requestId → request JSON.
pub fn pending(session_id: &str) -> String {
    format!("cg:{{{session_id}}}:pending")
}

/// The current run's prompt (the user's message), deleted with the owner record.
pub fn prompt(session_id: &str) -> String {
    format!("cg:{{{session_id}}}:prompt")
}

/// What became of the `chat.send` with idempotency key `request_key` (`{runId, firstSeq}` or
/// `{refused, runId}`), kept `--idempotency-window`. Without a key the start script is
/// handed `request(session_id, "")`, which it never touches: every key a script names carries the tag.
pub fn request(session_id: &str, request_key: &str) -> String {
    format!("cg:{{{session_id}}}:req:{request_key}")
}

/// The result (first seq) of one append batch, kept one lease long for retries.
pub fn batch(session_id: &str, batch_id: &str) -> String {
    format!("cg:{{{session_id}}}:batch:{batch_id}")
}

/// The seq of a finished run's `complete` until its owner stored it in SQL: if the
/// owner dies first, the sweeper copies it (set by the terminal append, one retention long).
pub fn saving(session_id: &str, run_id: &str) -> String {
    format!("cg:{{{session_id}}}:saving:{run_id}")
}

/// Permission requestId → session id.
pub fn permission(request_id: &str) -> String {
    format!("cg:perm:{{{request_id}}}")
}

/// Pub/sub channel of a session's appended events.
pub fn live_channel(session_id: &str) -> String {
    format!("cg:{{{session_id}}}:live")
}

/// The session id of a live channel name, if it is one.
pub fn session_of_live_channel(channel: &str) -> Option<&str> {
    channel.strip_prefix("cg:{")?.strip_suffix("}:live")
}

/// Pub/sub channel of control messages to one node.
pub fn node_channel(node_id: &str) -> String {
    format!("cg:node:{node_id}")
}

/// Pub/sub channel of per-user notices.
pub fn user_channel(user_id: &str) -> String {
    format!("cg:user:{user_id}")
}

/// The user id of a user channel name, if it is one.
pub fn user_of_channel(channel: &str) -> Option<&str> {
    channel.strip_prefix("cg:user:")
}

/// Pub/sub channel a node publishes its liveness probes to (and hears them back on).
pub fn probe_channel(node_id: &str, instance: &str) -> String {
    format!("cg:probe:{node_id}:{instance}")
}

/// The probe channel of one Redis Cluster shard: the node's probe channel with a
/// hash tag chosen so that the channel's slot is one the shard owns.
pub fn shard_probe_channel(probe_channel: &str, tag: &str) -> String {
    format!("{probe_channel}:{{{tag}}}")
}

/// Whether `channel` is the node's probe channel or one of its shard probe channels.
pub fn is_probe_channel(channel: &str, probe_channel: &str) -> bool {
    channel.strip_prefix(probe_channel).is_some_and(|rest| rest.is_empty() || rest.starts_with(":{"))
}

/// The hash slot of a key or channel name (CRC16 of its hash tag, or of the whole name).
pub fn slot(name: &str) -> u16 {
    let bytes = name.as_bytes();
    let tagged = bytes.iter().position(|&b| b == b'{').and_then(|open| {
        let close = bytes[open + 1..].iter().position(|&b| b == b'}')?;
        (close > 0).then(|| &bytes[open + 1..open + 1 + close])
    });
    crc16::State::<crc16::XMODEM>::calculate(tagged.unwrap_or(bytes)) % 16384
}

/// Global index of started runs: sorted set, member `["S","R"]`, score = start time (ms).
pub const RUNS_INDEX: &str = "cg:runs";

/// Per-user index of started runs, members as in [`RUNS_INDEX`].
pub fn user_runs(user_id: &str) -> String {
    format!("cg:user:{{{user_id}}}:runs")
}

/// A user's `chat.send` count in the current window (INCR, PEXPIRE = the window).
pub fn user_sends(user_id: &str) -> String {
    format!("cg:user:{{{user_id}}}:sends")
}

/// Short lock so that one node per period sweeps the global run index.
pub const SWEEP_LOCK: &str = "cg:sweep";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_keys_share_one_hash_tag() {
        for key in [
            run("s1"),
            owner("s1"),
            seq("s1"),
            events("s1"),
            pending("s1"),
            prompt("s1"),
            batch("s1", "b"),
            saving("s1", "r"),
            live_channel("s1"),
        ] {
            assert!(key.starts_with("cg:{s1}:"), "{key}");
        }
        assert_eq!(session_of_live_channel(&live_channel("a.b-c")), Some("a.b-c"));
        assert_eq!(session_of_live_channel("cg:{a}:run"), None);
        assert_eq!(user_of_channel(&user_channel("42")), Some("42"));
    }

    #[test]
    fn slots_follow_the_hash_tag() {
        // Values from CLUSTER KEYSLOT on Redis 7.
        assert_eq!(slot("foo"), 12182);
        assert_eq!(slot("{user1000}.following"), slot("user1000"));
        assert_eq!(slot(&run("s1")), slot(&live_channel("s1")));
        let probe = "cg:probe:n1:abc";
        assert!(is_probe_channel(probe, probe));
        assert!(is_probe_channel(&shard_probe_channel(probe, "7"), probe));
        assert_eq!(slot(&shard_probe_channel(probe, "7")), slot("7"));
        assert!(!is_probe_channel("cg:probe:n1:abcd", probe));
    }
}
