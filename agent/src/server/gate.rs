//! Connection admission: who may hold a connection to a listener, decided at accept.
//!
//! Both listeners are reachable from every pod of the node and from other hosts of the VPC, so
//! one source address must not be able to take the connections every other caller needs: each
//! source holds at most `per_source` connections, the listener at most `max`. A connection over
//! either cap is closed at once with a reset (not left queued), counted in
//! `irsa_imds_connections_refused_total{listener,reason}` and logged at most once a minute per
//! source. On the ops listener `reserved` more places are kept for the node itself: a connection
//! whose source is the very address it connects to (the kubelet probing a host-network pod, a
//! process on the node) gets one when the others are taken, and it serves one health request
//! (`/healthz`, `/readyz`) and closes. No other host or pod can use them, however many addresses
//! a flood comes from.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::telemetry::Metrics;

/// At most one refusal line per source in this long; the line says how many were not logged.
const LOG_EVERY: Duration = Duration::from_secs(60);
/// Sources remembered for log rate limiting; beyond this (a flood from many addresses) older
/// entries are dropped and new sources share one summary line a minute, so the map stays bounded.
const LOG_SOURCES: usize = 4096;

/// Why a connection was refused: the metric's `reason` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Refusal {
    /// The source already holds its share of connections.
    PerSource,
    /// The listener holds its maximum.
    Full,
    /// The connection did not come through the redirect (`--require-redirect`).
    NotRedirected,
}

impl Refusal {
    pub(super) fn metric_label(self) -> &'static str {
        match self {
            Refusal::PerSource => "per_source",
            Refusal::Full => "full",
            Refusal::NotRedirected => "not_redirected",
        }
    }
}

/// Which part of the listener's capacity a connection holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Lane {
    /// Any request, keep-alive.
    General,
    /// The reserved places: one health request, then the connection closes.
    Health,
}

/// The caps of one listener.
#[derive(Debug, Clone, Copy)]
pub(super) struct Caps {
    pub(super) max: usize,
    pub(super) per_source: usize,
    /// Places beyond `max` kept for health requests from the node itself (0 on the IMDS
    /// listener).
    pub(super) reserved: usize,
}

pub(super) struct Gate {
    listener: &'static str,
    caps: Caps,
    metrics: Arc<Metrics>,
    open: Mutex<Open>,
    log: Mutex<RefusalLog>,
}

#[derive(Default)]
struct Open {
    general: usize,
    health: usize,
    by_source: HashMap<IpAddr, usize>,
}

/// A held connection place; dropping it gives the place back.
pub(super) struct Pass {
    gate: Arc<Gate>,
    source: IpAddr,
    pub(super) lane: Lane,
}

impl Drop for Pass {
    fn drop(&mut self) {
        let mut open = self.gate.open.lock().unwrap_or_else(|e| e.into_inner());
        if self.lane == Lane::Health {
            open.health = open.health.saturating_sub(1);
            return;
        }
        open.general = open.general.saturating_sub(1);
        if let Some(n) = open.by_source.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                open.by_source.remove(&self.source);
            }
        }
    }
}

impl Gate {
    pub(super) fn new(listener: &'static str, caps: Caps, metrics: Arc<Metrics>) -> Arc<Gate> {
        Arc::new(Gate {
            listener,
            caps,
            metrics,
            open: Mutex::new(Open::default()),
            log: Mutex::new(RefusalLog::default()),
        })
    }

