//! The bookkeeping of the paged KV cache's blocks: which are free, which sequences hold which
//! (a block may be held by several at once), and which hold a known prompt prefix — the prefix
//! cache, as vLLM's automatic prefix caching has it.
//!
//! A block whose 16 positions are all written can be *registered* under its key: the tokens at
//! its positions and the identity of the registered block before it (so a key names a whole
//! prefix, not only its last 16 tokens). A new sequence looks its prompt up block by block and
//! holds the blocks it finds instead of computing their keys and values again. Registered blocks
//! are never written again: a sequence writes only at positions past its length, and only whole
//! blocks are shared. When no sequence holds a registered block any more it stays cached, and is
//! evicted (least recently released first) only when a free block is needed and none is left.
//!
//! Identities are numbers handed out once per registration and never reused, so a key that names
//! an evicted block can match nothing again, and a match is exact: no hash of the tokens stands in
//! for the tokens themselves.
use super::paged::BLOCK_TOKENS;
use std::collections::{BTreeMap, HashMap};

/// What a registered block holds: the identity of the registered block before it (0 for the
/// first block of a sequence) and its own tokens.
type Key = (u64, [u32; BLOCK_TOKENS]);

#[derive(Debug, Clone, Copy, Default)]
struct Meta {
    /// Sequences holding the block.
    refs: u32,
    /// The key and identity under which the block is registered (None, 0: not registered).
    key: Option<Key>,
    id: u64,
    /// While cached and held by no sequence: its place in the eviction order.
    released_at: u64,
}

/// The blocks of one pool.
#[derive(Debug)]
pub struct Blocks {
    meta: Vec<Meta>,
    /// Blocks held by no sequence and not registered, handed out from the end (low ids first).
    free: Vec<u32>,
    /// Registered blocks held by no sequence, by release time (the oldest evicted first).
    idle: BTreeMap<u64, u32>,
    /// Registered blocks by key.
    index: HashMap<Key, u32>,
    /// Whether blocks are registered at all (`serve --no-prefix-cache` turns it off).
    caching: bool,
    next_id: u64,
    clock: u64,
}

impl Blocks {
    pub fn new(total: usize, caching: bool) -> Self {
        Self {
            meta: vec![Meta::default(); total],
            free: (0..total as u32).rev().collect(),
            idle: BTreeMap::new(),
            index: HashMap::new(),
            caching,
            next_id: 1,
            clock: 0,
        }
    }

    pub fn total(&self) -> usize {
        self.meta.len()
    }
    /// Blocks a sequence can be given now: the free ones and the cached ones no one holds.
    pub fn available(&self) -> usize {
        self.free.len() + self.idle.len()
    }
    /// Cached blocks held by no sequence (kept for a later prompt that starts the same way).
    pub fn idle(&self) -> usize {
        self.idle.len()
    }
    pub fn caching(&self) -> bool {
        self.caching
    }

    /// A block for one more sequence: a free one, else the cached block released longest ago
    /// (forgotten by the cache). None when every block is held.
    pub fn take(&mut self) -> Option<u32> {
        let b = match self.free.pop() {
            Some(b) => b,
            None => {
                let (_, b) = self.idle.pop_first()?;
                let m = &mut self.meta[b as usize];
                if let Some(key) = m.key.take() {
                    self.index.remove(&key);
                }
                m.id = 0;
                b
            }
        };
        self.meta[b as usize].refs = 1;
        Some(b)
    }

    /// One more sequence holds registered block `b`.
    fn hold(&mut self, b: u32) {
        let m = &mut self.meta[b as usize];
        if m.refs == 0 {
            self.idle.remove(&m.released_at);
        }
        m.refs += 1;
    }

    /// A sequence lets go of `b`: once no one holds it, it is free, or cached if registered.
    pub fn release(&mut self, b: u32) {
        let m = &mut self.meta[b as usize];
        debug_assert!(m.refs > 0, "block {b} released more often than held");
        m.refs = m.refs.saturating_sub(1);
        if m.refs > 0 {
            return;
        }
        if m.key.is_some() {
            self.clock += 1;
            m.released_at = self.clock;
            self.idle.insert(self.clock, b);
        } else {
            self.free.push(b);
        }
    }

