//! Typed data that plugins share: per-endpoint attributes in the snapshot and per-request
//! cycle state.
//!
//! The reference passes shared data around as `any` in string-keyed maps (`CycleState`, the
//! endpoint attribute map) and checks types with reflection at run time. Here a [`DataKey<T>`]
//! carries its type: a consumer asks for `DataKey<PrefixMatch>` and gets `Option<&PrefixMatch>`,
//! and a wrong pairing does not compile. Keys are named after their producer (the plugin
//! instance that writes them, as the reference's `DataKey` with its producer name), so two
//! instances of one producer type write two keys. A key is a small integer: a lookup is a scan
//! of a few entries and a downcast, with no hashing and no lock.

use std::any::{Any, TypeId, type_name};
use std::fmt;
use std::marker::PhantomData;
use std::sync::{Arc, LazyLock};

use parking_lot::Mutex;

/// Process-wide interner of `(type, producer)` pairs. Only key creation takes the lock, at
/// start-up or in tests; lookups use the integer.
struct Interner {
    entries: Vec<(TypeId, &'static str, Box<str>)>,
}

static KEYS: LazyLock<Mutex<Interner>> = LazyLock::new(|| {
    Mutex::new(Interner {
        // Id 0 is the model server's load figures, so that `METRICS` can be a constant.
        entries: vec![(
            TypeId::of::<crate::datalayer::Metrics>(),
            type_name::<crate::datalayer::Metrics>(),
            "".into(),
        )],
    })
});

/// The key of data of type `T` written by one producer. Cheap to copy and compare.
pub struct DataKey<T> {
    id: u32,
    _type: PhantomData<fn() -> T>,
}

impl<T> Clone for DataKey<T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for DataKey<T> {}

impl<T> PartialEq for DataKey<T> {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id
    }
}

impl<T> Eq for DataKey<T> {}

impl<T> fmt::Debug for DataKey<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&key_name(self.id))
    }
}

impl<T: 'static> DataKey<T> {
    /// The key of `T` written by `producer` (a plugin name; `""` for data the framework itself
    /// defines). The same pair always gives the same key.
    pub fn named(producer: &str) -> Self {
        let tid = TypeId::of::<T>();
        let mut keys = KEYS.lock();
        let id = match keys
            .entries
            .iter()
            .position(|(t, _, p)| *t == tid && **p == *producer)
        {
            Some(i) => i,
            None => {
                keys.entries.push((tid, type_name::<T>(), producer.into()));
                keys.entries.len() - 1
            }
        };
        Self {
            id: u32::try_from(id).unwrap_or(u32::MAX),
            _type: PhantomData,
        }
    }
}

impl<T> DataKey<T> {
    /// A key with a fixed id (only for ids reserved by the interner).
    pub(crate) const fn reserved(id: u32) -> Self {
        Self {
            id,
            _type: PhantomData,
        }
    }

    /// The untyped id, as attribute writers and the one-writer check use it.
    pub fn id(self) -> KeyId {
        KeyId(self.id)
    }
}

/// A key without its type: what sources and extractors declare they write.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId(u32);

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&key_name(self.0))
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&key_name(self.0))
    }
}

/// `Type` or `Type/producer`, for messages.
fn key_name(id: u32) -> String {
    let keys = KEYS.lock();
    match keys.entries.get(id as usize) {
        Some((_, ty, producer)) => {
            let short = ty.rsplit("::").next().unwrap_or(ty);
            if producer.is_empty() {
                short.to_owned()
            } else {
                format!("{short}/{producer}")
            }
        }
        None => format!("key#{id}"),
    }
}

/// A value as stored: shared, immutable, of the key's type.
pub type Value = Arc<dyn Any + Send + Sync>;

/// Typed per-endpoint data in a snapshot, each entry written by exactly one writer (checked
/// when the configuration is built). Copy-on-write: cloning shares the entries, writing one
/// entry copies the small list of pointers. One pointer wide, so that snapshot entries stay
/// small for the scans over every endpoint that each request makes.
#[derive(Clone, Default)]
pub struct Attributes(Option<Arc<Vec<(KeyId, Value)>>>);

impl fmt::Debug for Attributes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.entries().iter().map(|(k, _)| k))
            .finish()
    }
}

impl Attributes {
    fn entries(&self) -> &[(KeyId, Value)] {
        self.0.as_deref().map_or(&[], Vec::as_slice)
    }