    /// A place for a new connection from `source`, or why there is none. `from_node` says the
    /// source is the address the connection was made to (the node talking to itself).
    pub(super) fn admit(
        self: &Arc<Self>,
        source: IpAddr,
        from_node: bool,
    ) -> Result<Pass, Refusal> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let held = open.by_source.get(&source).copied().unwrap_or(0);
        let refusal = if held >= self.caps.per_source {
            Refusal::PerSource
        } else if open.general >= self.caps.max {
            Refusal::Full
        } else {
            open.general += 1;
            *open.by_source.entry(source).or_insert(0) += 1;
            return Ok(self.pass(source, Lane::General));
        };
        if from_node && open.health < self.caps.reserved {
            open.health += 1;
            return Ok(self.pass(source, Lane::Health));
        }
        Err(refusal)
    }

    fn pass(self: &Arc<Self>, source: IpAddr, lane: Lane) -> Pass {
        Pass {
            gate: self.clone(),
            source,
            lane,
        }
    }

    /// Counts a refused connection and logs it, at most once a minute per source.
    pub(super) fn refused(&self, source: IpAddr, why: Refusal) {
        self.metrics
            .connection_refused(self.listener, why.metric_label());
        let verdict = self
            .log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .note(source, Instant::now());
        match verdict {
            LogVerdict::Quiet => {}
            LogVerdict::Source { suppressed } => tracing::warn!(
                listener = self.listener,
                source = %source,
                reason = why.metric_label(),
                suppressed,
                "connection refused"
            ),
            LogVerdict::ManySources { suppressed } => tracing::warn!(
                listener = self.listener,
                reason = why.metric_label(),
                suppressed,
                "connections refused from many sources"
            ),
        }
    }

    #[cfg(test)]
    fn open(&self) -> usize {
        let open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        open.general + open.health
    }
}

#[derive(Debug, PartialEq, Eq)]
enum LogVerdict {
    Quiet,
    /// Log this source's refusal; `suppressed` refusals since its last line were not logged.
    Source {
        suppressed: u64,
    },
    /// Too many sources to track each: one line for all of them.
    ManySources {
        suppressed: u64,
    },
}

#[derive(Default)]
struct RefusalLog {
    /// Per source: when it was last logged, refusals since.
    sources: HashMap<IpAddr, (Instant, u64)>,
    /// The shared line for sources that did not fit.
    overflow: Option<(Instant, u64)>,
}

