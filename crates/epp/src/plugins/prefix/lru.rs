//! A compact LRU set of block hashes: one per endpoint.
//!
//! Layout: one open-addressing table (linear probing) whose slots are also the nodes of an
//! intrusive doubly linked recency list. A slot is 16 bytes (hash + two `u32` links) and the
//! table is kept at most 70% full, so a full set costs about 23 bytes per entry, with no
//! per-entry allocation. (Fuller tables save memory but lengthen probe runs, and every entry
//! a deletion shifts costs two random writes to patch its links: at 7/8 load an insert into a
//! full set was 2.5× slower.) Removal uses backward-shift deletion, so there are no tombstones and
//! probe lengths stay short however long the set churns.
//!
//! Hash value 0 marks an empty slot; a real hash of 0 is stored as 1 (a collision of two
//! 64-bit hashes costs at most a wrong prefix guess, never correctness).

const NIL: u32 = u32::MAX;
const EMPTY: u64 = 0;
const MIN_SLOTS: usize = 16;
/// Maximum load factor `LOAD_NUM / LOAD_DEN`.
const LOAD_NUM: usize = 7;
const LOAD_DEN: usize = 10;

#[derive(Debug, Clone, Copy)]
struct Slot {
    hash: u64,
    prev: u32,
    next: u32,
}

const FREE: Slot = Slot {
    hash: EMPTY,
    prev: NIL,
    next: NIL,
};

/// Bounded LRU set of `u64` hashes.
#[derive(Debug)]
pub struct LruSet {
    slots: Vec<Slot>,
    len: u32,
    capacity: u32,
    /// Most recently used.
    head: u32,
    /// Least recently used: the next to go.
    tail: u32,
}

fn stored(hash: u64) -> u64 {
    if hash == EMPTY { 1 } else { hash }
}

/// Whether `x` lies in the cyclic interval `(a, b]`.
fn in_cyclic_range(x: usize, a: usize, b: usize) -> bool {
    if a <= b { a < x && x <= b } else { a < x || x <= b }
}

impl LruSet {
    /// An empty set holding at most `capacity` hashes (at least 1).
    pub fn new(capacity: u32) -> Self {
        let capacity = capacity.clamp(1, u32::MAX / 2);
        let slots = MIN_SLOTS.min(Self::max_slots(capacity));
        Self {
            slots: vec![FREE; slots],
            len: 0,
            capacity,
            head: NIL,
            tail: NIL,
        }
    }

    /// Table size at which `capacity` entries fill it to at most the maximum load.
    fn max_slots(capacity: u32) -> usize {
        (capacity as usize * LOAD_DEN).div_ceil(LOAD_NUM) + 1
    }

