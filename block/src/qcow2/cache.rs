// Copyright 2025 The cloud-hypervisor authors.
// SPDX-License-Identifier: Apache-2.0

//! A small LRU cache of metadata clusters keyed by host offset.

use std::collections::HashMap;

struct Entry<T> {
    value: T,
    dirty: bool,
    stamp: u64,
}

/// LRU cache with dirty tracking; eviction hands dirty values back.
pub struct Cache<T> {
    map: HashMap<u64, Entry<T>>,
    capacity: usize,
    clock: u64,
}

impl<T> Cache<T> {
    /// A cache holding at most `capacity` (at least 1) values.
    pub fn new(capacity: usize) -> Self {
        Cache {
            map: HashMap::new(),
            capacity: capacity.max(1),
            clock: 0,
        }
    }

    /// Whether `key` is cached.
    pub fn contains(&self, key: u64) -> bool {
        self.map.contains_key(&key)
    }

    /// Look up `key`, marking it recently used.
    pub fn get(&mut self, key: u64) -> Option<&T> {
        self.clock += 1;
        let clock = self.clock;
        self.map.get_mut(&key).map(|e| {
            e.stamp = clock;
            &e.value
        })
    }

    /// Look up `key` for modification; marks it dirty when `dirty`.
    pub fn get_mut(&mut self, key: u64, dirty: bool) -> Option<&mut T> {
        self.clock += 1;
        let clock = self.clock;
        self.map.get_mut(&key).map(|e| {
            e.stamp = clock;
            e.dirty |= dirty;
            &mut e.value
        })
    }

    /// The entry that would be evicted by the next insert, if the cache is full.
    pub fn victim(&self) -> Option<(u64, bool)> {
        if self.map.len() < self.capacity {
            return None;
        }
        self.map
            .iter()
            .min_by_key(|(_, e)| e.stamp)
            .map(|(k, e)| (*k, e.dirty))
    }

    /// Insert a value; the caller must have made room (see [`Cache::victim`]).
    pub fn insert(&mut self, key: u64, value: T, dirty: bool) {
        self.clock += 1;
        self.map.insert(
            key,
            Entry {
                value,
                dirty,
                stamp: self.clock,
            },
        );
    }

    /// Remove and return a value with its dirty flag.
    pub fn remove(&mut self, key: u64) -> Option<(T, bool)> {
        self.map.remove(&key).map(|e| (e.value, e.dirty))
    }

    /// Whether any entry is dirty.
    pub fn has_dirty(&self) -> bool {
        self.map.values().any(|e| e.dirty)
    }

    /// Keys of dirty entries, sorted.
    pub fn dirty_keys(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self
            .map
            .iter()
            .filter(|(_, e)| e.dirty)
            .map(|(k, _)| *k)
            .collect();
        v.sort_unstable();
        v
    }

    /// Peek at a value and mark it clean.
    pub fn take_dirty(&mut self, key: u64) -> Option<&T> {
        self.map.get_mut(&key).map(|e| {
            e.dirty = false;
            &e.value
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lru_victim_is_least_recent() {
        let mut c = Cache::new(2);
        c.insert(1, "a", false);
        c.insert(2, "b", true);
        assert_eq!(c.victim().map(|v| v.0), Some(1));
        c.get(1);
        assert_eq!(c.victim(), Some((2, true)));
        c.remove(2);
        assert!(c.victim().is_none());
        assert_eq!(c.dirty_keys(), Vec::<u64>::new());
    }
}
