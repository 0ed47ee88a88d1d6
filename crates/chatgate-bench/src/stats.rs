//! What a socket checks and records: the few fields of a frame the bench
//! needs, a per-socket seq checker (gaps, duplicates, reorders), latency
//! samples and their percentiles.

use std::{
    collections::BTreeSet,
    time::{SystemTime, UNIX_EPOCH},
};

use serde::Deserialize;
use serde_json::{Value, json};

/// The fields of an outbound frame the bench looks at (the rest is skipped).
#[derive(Debug, Deserialize)]
pub struct Head<'a> {
    #[serde(borrow, default)]
    pub kind: Option<&'a str>,
    #[serde(default)]
    pub seq: Option<u64>,
    #[serde(rename = "emittedAtUs", default)]
    pub emitted_at_us: Option<u64>,
    #[serde(rename = "sessionId", borrow, default)]
    pub session_id: Option<&'a str>,
}

impl<'a> Head<'a> {
    pub fn parse(text: &'a str) -> anyhow::Result<Head<'a>> {
        Ok(serde_json::from_str(text)?)
    }
}

/// Microseconds since the Unix epoch, as `emittedAtUs`.
pub fn unix_micros() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

/// Most skipped seqs remembered per socket (to tell a late one from a duplicate).
const MAX_MISSING: usize = 100_000;

/// One socket's seq sequence: every seq after the start once, in order.
#[derive(Debug, Default, Clone)]
pub struct SeqCheck {
    next: u64,
    missing: BTreeSet<u64>,
    pub received: u64,
    pub gaps: u64,
    pub duplicates: u64,
    pub reorders: u64,
}

impl SeqCheck {
    /// Expects `first` next.
    pub fn starting_at(first: u64) -> Self {
        SeqCheck { next: first, ..Default::default() }
    }

    pub fn last(&self) -> u64 {
        self.next.saturating_sub(1)
    }

    pub fn see(&mut self, seq: u64) {
        self.received += 1;
        if seq == self.next {
            self.next += 1;
        } else if seq > self.next {
            self.gaps += seq - self.next;
            for missing in self.next..seq {
                if self.missing.len() >= MAX_MISSING {
                    break;
                }
                self.missing.insert(missing);
            }
            self.next = seq + 1;
        } else if self.missing.remove(&seq) {
            self.gaps -= 1;
            self.reorders += 1;
        } else {
            self.duplicates += 1;
        }
    }

    pub fn merge(&mut self, other: &SeqCheck) {
        self.received += other.received;
        self.gaps += other.gaps;
        self.duplicates += other.duplicates;
        self.reorders += other.reorders;
    }

    /// Counts the seqs up to `last` that never came as gaps.
    pub fn finish(&mut self, last: u64) {
        if last >= self.next {
            self.gaps += last + 1 - self.next;
            self.next = last + 1;
        }
    }

    pub fn is_clean(&self) -> bool {
        self.gaps == 0 && self.duplicates == 0 && self.reorders == 0
    }

    pub fn to_json(&self) -> Value {
        json!({ "gaps": self.gaps, "duplicates": self.duplicates, "reorders": self.reorders })
    }
}

/// Latency samples in microseconds.
#[derive(Debug, Default, Clone)]
pub struct Latencies {
    samples: Vec<u32>,
}

impl Latencies {
    pub fn with_capacity(n: usize) -> Self {
        Latencies { samples: Vec::with_capacity(n) }
    }

    pub fn record(&mut self, micros: u64) {
        self.samples.push(micros.min(u32::MAX as u64) as u32);
    }

    pub fn extend(&mut self, other: Latencies) {
        self.samples.extend(other.samples);
    }

    /// p50, p99, p999 and max in milliseconds.
    pub fn summary(mut self) -> Value {
        if self.samples.is_empty() {
            return json!(null);
        }
        self.samples.sort_unstable();
        let at = |q: f64| {
            let i = ((self.samples.len() as f64 * q).ceil() as usize).clamp(1, self.samples.len()) - 1;
            ms(self.samples[i] as u64)
        };
        json!({
            "samples": self.samples.len(),
            "p50_ms": at(0.50),
            "p99_ms": at(0.99),
            "p999_ms": at(0.999),
            "max_ms": ms(*self.samples.last().unwrap_or(&0) as u64),
        })
    }
}

/// Microseconds as milliseconds with three decimals.
pub fn ms(micros: u64) -> f64 {
    (micros as f64 / 1000.0 * 1000.0).round() / 1000.0
}

/// Rounds to `digits` decimals.
pub fn round(value: f64, digits: i32) -> f64 {
    let scale = 10f64.powi(digits);
    (value * scale).round() / scale
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seq_check_tells_gaps_duplicates_and_reorders_apart() {
        let mut check = SeqCheck::starting_at(1);
        for seq in [1, 2, 4, 3, 3, 5] {
            check.see(seq);
        }
        assert_eq!((check.gaps, check.duplicates, check.reorders), (0, 1, 1));
        check.finish(7);
        assert_eq!(check.gaps, 2);
        assert!(!check.is_clean());
    }

    #[test]
    fn percentiles_pick_the_right_samples() {
        let mut l = Latencies::default();
        for v in 1..=1000 {
            l.record(v * 1000);
        }
        let s = l.summary();
        assert_eq!(s["p50_ms"], 500.0);
        assert_eq!(s["p99_ms"], 990.0);
        assert_eq!(s["max_ms"], 1000.0);
    }
}