    /// Number of hashes held.
    pub fn len(&self) -> usize {
        self.len as usize
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Maximum number of hashes held.
    pub fn capacity(&self) -> usize {
        self.capacity as usize
    }

    /// Heap bytes used by the table.
    pub fn allocated_bytes(&self) -> usize {
        self.slots.capacity() * std::mem::size_of::<Slot>()
    }

    fn home(&self, hash: u64) -> usize {
        // Multiply-shift maps the hash onto any table size, not only powers of two.
        ((u128::from(hash) * self.slots.len() as u128) >> 64) as usize
    }

    /// `Ok(slot)` holding `hash`, or `Err(slot)` where it would go. The table always has a
    /// free slot, so the probe ends.
    fn find(&self, hash: u64) -> Result<usize, usize> {
        let n = self.slots.len();
        let mut i = self.home(hash);
        loop {
            let h = self.slots[i].hash;
            if h == hash {
                return Ok(i);
            }
            if h == EMPTY {
                return Err(i);
            }
            i += 1;
            if i == n {
                i = 0;
            }
        }
    }

    /// Whether `hash` is held (does not refresh its recency).
    pub fn contains(&self, hash: u64) -> bool {
        self.find(stored(hash)).is_ok()
    }

    /// Inserts `hash` as most recently used, or refreshes it; evicts the least recently used
    /// hash when full.
    pub fn insert(&mut self, hash: u64) {
        let hash = stored(hash);
        if let Ok(i) = self.find(hash) {
            if self.head != i as u32 {
                self.unlink(i);
                self.push_front(i);
            }
            return;
        }
        if self.len >= self.capacity {
            self.remove_at(self.tail as usize);
        } else if (self.len as usize + 1) * LOAD_DEN > self.slots.len() * LOAD_NUM {
            self.grow();
        }
        let i = match self.find(hash) {
            Ok(i) | Err(i) => i,
        };
        self.slots[i] = Slot {
            hash,
            prev: NIL,
            next: NIL,
        };
        self.push_front(i);
        self.len += 1;
    }

    fn unlink(&mut self, i: usize) {
        let Slot { prev, next, .. } = self.slots[i];
        if prev == NIL {
            self.head = next;
        } else {
            self.slots[prev as usize].next = next;
        }
        if next == NIL {
            self.tail = prev;
        } else {
            self.slots[next as usize].prev = prev;
        }
    }

    fn push_front(&mut self, i: usize) {
        let old = self.head;
        self.slots[i].prev = NIL;
        self.slots[i].next = old;
        if old == NIL {
            self.tail = i as u32;
        } else {
            self.slots[old as usize].prev = i as u32;
        }
        self.head = i as u32;
    }

    fn remove_at(&mut self, i: usize) {
        if i >= self.slots.len() || self.slots[i].hash == EMPTY {
            return;
        }
        self.unlink(i);
        self.slots[i] = FREE;
        self.len -= 1;
        // Backward shift: pull later members of the probe run into the hole when their home
        // position allows it, so lookups never need tombstones.
        let n = self.slots.len();
        let mut hole = i;
        let mut j = i;
        loop {
            j = if j + 1 == n { 0 } else { j + 1 };
            let slot = self.slots[j];
            if slot.hash == EMPTY {
                break;
            }
            if in_cyclic_range(self.home(slot.hash), hole, j) {
                continue;
            }
            self.slots[hole] = slot;
            self.slots[j] = FREE;
            if slot.prev == NIL {
                self.head = hole as u32;
            } else {
                self.slots[slot.prev as usize].next = hole as u32;
            }
            if slot.next == NIL {
                self.tail = hole as u32;
            } else {
                self.slots[slot.next as usize].prev = hole as u32;
            }
            hole = j;
        }
    }

    fn grow(&mut self) {
        let target = (self.slots.len() * 2).min(Self::max_slots(self.capacity));
        if target <= self.slots.len() {
            return;
        }
        let old = std::mem::replace(&mut self.slots, vec![FREE; target]);
        // Re-insert from least to most recent so the recency order survives.
        let mut cursor = self.tail;
        self.head = NIL;
        self.tail = NIL;
        while cursor != NIL {
            let slot = old[cursor as usize];
            let i = match self.find(slot.hash) {
                Ok(i) | Err(i) => i,
            };
            self.slots[i] = Slot {
                hash: slot.hash,
                prev: NIL,
                next: NIL,
            };
            self.push_front(i);
            cursor = slot.prev;
        }
    }

    /// Hashes from most to least recently used (for tests and debugging).
    pub fn iter_recent(&self) -> impl Iterator<Item = u64> + '_ {
        let mut cursor = self.head;
        std::iter::from_fn(move || {
            if cursor == NIL {
                return None;
            }
            let slot = self.slots[cursor as usize];
            cursor = slot.next;
            Some(slot.hash)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    /// A tiny deterministic generator so the model check needs no dependency.
    fn next(state: &mut u64) -> u64 {
        *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = *state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    #[test]
    fn evicts_least_recently_used() {
        let mut set = LruSet::new(3);
        for h in [1, 2, 3] {
            set.insert(h);
        }
        set.insert(1); // refresh 1: 2 is now the oldest
        set.insert(4);
        assert!(!set.contains(2));
        assert!(set.contains(1) && set.contains(3) && set.contains(4));
        assert_eq!(set.iter_recent().collect::<Vec<_>>(), vec![4, 1, 3]);
        assert_eq!(set.len(), 3);
    }

    #[test]
    fn zero_hash_is_storable() {
        let mut set = LruSet::new(4);
        set.insert(0);
        assert!(set.contains(0));
    }

    /// Random inserts against a straightforward model: same members, same order, bounded.
    #[test]
    fn matches_a_reference_lru_under_churn() {
        for capacity in [1u32, 2, 7, 64, 1000] {
            let mut set = LruSet::new(capacity);
            let mut model: VecDeque<u64> = VecDeque::new();
            let mut rng = u64::from(capacity);
            // A small key space forces many refreshes; the space grows to force evictions.
            let space = u64::from(capacity) * 3 + 5;
            for step in 0..20_000u32 {
                let mut key = next(&mut rng) % space;
                if step % 7 == 0 {
                    key = next(&mut rng); // wide keys exercise long probe runs
                }
                set.insert(key);
                let key = stored(key);
                if let Some(pos) = model.iter().position(|&k| k == key) {
                    model.remove(pos);
                } else if model.len() == capacity as usize {
                    model.pop_back();
                }
                model.push_front(key);
                assert_eq!(set.len(), model.len());
                assert!(set.len() <= set.capacity());
            }
            assert_eq!(set.iter_recent().collect::<Vec<_>>(), Vec::from(model.clone()));
            for k in &model {
                assert!(set.contains(*k));
            }
        }
    }

    #[test]
    fn full_set_stays_within_24_bytes_per_entry() {
        let mut set = LruSet::new(31_250);
        let mut rng = 1;
        for _ in 0..100_000 {
            set.insert(next(&mut rng));
        }
        assert_eq!(set.len(), 31_250);
        let per_entry = set.allocated_bytes() as f64 / set.len() as f64;
        assert!(per_entry <= 24.0, "{per_entry} bytes per entry");
    }
}
