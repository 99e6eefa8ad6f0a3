//! The queues themselves: priority bands, each holding one flow per fairness id, each flow
//! ordered by its band's ordering policy. Plain data under the controller's lock: no I/O, no
//! time source (callers pass instants), no async.
//!
//! Capacity is checked on enqueue in the reference's order (`controller/internal/processor.go`
//! `hasCapacity`): global bytes, global requests, band bytes, band requests. A band is made
//! from its template the first time its priority is seen and kept (priorities come from
//! InferenceObjectives, a short list the operator writes); a flow is dropped as soon as it is
//! empty, so client-chosen fairness ids cost nothing once their requests are gone.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::config::{BandConfig, FlowControlConfig};
use crate::framework::flowcontrol::{FlowHead, QueuedRequest};

/// Where a queued request sits, to take it out again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ticket {
    priority: i32,
    flow: Arc<str>,
    key: ItemKey,
}

/// Sort key within a flow: requests with a key first (earliest first), then arrival order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct ItemKey {
    keyless: bool,
    key: Option<tokio::time::Instant>,
    seq: u64,
}

/// A queued request's ticket and the request it pushed out, if any.
pub type Pushed<T> = (Ticket, Option<Entry<T>>);

/// Why a request was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    /// `flowControl.maxBytes`.
    GlobalBytes,
    /// `flowControl.maxRequests`.
    GlobalRequests,
    /// The band's `maxBytes`.
    BandBytes,
    /// The band's `maxRequests`.
    BandRequests,
}

/// A queued request as the queue keeps it: what it weighs and what the caller attached.
#[derive(Debug)]
pub struct Entry<T> {
    /// Body bytes.
    pub bytes: u64,
    /// The caller's payload (the waiter's channel, its labels).
    pub value: T,
}

#[derive(Debug)]
struct Band<T> {
    priority: i32,
    cfg: BandConfig,
    flows: BTreeMap<Arc<str>, BTreeMap<ItemKey, Entry<T>>>,
    len: u64,
    bytes: u64,
    last: Option<Arc<str>>,
}

impl<T> Band<T> {
    /// The request a newcomer of flow `id` pushes out of this full band: the newest of the
    /// largest flow, if the band shares capacity and that flow holds at least two more than
    /// `id` (so the newcomer's flow does not become the larger one).
    fn victim(&self, id: &str) -> Option<(Arc<str>, ItemKey)> {
        if !self.cfg.fairness.plugin.shares_capacity() {
            return None;
        }
        let mine = self.flows.get(id).map_or(0, BTreeMap::len);
        let (flow, items) = self.flows.iter().max_by_key(|(_, items)| items.len())?;
        if &**flow == id || items.len() < mine + 2 {
            return None;
        }
        Some((flow.clone(), *items.last_key_value()?.0))
    }
}

/// All bands, highest priority first.
#[derive(Debug)]
pub struct Queues<T> {
    cfg: Arc<FlowControlConfig>,
    bands: Vec<Band<T>>,
    len: u64,
    bytes: u64,
    seq: u64,
    priorities: Vec<i32>,
    ceilings: Vec<f64>,
}

impl<T> Queues<T> {
    /// Empty queues with the listed bands of `cfg`.
    pub fn new(cfg: Arc<FlowControlConfig>) -> Self {
        let mut q = Self {
            bands: Vec::new(),
            len: 0,
            bytes: 0,
            seq: 0,
            priorities: Vec::new(),
            ceilings: Vec::new(),
            cfg,
        };
        for i in 0..q.cfg.bands.len() {
            let p = q.cfg.bands[i].0;
            q.band_index(p);
        }
        q
    }