    /// The registered blocks that hold `tokens`' first whole blocks, at most `max_blocks`, held
    /// for the caller, with their identities (see [`Blocks::register`]).
    pub fn adopt(&mut self, tokens: &[u32], max_blocks: usize) -> Vec<(u32, u64)> {
        let mut found = Vec::new();
        if !self.caching {
            return found;
        }
        let mut parent = 0;
        for chunk in tokens.chunks_exact(BLOCK_TOKENS).take(max_blocks) {
            let key = (parent, chunk.try_into().expect("a whole block"));
            let Some(&b) = self.index.get(&key) else { break };
            self.hold(b);
            parent = self.meta[b as usize].id;
            found.push((b, parent));
        }
        found
    }

    /// Registers block `b` (held by the caller, its positions all written) as holding `tokens`
    /// after the prefix whose last registered block has identity `parent`. Returns the identity
    /// the next block of the same sequence chains to: `b`'s own, or that of the block already
    /// registered under the same key (another sequence computed the same prefix first; `b` then
    /// stays private and is freed with its sequence).
    pub fn register(&mut self, b: u32, parent: u64, tokens: &[u32]) -> u64 {
        if !self.caching {
            return 0;
        }
        let key: Key = (parent, tokens.try_into().expect("a whole block"));
        if let Some(&other) = self.index.get(&key) {
            return self.meta[other as usize].id;
        }
        let id = self.next_id;
        self.next_id += 1;
        let m = &mut self.meta[b as usize];
        m.id = id;
        m.key = Some(key);
        self.index.insert(key, b);
        id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(first: u32) -> Vec<u32> {
        (first..first + BLOCK_TOKENS as u32).collect()
    }

    #[test]
    fn registered_blocks_are_found_held_cached_and_evicted_oldest_first() {
        let mut b = Blocks::new(4, true);
        let (x, y) = (b.take().unwrap(), b.take().unwrap());
        assert_eq!((x, y), (0, 1), "low ids first");
        let prompt: Vec<u32> = [block(0), block(100), vec![7]].concat();
        let idx = b.register(x, 0, &prompt[..16]);
        let idy = b.register(y, idx, &prompt[16..32]);
        // Another sequence with the same prompt finds both; with a different second block, one.
        let found = b.adopt(&prompt, 2);
        assert_eq!(found, vec![(x, idx), (y, idy)]);
        let other: Vec<u32> = [block(0), block(200)].concat();
        assert_eq!(b.adopt(&other, 2), vec![(x, idx)]);
        // The same 16 tokens after a different prefix are another key.
        let shifted: Vec<u32> = [block(100), block(100)].concat();
        assert!(b.adopt(&shifted, 2).is_empty());
        assert_eq!(b.adopt(&prompt, 0), vec![], "at most max_blocks");
        // x is held three times, y twice; all let go: both stay cached, y released last.
        for blk in [x, x, x, y, y] {
            b.release(blk);
        }
        assert_eq!((b.available(), b.idle()), (4, 2));
        // Two free blocks are handed out before any cached one; then x (released first) goes.
        let (f1, f2) = (b.take().unwrap(), b.take().unwrap());
        assert_eq!((f1, f2), (2, 3));
        assert_eq!(b.take(), Some(x));
        assert!(b.adopt(&prompt, 2).is_empty(), "the first block is gone, so the chain is");
        // y's key names x's old identity, which nothing can match again.
        let fresh = b.register(x, 0, &prompt[..16]);
        assert!(fresh != idx);
        assert_eq!(b.adopt(&prompt, 2), vec![(x, fresh)]);
        assert_eq!(b.take(), Some(y));
        assert_eq!(b.take(), None, "every block is held");
    }

    #[test]
    fn a_second_registration_of_the_same_prefix_chains_to_the_first() {
        let mut b = Blocks::new(3, true);
        let (x, y) = (b.take().unwrap(), b.take().unwrap());
        let id = b.register(x, 0, &block(5));
        assert_eq!(b.register(y, 0, &block(5)), id);
        b.release(y);
        assert_eq!((b.available(), b.idle()), (2, 0), "the duplicate stays private and is freed");
        b.release(x);
        assert_eq!(b.idle(), 1);
    }

    #[test]
    fn without_caching_nothing_is_found_and_released_blocks_are_free() {
        let mut b = Blocks::new(2, false);
        let x = b.take().unwrap();
        b.release(x);
        assert!(b.adopt(&block(0), 1).is_empty());
        assert_eq!((b.available(), b.idle()), (2, 0));
    }
}