    /// The value under `key`, if present.
    pub fn get<T: Any>(&self, key: DataKey<T>) -> Option<&T> {
        let id = key.id();
        self.entries()
            .iter()
            .find(|(k, _)| *k == id)
            .and_then(|(_, v)| v.downcast_ref::<T>())
    }

    /// The untyped value under `id`.
    pub fn get_raw(&self, id: KeyId) -> Option<&Value> {
        self.entries().iter().find(|(k, _)| *k == id).map(|(_, v)| v)
    }

    /// Sets `key` to `value`.
    pub fn set<T: Any + Send + Sync>(&mut self, key: DataKey<T>, value: Arc<T>) {
        self.set_raw(key.id(), value);
    }

    /// Sets an entry from an untyped value (writers whose key type is only known to them).
    pub fn set_raw(&mut self, id: KeyId, value: Value) {
        let mut entries: Vec<(KeyId, Value)> = self.entries().to_vec();
        match entries.iter_mut().find(|(k, _)| *k == id) {
            Some(slot) => slot.1 = value,
            None => entries.push((id, value)),
        }
        self.0 = Some(Arc::new(entries));
    }

    /// Keys present.
    pub fn keys(&self) -> impl Iterator<Item = KeyId> + '_ {
        self.entries().iter().map(|(k, _)| *k)
    }

    /// Whether no entry is set.
    pub fn is_empty(&self) -> bool {
        self.entries().is_empty()
    }
}

/// Data computed for one request and read by later steps of the same request: what a data
/// producer found before scheduling (the reference's `PrepareData`), read by scorers and by
/// its own pre-request step. Owned by the request, dropped with it. The first entry is kept
/// inline: most configurations have one producer, and the request path saves an allocation.
#[derive(Default)]
pub struct CycleState {
    first: Option<(KeyId, Box<dyn Any>)>,
    rest: Vec<(KeyId, Box<dyn Any>)>,
}

impl fmt::Debug for CycleState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter().map(|(k, _)| k)).finish()
    }
}

impl CycleState {
    fn iter(&self) -> impl Iterator<Item = &(KeyId, Box<dyn Any>)> {
        self.first.iter().chain(self.rest.iter())
    }

    /// Stores `value` under `key`, replacing what was there.
    pub fn put<T: Any>(&mut self, key: DataKey<T>, value: T) {
        let id = key.id();
        let entry = (id, Box::new(value) as Box<dyn Any>);
        match &mut self.first {
            None => self.first = Some(entry),
            Some(first) if first.0 == id => *first = entry,
            Some(_) => match self.rest.iter_mut().find(|(k, _)| *k == id) {
                Some(slot) => *slot = entry,
                None => self.rest.push(entry),
            },
        }
    }

    /// The value under `key`, if a producer stored one this cycle.
    pub fn get<T: Any>(&self, key: DataKey<T>) -> Option<&T> {
        let id = key.id();
        self.iter()
            .find(|(k, _)| *k == id)
            .and_then(|(_, v)| v.downcast_ref::<T>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq)]
    struct Load(u32);

    #[test]
    fn keys_are_typed_and_named_by_producer() {
        let a = DataKey::<Load>::named("a");
        assert_eq!(a, DataKey::<Load>::named("a"));
        assert_ne!(a.id(), DataKey::<Load>::named("b").id());
        assert_ne!(a.id(), DataKey::<u32>::named("a").id());
        assert_eq!(format!("{a:?}"), "Load/a");
        assert_eq!(
            crate::datalayer::METRICS.id(),
            DataKey::<crate::datalayer::Metrics>::named("").id()
        );
    }

    #[test]
    fn attributes_copy_on_write() {
        let k = DataKey::<Load>::named("w");
        let mut a = Attributes::default();
        assert!(a.get(k).is_none());
        a.set(k, Arc::new(Load(1)));
        let before = a.clone();
        a.set(k, Arc::new(Load(2)));
        assert_eq!(before.get(k), Some(&Load(1)));
        assert_eq!(a.get(k), Some(&Load(2)));
        assert_eq!(a.keys().count(), 1);
    }

    #[test]
    fn cycle_state_holds_one_value_per_key() {
        let k = DataKey::<Load>::named("c");
        let mut s = CycleState::default();
        s.put(k, Load(1));
        s.put(k, Load(3));
        assert_eq!(s.get(k), Some(&Load(3)));
        let other = DataKey::<Load>::named("c2");
        s.put(other, Load(4));
        s.put(other, Load(5));
        assert_eq!((s.get(k), s.get(other)), (Some(&Load(3)), Some(&Load(5))));
        assert!(s.get(DataKey::<Load>::named("other")).is_none());
    }
}
