//! The Lua scripts: every write to a session's keys is one atomic script.
//!
//! Each script is its own file in `lua/`, opening with a comment on what it
//! guarantees and named locals for its `KEYS` and `ARGV`; all but
//! `count_send.lua` are run after `lua/prelude.lua` (seq restore, append,
//! finish, retake). They are hashed once at start ([`Scripts::new`]) and run
//! with EVALSHA (`redis::Script` loads them again by itself after a
//! `NOSCRIPT`, e.g. after a Redis restart).
//!
//! Stream entries: id `<seq>-0`, fields `r` (run id), `t` (`1` for the terminal
//! `complete`), `b` (the event body JSON without `seq`; readers splice it in).
//! One PUBLISH per batch on `cg:{S}:live` carries every event of the batch as
//! `"<seq> <t> <#runId> <#body> " .. runId .. body` records (see `codec`).
//!
//! Seq restore: a counter that is missing (Redis lost it, or it idled out) or
//! below the caller's floor (SQL's high-water mark, or the owner's own last
//! seq) is set to the highest seq known plus `--replay-max-events`, so that no
//! seq is ever reused even when SQL lags; the jump reaches subscribers as a gap.

use ::redis::Script;

/// Functions shared by the scripts.
const PRELUDE: &str = include_str!("lua/prelude.lua");

/// The registry's scripts, hashed once.
pub struct Scripts {
    /// `lua/count_send.lua`: counts a user's `chat.send` in the rate window.
    pub count_send: Script,
    /// `lua/start.lua`: takes a session's run lock, reaping an orphan first.
    pub start: Script,
    /// `lua/append.lua`: appends a batch, fenced; a terminal batch finishes the run.
    pub append: Script,
    /// `lua/renew.lua`: extends (or re-takes) the run's lock.
    pub renew: Script,
    /// `lua/pending.lua`: adds or removes a pending approval, fenced.
    pub pending: Script,
    /// `lua/reap.lua`: ends an orphaned run with its `complete`.
    pub reap: Script,
    /// `lua/read.lua`: one consistent read of a session for a subscribe.
    pub read: Script,
    /// `lua/read_range.lua`: a range of the stream with the seq top.
    pub read_range: Script,
    /// `lua/settle.lua`: how long readers wait for a session Redis lost.
    pub settle: Script,
}

impl Scripts {
    pub fn new() -> Self {
        let with_prelude = |body: &str| Script::new(&format!("{PRELUDE}\n{body}"));
        Scripts {
            count_send: Script::new(include_str!("lua/count_send.lua")),
            start: with_prelude(include_str!("lua/start.lua")),
            append: with_prelude(include_str!("lua/append.lua")),
            renew: with_prelude(include_str!("lua/renew.lua")),
            pending: with_prelude(include_str!("lua/pending.lua")),
            reap: with_prelude(include_str!("lua/reap.lua")),
            read: with_prelude(include_str!("lua/read.lua")),
            read_range: with_prelude(include_str!("lua/read_range.lua")),
            settle: with_prelude(include_str!("lua/settle.lua")),
        }
    }
}

#[cfg(test)]
mod tests {
    /// Every script file, by name.
    const FILES: [(&str, &str); 10] = [
        ("prelude.lua", include_str!("lua/prelude.lua")),
        ("count_send.lua", include_str!("lua/count_send.lua")),
        ("start.lua", include_str!("lua/start.lua")),
        ("append.lua", include_str!("lua/append.lua")),
        ("renew.lua", include_str!("lua/renew.lua")),
        ("pending.lua", include_str!("lua/pending.lua")),
        ("reap.lua", include_str!("lua/reap.lua")),
        ("read.lua", include_str!("lua/read.lua")),
        ("read_range.lua", include_str!("lua/read_range.lua")),
        ("settle.lua", include_str!("lua/settle.lua")),
    ];

    /// A script's inputs are named in its opening lines (comments, then `local name = KEYS[n]`
    /// or `ARGV[n]`); below them only names are used.
    #[test]
    fn scripts_address_their_inputs_by_name_below_the_opening_lines() {
        for (file, text) in FILES {
            assert!(text.starts_with("-- "), "{file} does not open with a comment on what it does");
            let body: Vec<&str> = text
                .lines()
                .skip_while(|line| {
                    let line = line.trim();
                    line.is_empty()
                        || line.starts_with("--")
                        || (line.starts_with("local ") && (line.contains("KEYS[") || line.contains("ARGV")))
                })
                .collect();
            for line in body {
                assert!(!line.contains("KEYS[") && !line.contains("ARGV"), "{file}: input by position in {line:?}");
            }
        }
    }
}