    /// Requests queued.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Body bytes queued.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    fn band_index(&mut self, priority: i32) -> usize {
        match self.bands.binary_search_by(|b| priority.cmp(&b.priority)) {
            Ok(i) => i,
            Err(i) => {
                let cfg = self.cfg.band(priority).clone();
                self.bands.insert(
                    i,
                    Band {
                        priority,
                        cfg,
                        flows: BTreeMap::new(),
                        len: 0,
                        bytes: 0,
                        last: None,
                    },
                );
                self.priorities.insert(i, priority);
                self.ceilings.insert(i, 1.0);
                i
            }
        }
    }

    /// The priorities with a band, highest first.
    pub fn priorities(&self) -> &[i32] {
        &self.priorities
    }

    /// Queues a request of `bytes` at `priority` in flow `fairness_id`, or says which limit
    /// it would break. When the band is full of requests and its fairness policy shares
    /// capacity, a flow smaller than the largest gets in by pushing out the largest flow's
    /// newest request, returned beside the ticket.
    pub fn push(
        &mut self,
        priority: i32,
        fairness_id: &str,
        req: &QueuedRequest,
        bytes: u64,
        value: T,
    ) -> Result<Pushed<T>, (Full, T)> {
        let cfg = &self.cfg;
        if cfg.max_bytes > 0 && self.bytes + bytes > cfg.max_bytes {
            return Err((Full::GlobalBytes, value));
        }
        if cfg.max_requests > 0 && self.len + 1 > cfg.max_requests {
            return Err((Full::GlobalRequests, value));
        }
        let i = self.band_index(priority);
        let band = &self.bands[i];
        if band.bytes + bytes > band.cfg.max_bytes {
            return Err((Full::BandBytes, value));
        }
        let mut pushed_out = None;
        if band.len + 1 > band.cfg.max_requests {
            let Some((flow, key)) = band.victim(fairness_id) else {
                return Err((Full::BandRequests, value));
            };
            pushed_out = self.take(i, &flow, &key);
        }
        let band = &mut self.bands[i];
        let key = band.cfg.ordering.plugin.key(req);
        self.seq += 1;
        let key = ItemKey {
            keyless: key.is_none(),
            key,
            seq: self.seq,
        };
        let flow: Arc<str> = match band.flows.get_key_value(fairness_id) {
            Some((id, _)) => id.clone(),
            None => fairness_id.into(),
        };
        band.flows
            .entry(flow.clone())
            .or_default()
            .insert(key, Entry { bytes, value });
        band.len += 1;
        band.bytes += bytes;
        self.len += 1;
        self.bytes += bytes;
        Ok((Ticket { priority, flow, key }, pushed_out))
    }

    fn take(&mut self, band: usize, flow: &Arc<str>, key: &ItemKey) -> Option<Entry<T>> {
        let b = &mut self.bands[band];
        let items = b.flows.get_mut(flow)?;
        let entry = items.remove(key)?;
        if items.is_empty() {
            b.flows.remove(flow);
        }
        b.len -= 1;
        b.bytes -= entry.bytes;
        self.len -= 1;
        self.bytes -= entry.bytes;
        Some(entry)
    }

    /// Takes the request `ticket` names out; `None` when it already left (dispatched,
    /// expired, drained).
    pub fn remove(&mut self, ticket: &Ticket) -> Option<Entry<T>> {
        let band = self
            .bands
            .binary_search_by(|b| ticket.priority.cmp(&b.priority))
            .ok()?;
        self.take(band, &ticket.flow, &ticket.key)
    }

    /// The next request to dispatch at `saturation`, with its priority and flow: from the
    /// highest non-empty band, unless that band's ceiling (from `cfg.usage_limit`) is at or
    /// below `saturation`, in which case nothing goes (a lower band does not overtake a
    /// blocked higher one).
    pub fn pop(&mut self, saturation: f64) -> Option<(i32, Arc<str>, Entry<T>)> {
        let band = self.bands.iter().position(|b| b.len > 0)?;
        self.cfg
            .usage_limit
            .plugin
            .ceilings(saturation, &self.priorities, &mut self.ceilings);
        if saturation >= self.ceilings[band] {
            return None;
        }
        let b = &mut self.bands[band];
        let heads: Vec<FlowHead<'_>> = b
            .flows
            .iter()
            .filter_map(|(id, items)| {
                let (k, _) = items.first_key_value()?;
                Some(FlowHead {
                    id,
                    key: k.key,
                    seq: k.seq,
                })
            })
            .collect();
        let chosen = b.cfg.fairness.plugin.select(&heads, b.last.as_deref())?;
        let flow = b.flows.keys().nth(chosen)?.clone();
        let key = *b.flows.get(&flow)?.first_key_value()?.0;
        b.last = Some(flow.clone());
        let priority = b.priority;
        let entry = self.take(band, &flow, &key)?;
        Some((priority, flow, entry))
    }

    /// Takes every request out (shutdown).
    pub fn drain(&mut self) -> Vec<(i32, Arc<str>, Entry<T>)> {
        let mut out = Vec::with_capacity(self.len as usize);
        for b in &mut self.bands {
            for (flow, items) in std::mem::take(&mut b.flows) {
                out.extend(items.into_values().map(|e| (b.priority, flow.clone(), e)));
            }
            b.len = 0;
            b.bytes = 0;
        }
        self.len = 0;
        self.bytes = 0;
        out
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::time::Instant;

    use super::*;
    use crate::flowcontrol::config::Policy;
    use crate::framework::flowcontrol::{FairnessPolicy, OrderingPolicy};
    use crate::plugins::flowcontrol::{
        Fcfs, GlobalStrict, RoundRobin, SloDeadline, StaticUsageLimit, StaticUsageParams,
    };

    fn band(
        max_requests: u64,
        fairness: Arc<dyn FairnessPolicy>,
        ordering: Arc<dyn OrderingPolicy>,
    ) -> BandConfig {
        BandConfig {
            max_bytes: 1000,
            max_requests,
            fairness: Policy {
                name: "f".into(),
                plugin: fairness,
            },
            ordering: Policy {
                name: "o".into(),
                plugin: ordering,
            },
        }
    }

    fn config(max_requests: u64, threshold: f64, rr: bool) -> Arc<FlowControlConfig> {
        let fairness: Arc<dyn FairnessPolicy> = if rr {
            Arc::new(RoundRobin)
        } else {
            Arc::new(GlobalStrict)
        };
        let b = band(10, fairness.clone(), Arc::new(Fcfs));
        Arc::new(FlowControlConfig {
            max_bytes: 0,
            max_requests,
            ttl: None,
            bands: vec![(0, b.clone())],
            default_band: b.clone(),
            negative_band: Some(band(2, fairness, Arc::new(Fcfs))),
            usage_limit: Policy {
                name: "u".into(),
                plugin: Arc::new(
                    StaticUsageLimit::new(&StaticUsageParams {
                        threshold: Some(threshold),
                    })
                    .unwrap(),
                ),
            },
        })
    }

    fn req(at: Instant, slo_ms: Option<u64>) -> QueuedRequest {
        QueuedRequest {
            enqueued: at,
            received: at,
            ttl: None,
            slo_ttft: slo_ms.map(Duration::from_millis),
        }
    }

    #[test]
    fn bands_by_priority_flows_by_fairness_and_limits() {
        let t = Instant::now();
        let mut q: Queues<u32> = Queues::new(config(0, 1.0, true));
        q.push(0, "a", &req(t, None), 10, 1).unwrap();
        q.push(0, "a", &req(t, None), 10, 2).unwrap();
        q.push(0, "b", &req(t, None), 10, 3).unwrap();
        q.push(-1, "a", &req(t, None), 10, 4).unwrap();
        q.push(-1, "a", &req(t, None), 10, 5).unwrap();
        assert_eq!(
            q.push(-1, "a", &req(t, None), 10, 6).unwrap_err(),
            (Full::BandRequests, 6)
        );
        assert_eq!(
            q.push(5, "a", &req(t, None), 1001, 7).unwrap_err(),
            (Full::BandBytes, 7)
        );
        q.push(5, "z", &req(t, None), 10, 8).unwrap();
        assert_eq!((q.len(), q.bytes()), (6, 60));
        // ... and lets a smaller one in, pushing out the largest flow's newest.
        let (_, out) = q.push(-1, "b", &req(t, None), 10, 9).unwrap();
        assert_eq!(out.unwrap().value, 5);
        assert_eq!(
            q.push(-1, "c", &req(t, None), 10, 10).unwrap_err().0,
            Full::BandRequests
        );
        assert_eq!((q.len(), q.bytes()), (6, 60));
        // Saturated: nothing goes.
        assert!(q.pop(1.0).is_none());
        // Priority 5 first, then 0 round-robin a, b, a, then -1.
        let order: Vec<(i32, String, u32)> = std::iter::from_fn(|| q.pop(0.5))
            .map(|(p, f, e)| (p, f.to_string(), e.value))
            .collect();
        assert_eq!(
            order,
            vec![
                (5, "z".into(), 8),
                (0, "a".into(), 1),
                (0, "b".into(), 3),
                (0, "a".into(), 2),
                (-1, "a".into(), 4),
                (-1, "b".into(), 9)
            ]
        );
        assert_eq!((q.len(), q.bytes()), (0, 0));
        assert!(q.bands.iter().all(|b| b.flows.is_empty()));
    }

    #[test]
    fn global_limits_removal_and_drain() {
        let t = Instant::now();
        let mut q: Queues<u32> = Queues::new(config(2, 0.8, false));
        let (first, _) = q.push(0, "a", &req(t, None), 1, 1).unwrap();
        q.push(0, "b", &req(t, None), 1, 2).unwrap();
        assert_eq!(
            q.push(0, "c", &req(t, None), 1, 3).unwrap_err().0,
            Full::GlobalRequests
        );
        assert_eq!(q.remove(&first).unwrap().value, 1);
        assert!(q.remove(&first).is_none());
        // The usage limit's threshold 0.8 gates at 0.8.
        assert!(q.pop(0.8).is_none());
        q.push(0, "c", &req(t, None), 1, 3).unwrap();
        let drained: Vec<u32> = q.drain().into_iter().map(|(_, _, e)| e.value).collect();
        assert_eq!(drained.len(), 2);
        assert!(q.is_empty() && q.bytes() == 0);
    }

    #[test]
    fn a_blocked_band_is_not_overtaken_and_ordering_applies() {
        let t = Instant::now();
        let mut cfg = (*config(0, 1.0, false)).clone();
        cfg.bands[0].1 = band(10, Arc::new(GlobalStrict), Arc::new(SloDeadline));
        let mut q: Queues<u32> = Queues::new(Arc::new(cfg));
        q.push(0, "a", &req(t, None), 1, 1).unwrap();
        q.push(0, "b", &req(t, Some(500)), 1, 2).unwrap();
        q.push(0, "c", &req(t, Some(100)), 1, 3).unwrap();
        let order: Vec<u32> = std::iter::from_fn(|| q.pop(0.0))
            .map(|(_, _, e)| e.value)
            .collect();
        assert_eq!(order, vec![3, 2, 1]);
    }
}
