//! A hash map from addresses to small `Copy` values for the analyzer's hot
//! path: open addressing with linear probing in one flat array of
//! (key, value) pairs, Fibonacci hashing (the top bits of `key * 2^64/φ`),
//! deletion by backward shifting (no tombstones), and a
//! [`prefetch`](AddrMap::prefetch) of an address's home bucket so that a
//! batch of events can ask for the cache lines it will need a few events
//! ahead (the per-address tables outgrow the caches on a busy trace).
//!
//! Key 0 marks an empty bucket; the entry for address 0 (only a damaged or
//! hand-made trace has one) is kept beside the array.

/// Fibonacci hashing's multiplier, 2^64 / φ.
const PHI: u64 = 0x9e37_79b9_7f4a_7c15;

/// The smallest table, in buckets.
const MIN_BUCKETS: usize = 64;

/// A key and its value, aligned to 32 bytes: with a value of at most 24
/// bytes, no bucket straddles two cache lines.
#[derive(Clone, Copy, Debug)]
#[repr(C, align(32))]
struct Bucket<V>(u64, V);

/// See the [module documentation](self).
#[derive(Clone, Debug)]
pub struct AddrMap<V> {
    /// `(key, value)`; key 0 = empty.
    buckets: Vec<Bucket<V>>,
    /// `buckets.len() - 1` (a power of two minus one).
    mask: usize,
    /// `64 - log2(buckets.len())`.
    shift: u32,
    /// Entries in `buckets`.
    len: usize,
    /// The most entries in `buckets`, in percent of their number, before
    /// the table doubles.
    max_load: usize,
    /// The most entries in `buckets` before the table doubles:
    /// `buckets.len() * max_load / 100`.
    grow_at: usize,
    /// The entry for key 0.
    zero: Option<V>,
}

impl<V: Copy + Default> Default for AddrMap<V> {
    fn default() -> Self {
        AddrMap::new(75)
    }
}

impl<V: Copy + Default> AddrMap<V> {
    /// An empty map that keeps at most `max_load` percent of its buckets
    /// full (between 10 and 90): less makes probes and removals shorter,
    /// more takes less memory.
    pub fn new(max_load: usize) -> Self {
        Self::with_buckets(MIN_BUCKETS, max_load.clamp(10, 90))
    }

    fn with_buckets(n: usize, max_load: usize) -> Self {
        let n = n.max(MIN_BUCKETS).next_power_of_two();
        AddrMap {
            buckets: vec![Bucket(0, V::default()); n],
            mask: n - 1,
            shift: 64 - n.trailing_zeros(),
            len: 0,
            max_load,
            grow_at: n * max_load / 100,
            zero: None,
        }
    }

    /// Entries in the map.
    pub fn len(&self) -> usize {
        self.len + usize::from(self.zero.is_some())
    }

    /// True when the map holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    #[inline(always)]
    fn home(&self, key: u64) -> usize {
        (key.wrapping_mul(PHI) >> self.shift) as usize
    }

    /// The bucket holding `key` (nonzero), or the empty one where it would
    /// go.
    #[inline(always)]
    fn find(&self, key: u64) -> Result<usize, usize> {
        let mut i = self.home(key);
        loop {
            let k = self.buckets[i].0;
            if k == key {
                return Ok(i);
            }
            if k == 0 {
                return Err(i);
            }
            i = (i + 1) & self.mask;
        }
    }

    /// Asks the CPU to bring `key`'s home bucket into the cache.
    #[inline(always)]
    pub fn prefetch(&self, key: u64) {
        let i = self.home(key);
        prefetch(&self.buckets[i]);
    }

    /// The value for `key`.
    #[inline]
    pub fn get(&self, key: u64) -> Option<V> {
        if key == 0 {
            return self.zero;
        }
        self.find(key).ok().map(|i| self.buckets[i].1)
    }

    /// The value for `key`, to change in place.
    #[inline]
    pub fn get_mut(&mut self, key: u64) -> Option<&mut V> {
        if key == 0 {
            return self.zero.as_mut();
        }
        match self.find(key) {
            Ok(i) => Some(&mut self.buckets[i].1),
            Err(_) => None,
        }
    }