impl RefusalLog {
    fn note(&mut self, source: IpAddr, now: Instant) -> LogVerdict {
        if let Some((at, n)) = self.sources.get_mut(&source) {
            if now.duration_since(*at) < LOG_EVERY {
                *n += 1;
                return LogVerdict::Quiet;
            }
            let suppressed = *n;
            *at = now;
            *n = 0;
            return LogVerdict::Source { suppressed };
        }
        if self.sources.len() >= LOG_SOURCES {
            self.sources
                .retain(|_, (at, _)| now.duration_since(*at) < LOG_EVERY);
        }
        if self.sources.len() < LOG_SOURCES {
            self.sources.insert(source, (now, 0));
            return LogVerdict::Source { suppressed: 0 };
        }
        match &mut self.overflow {
            Some((at, n)) if now.duration_since(*at) < LOG_EVERY => {
                *n += 1;
                LogVerdict::Quiet
            }
            slot => {
                let suppressed = slot.map_or(0, |(_, n)| n);
                *slot = Some((now, 0));
                LogVerdict::ManySources { suppressed }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn gate(max: usize, per_source: usize, reserved: usize) -> (Arc<Gate>, Arc<Metrics>) {
        let m = Arc::new(Metrics::new());
        let caps = Caps {
            max,
            per_source,
            reserved,
        };
        (Gate::new("imds", caps, m.clone()), m)
    }

    #[test]
    fn one_source_cannot_take_the_places_of_others() {
        let (g, _) = gate(10, 3, 0);
        let a: Vec<Pass> = (0..3)
            .map(|_| g.admit(ip("10.0.0.1"), false).unwrap())
            .collect();
        assert_eq!(
            g.admit(ip("10.0.0.1"), false).err(),
            Some(Refusal::PerSource)
        );
        let b = g.admit(ip("10.0.0.2"), false).unwrap();
        assert_eq!(b.lane, Lane::General);
        drop(a);
        assert_eq!(g.open(), 1);
        // Its places are back once its connections close.
        let _again = g.admit(ip("10.0.0.1"), false).unwrap();
    }

    #[test]
    fn the_listener_cap_holds_across_sources() {
        let (g, _) = gate(4, 2, 0);
        let _held: Vec<Pass> = ["10.0.0.1", "10.0.0.1", "10.0.0.2", "10.0.0.3"]
            .iter()
            .map(|s| g.admit(ip(s), false).unwrap())
            .collect();
        assert_eq!(g.admit(ip("10.0.0.4"), false).err(), Some(Refusal::Full));
        // Without a reserve, the node itself waits like everyone else.
        assert_eq!(g.admit(ip("10.0.0.9"), true).err(), Some(Refusal::Full));
    }

    #[test]
    fn the_reserve_is_for_the_node_itself_and_has_its_own_cap() {
        let (g, _) = gate(2, 2, 2);
        let _flood: Vec<Pass> = ["10.0.0.1", "10.0.0.2"]
            .iter()
            .map(|s| g.admit(ip(s), false).unwrap())
            .collect();
        // Full for everyone else, from any address...
        assert_eq!(g.admit(ip("10.0.0.3"), false).err(), Some(Refusal::Full));
        // ...but the node's own probes get the reserved places, health only.
        let probes: Vec<Pass> = (0..2)
            .map(|_| g.admit(ip("10.0.0.9"), true).unwrap())
            .collect();
        assert!(probes.iter().all(|p| p.lane == Lane::Health));
        assert_eq!(g.admit(ip("10.0.0.9"), true).err(), Some(Refusal::Full));
        drop(probes);
        assert_eq!(g.admit(ip("10.0.0.9"), true).unwrap().lane, Lane::Health);
        // The node over its own per-source share also falls back on the reserve.
        let (g, _) = gate(10, 1, 1);
        let _one = g.admit(ip("10.0.0.9"), true).unwrap();
        let reserve = g.admit(ip("10.0.0.9"), true).unwrap();
        assert_eq!(reserve.lane, Lane::Health);
        assert_eq!(
            g.admit(ip("10.0.0.9"), true).err(),
            Some(Refusal::PerSource)
        );
    }

    #[test]
    fn refusals_are_counted_each_and_logged_once_a_minute_per_source() {
        let (g, m) = gate(1, 1, 0);
        for _ in 0..5 {
            g.refused(ip("10.0.0.1"), Refusal::PerSource);
        }
        assert_eq!(m.connections_refused("imds", "per_source"), 5);

        let mut log = RefusalLog::default();
        let t0 = Instant::now();
        let a = ip("10.0.0.1");
        assert_eq!(log.note(a, t0), LogVerdict::Source { suppressed: 0 });
        for s in 1..=100 {
            assert_eq!(
                log.note(a, t0 + Duration::from_millis(s)),
                LogVerdict::Quiet
            );
        }
        assert_eq!(
            log.note(ip("10.0.0.2"), t0),
            LogVerdict::Source { suppressed: 0 }
        );
        assert_eq!(
            log.note(a, t0 + LOG_EVERY),
            LogVerdict::Source { suppressed: 100 }
        );
    }

    #[test]
    fn a_flood_from_many_sources_keeps_the_log_state_bounded() {
        let mut log = RefusalLog::default();
        let t0 = Instant::now();
        for i in 0..LOG_SOURCES as u32 {
            log.note(
                IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000_u32 + i)),
                t0,
            );
        }
        let many = ip("192.168.0.1");
        assert_eq!(
            log.note(many, t0),
            LogVerdict::ManySources { suppressed: 0 }
        );
        assert_eq!(log.note(ip("192.168.0.2"), t0), LogVerdict::Quiet);
        assert!(log.sources.len() <= LOG_SOURCES);
        // A minute on, the old entries make room again.
        assert_eq!(
            log.note(many, t0 + LOG_EVERY),
            LogVerdict::Source { suppressed: 0 }
        );
        assert!(log.sources.len() <= LOG_SOURCES);
    }
}
