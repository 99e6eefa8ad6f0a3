//! InferenceObjective priorities: the request's priority comes from the objective named by
//! `x-llm-d-inference-objective` (or its alias `x-gateway-inference-objective`), looked up by
//! name as the reference does; none or an unknown one is 0. Priority < 0 is sheddable.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;

/// Priorities by objective name.
pub trait PriorityLookup: Send + Sync {
    /// The priority of `objective`, if it is known.
    fn priority(&self, objective: &str) -> Option<i32>;
}

/// Objective priorities published as one immutable map (replaced by discovery).
#[derive(Debug, Default)]
pub struct ObjectiveTable {
    map: ArcSwap<HashMap<String, i32>>,
}

impl ObjectiveTable {
    /// Replaces all entries.
    pub fn replace(&self, map: HashMap<String, i32>) {
        if **self.map.load() != map {
            self.map.store(Arc::new(map));
        }
    }

    /// Number of objectives.
    pub fn len(&self) -> usize {
        self.map.load().len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl PriorityLookup for ObjectiveTable {
    fn priority(&self, objective: &str) -> Option<i32> {
        self.map.load().get(objective).copied()
    }
}

impl std::fmt::Debug for dyn PriorityLookup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PriorityLookup")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookups_by_name() {
        let t = ObjectiveTable::default();
        assert!(t.is_empty());
        t.replace([("batch".to_owned(), -1), ("chat".to_owned(), 10)].into());
        assert_eq!(t.priority("batch"), Some(-1));
        assert_eq!(t.priority("other"), None);
        assert_eq!(t.len(), 2);
    }
}