    /// Sets the value for `key`.
    #[inline]
    pub fn insert(&mut self, key: u64, value: V) {
        if key == 0 {
            self.zero = Some(value);
            return;
        }
        match self.find(key) {
            Ok(i) => self.buckets[i].1 = value,
            Err(i) => self.insert_vacant(i, key, value),
        }
    }

    /// Looks `key` up once: when present, `present` may change its value
    /// and says whether to remove it; when absent, `absent` says what to
    /// insert, if anything. Returns what the closure returned.
    #[inline(always)]
    pub fn update<R>(
        &mut self,
        key: u64,
        present: impl FnOnce(&mut V) -> (bool, R),
        absent: impl FnOnce() -> (Option<V>, R),
    ) -> R {
        if key == 0 {
            return match &mut self.zero {
                Some(v) => {
                    let (remove, r) = present(v);
                    if remove {
                        self.zero = None;
                    }
                    r
                }
                None => {
                    let (v, r) = absent();
                    self.zero = v;
                    r
                }
            };
        }
        match self.find(key) {
            Ok(i) => {
                let (remove, r) = present(&mut self.buckets[i].1);
                if remove {
                    self.remove_at(i);
                }
                r
            }
            Err(i) => {
                let (v, r) = absent();
                if let Some(v) = v {
                    self.insert_vacant(i, key, v);
                }
                r
            }
        }
    }

    /// Removes `key` and returns its value when it is there and `take` says
    /// so; `None` (and no change) otherwise, and always for key 0.
    #[inline(always)]
    pub fn take_if(&mut self, key: u64, take: impl FnOnce(&V) -> bool) -> Option<V> {
        if key == 0 {
            return None;
        }
        let i = self.find(key).ok()?;
        let v = self.buckets[i].1;
        if !take(&v) {
            return None;
        }
        self.remove_at(i);
        Some(v)
    }

    /// Inserts `key` when it is not there and returns true; false (and no
    /// change) when it is, and always for key 0.
    #[inline(always)]
    pub fn insert_new(&mut self, key: u64, value: V) -> bool {
        if key == 0 {
            return false;
        }
        match self.find(key) {
            Ok(_) => false,
            Err(i) => {
                self.insert_vacant(i, key, value);
                true
            }
        }
    }

    /// Puts a new entry into bucket `i`, the empty one `find` gave for it.
    #[inline(always)]
    fn insert_vacant(&mut self, i: usize, key: u64, value: V) {
        if self.len >= self.grow_at {
            self.grow_insert(key, value);
        } else {
            self.buckets[i] = Bucket(key, value);
            self.len += 1;
        }
    }

    #[cold]
    #[inline(never)]
    fn grow_insert(&mut self, key: u64, value: V) {
        self.resize(self.buckets.len() * 2);
        if let Err(i) = self.find(key) {
            self.buckets[i] = Bucket(key, value);
            self.len += 1;
        }
    }

    /// Removes `key`, returning its value.
    #[inline]
    pub fn remove(&mut self, key: u64) -> Option<V> {
        if key == 0 {
            return self.zero.take();
        }
        let i = self.find(key).ok()?;
        let v = self.buckets[i].1;
        self.remove_at(i);
        Some(v)
    }

    /// Empties bucket `i`, moving later entries of its probe run back so
    /// that every entry stays reachable from its home bucket.
    #[inline(always)]
    fn remove_at(&mut self, mut i: usize) {
        let mask = self.mask;
        let mut j = i;
        loop {
            j = (j + 1) & mask;
            let k = self.buckets[j].0;
            if k == 0 {
                break;
            }
            // The entry at j may move to i unless its home lies in (i, j].
            let h = self.home(k);
            if (j.wrapping_sub(h) & mask) >= (j.wrapping_sub(i) & mask) {
                self.buckets[i] = self.buckets[j];
                i = j;
            }
        }
        self.buckets[i].0 = 0;
        self.len -= 1;
    }

    fn resize(&mut self, n: usize) {
        let old = std::mem::replace(self, AddrMap::with_buckets(n, self.max_load));
        self.zero = old.zero;
        for &Bucket(k, v) in old.buckets.iter().filter(|e| e.0 != 0) {
            let Err(i) = self.find(k) else {
                unreachable!("keys are distinct")
            };
            self.buckets[i] = Bucket(k, v);
            self.len += 1;
        }
    }

    /// Keeps the entries for which `keep` is true, in place; the table
    /// shrinks when it became mostly empty. `keep` may be asked more than
    /// once about an entry and must answer the same.
    pub fn retain(&mut self, mut keep: impl FnMut(u64, &V) -> bool) {
        if self.zero.as_ref().is_some_and(|v| !keep(0, v)) {
            self.zero = None;
        }
        // Removing at i may move a later entry back into i: look at i
        // again. (An entry moved back across the end of the array is
        // looked at twice, which `keep` allows.)
        let mut i = 0;
        while i < self.buckets.len() {
            let Bucket(k, v) = self.buckets[i];
            if k != 0 && !keep(k, &v) {
                self.remove_at(i);
            } else {
                i += 1;
            }
        }
        let mut n = self.buckets.len();
        while n > MIN_BUCKETS && self.len * 400 < n * self.max_load {
            n /= 2;
        }
        if n != self.buckets.len() {
            self.resize(n);
        }
    }

    /// The entries, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &V)> + '_ {
        self.zero.iter().map(|v| (0, v)).chain(
            self.buckets
                .iter()
                .filter(|e| e.0 != 0)
                .map(|Bucket(k, v)| (*k, v)),
        )
    }

    /// The values, in no particular order.
    pub fn values(&self) -> impl Iterator<Item = &V> + '_ {
        self.iter().map(|(_, v)| v)
    }
}

/// A hint to load the cache line at `p`, which need not point into any
/// object (a prefetch reads nothing the program sees and never faults); no
/// effect on other targets.
#[inline(always)]
pub fn prefetch_ptr<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `_mm_prefetch` needs SSE, which every x86_64 CPU has, and it
    // neither reads program-visible memory nor faults, whatever the address.
    unsafe {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        _mm_prefetch::<_MM_HINT_T0>(p.cast::<i8>());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// A hint to load the cache line holding `r`; no effect on other targets.
#[inline(always)]
fn prefetch<T>(r: &T) {
    prefetch_ptr(r as *const T);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fxhash::FxHashMap;

    #[test]
    fn behaves_like_a_hash_map() {
        let mut m: AddrMap<u64> = AddrMap::new(60);
        let mut r: FxHashMap<u64, u64> = FxHashMap::default();
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for step in 0..200_000u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // Few distinct keys, clustered like heap addresses, and 0.
            let key = if x.is_multiple_of(97) {
                0
            } else {
                (x >> 20) % 3000 * 16
            };
            match x % 5 {
                0 | 1 => {
                    m.insert(key, step);
                    r.insert(key, step);
                }
                2 => assert_eq!(m.remove(key), r.remove(&key)),
                3 => {
                    if let Some(v) = m.get_mut(key) {
                        *v += 1;
                    }
                    if let Some(v) = r.get_mut(&key) {
                        *v += 1;
                    }
                }
                _ => assert_eq!(m.get(key), r.get(&key).copied()),
            }
            if step % 50_000 == 0 {
                m.retain(|k, _| k % 3 != 0);
                r.retain(|k, _| k % 3 != 0);
            }
            assert_eq!(m.len(), r.len());
        }
        let mut a: Vec<(u64, u64)> = m.iter().map(|(k, v)| (k, *v)).collect();
        let mut b: Vec<(u64, u64)> = r.into_iter().collect();
        a.sort_unstable();
        b.sort_unstable();
        assert_eq!(a, b);
        m.retain(|_, _| false);
        assert!(m.is_empty());
        assert_eq!(m.buckets.len(), MIN_BUCKETS);
    }
}
