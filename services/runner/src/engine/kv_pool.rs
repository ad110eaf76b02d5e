//! The KV memory the engine keeps, in blocks, and the automatic prefix
//! cache over it.
//!
//! Every block of every sequence comes from the pool. A block that fills
//! up is registered under its chain hash: the hash of its parent's (the
//! block before it), its tokens and a salt naming the model, so that a
//! block stands for its whole prefix. A new sequence's prompt is matched
//! block by block along that chain, and the blocks found are shared into
//! its cache instead of being computed again.
//!
//! Invariants:
//!
//! - A hit is exact: an entry keeps its tokens and its parent's id (ids
//!   are never reused), and a lookup follows the chain only through
//!   entries whose tokens and parent are the ones asked for, so a hash
//!   collision costs a miss, never a wrong answer.
//! - Blocks held by a running sequence are never evicted. Cached blocks
//!   no sequence holds ("idle") are evicted least recently released
//!   first, the deepest of a chain first among those released together
//!   (children before their parents).
//! - The pool allocates past its budget only when no idle block and no
//!   spare memory is left (running sequences are never preempted), and
//!   gives memory back as blocks come free until it is under budget
//!   again. Spare blocks are kept for reuse, so steady serving does not
//!   fault in new pages.

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use crate::model::{Config, KvBlock, SeqCache};

/// A sequence's link to the prefix cache entry that its block holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Link {
    hash: u64,
    id: u64,
}

/// A prompt's cached prefix, as found by [`KvPool::lookup`].
#[derive(Debug, Default)]
pub(super) struct Match {
    links: Vec<Link>,
}

/// Idle entries in eviction order: least recently released first, then
/// the deepest of a chain, then the oldest entry.
type IdleKey = (u64, Reverse<usize>, u64);

struct Entry {
    block: Arc<KvBlock>,
    id: u64,
    /// The id of the entry before it in the chain; `None` for a first block.
    parent: Option<u64>,
    tokens: Box<[u32]>,
    depth: usize,
    /// Set while no sequence holds the block.
    idle: Option<IdleKey>,
}

/// What the pool holds, for metrics and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolCounts {
    /// Blocks of memory kept: held by sequences, cached or spare.
    pub allocated_blocks: usize,
    /// Blocks in the prefix cache, held by sequences or idle.
    pub cached_blocks: usize,
    /// Cached blocks no sequence holds.
    pub idle_blocks: usize,
    /// Prefix cache entries evicted since the start.
    pub evictions: u64,
}

pub(super) struct KvPool {
    config: Config,
    block_tokens: usize,
    budget_blocks: usize,
    /// Blocks alive anywhere (sequences, the cache, `spare`).
    allocated: usize,
    spare: Vec<KvBlock>,
    /// `None` with prefix caching off.
    prefix: Option<Prefix>,
}

struct Prefix {
    salt: u64,
    entries: HashMap<u64, Entry>,
    idle: BTreeMap<IdleKey, u64>,
    next_id: u64,
    /// Bumped at each release, so blocks released together tie.
    clock: u64,
    evictions: u64,
}

impl KvPool {
    /// A pool of at most `budget_blocks` blocks of `block_tokens` positions
    /// (beyond it only as [`KvPool`]'s invariants say), with prefix caching
    /// salted by `salt` when `prefix_cache`.
    pub(super) fn new(
        config: Config,
        block_tokens: usize,
        budget_blocks: usize,
        prefix_cache: bool,
        salt: &str,
    ) -> Self {
        let prefix = prefix_cache.then(|| Prefix {
            salt: {
                let mut h = std::hash::DefaultHasher::new();
                salt.hash(&mut h);
                h.finish()
            },
            entries: HashMap::new(),
            idle: BTreeMap::new(),
            next_id: 0,
            clock: 0,
            evictions: 0,
        });
        Self {
            config,
            block_tokens: block_tokens.max(1),
            budget_blocks: budget_blocks.max(1),
            allocated: 0,
            spare: Vec::new(),
            prefix,
        }
    }

    pub(super) fn block_tokens(&self) -> usize {
        self.block_tokens
    }

    pub(super) fn budget_blocks(&self) -> usize {
        self.budget_blocks
    }

    pub(super) fn prefix_caching(&self) -> bool {
        self.prefix.is_some()
    }

    pub(super) fn new_cache(&self) -> SeqCache {
        SeqCache::new(self.block_tokens)
    }

    pub(super) fn counts(&self) -> PoolCounts {
        PoolCounts {
            allocated_blocks: self.allocated,
            cached_blocks: self.prefix.as_ref().map_or(0, |p| p.entries.len()),
            idle_blocks: self.prefix.as_ref().map_or(0, |p| p.idle.len()),
            evictions: self.prefix.as_ref().map_or(0, |p| p.evictions),
        }
    }

    /// The cached blocks `prompt` starts with: whole blocks only, and not
    /// its last token, whose logits must be computed.
    pub(super) fn lookup(&self, prompt: &[u32]) -> Match {
        let Some(p) = &self.prefix else {
            return Match::default();
        };
        let bt = self.block_tokens;
        let most = prompt.len().saturating_sub(1) / bt;
        let mut links = Vec::new();
        let mut parent: Option<Link> = None;
        for tokens in prompt.chunks_exact(bt).take(most) {
            let hash = chain_hash(p.salt, parent.map(|l| l.hash), tokens);
            match p.entries.get(&hash) {
                Some(e) if e.parent == parent.map(|l| l.id) && *e.tokens == *tokens => {
                    let link = Link { hash, id: e.id };
                    links.push(link);
                    parent = Some(link);
                }
                _ => break,
            }
        }
        Match { links }
    }

    /// Blocks that admitting a prompt of `prompt_len` tokens with `found`
    /// cached adds to those running sequences hold.
    pub(super) fn blocks_needed(&self, found: &Match, prompt_len: usize) -> usize {
        let shared = self.prefix.as_ref().map_or(0, |p| {
            found
                .links
                .iter()
                .filter(|l| p.entries.get(&l.hash).is_some_and(|e| e.idle.is_none()))
                .count()
        });
        prompt_len.div_ceil(self.block_tokens) - shared
    }

    /// Shares the blocks `found` into an empty `cache`; `chain` records
    /// them. Returns the prompt tokens they hold.
    pub(super) fn acquire(
        &mut self,
        found: Match,
        cache: &mut SeqCache,
        chain: &mut Vec<Link>,
    ) -> usize {
        let Some(p) = &mut self.prefix else {
            return 0;
        };
        for link in found.links {
            let Some(e) = p.entries.get_mut(&link.hash) else {
                break;
            };
            if cache.push_full(e.block.clone()).is_err() {
                break;
            }
            if let Some(key) = e.idle.take() {
                p.idle.remove(&key);
            }
            chain.push(link);
        }
        cache.len()
    }

    /// Adds blocks to `cache` until `tokens` more positions fit.
    pub(super) fn reserve(&mut self, cache: &mut SeqCache, tokens: usize) {
        while cache.room() < cache.len() + tokens {
            let block = self.allocate();
            cache.push_empty(block);
        }
    }

    /// Registers the blocks of `cache` that filled up since the last call
    /// (`tokens`: the tokens the cache holds, at least). A block the cache
    /// already has is shared in place of the sequence's copy.
    pub(super) fn register(&mut self, cache: &mut SeqCache, chain: &mut Vec<Link>, tokens: &[u32]) {
        let Some(p) = &mut self.prefix else {
            return;
        };
        let bt = self.block_tokens;
        let full = cache.len().min(tokens.len()) / bt;
        let mut freed = Vec::new();
        while chain.len() < full {
            let i = chain.len();
            let parent = chain.last().copied();
            let block_tokens = &tokens[i * bt..(i + 1) * bt];
            let hash = chain_hash(p.salt, parent.map(|l| l.hash), block_tokens);
            let link = match p.entries.get_mut(&hash) {
                None => {
                    let id = p.next_id;
                    p.next_id += 1;
                    p.entries.insert(
                        hash,
                        Entry {
                            block: cache.blocks()[i].clone(),
                            id,
                            parent: parent.map(|l| l.id),
                            tokens: block_tokens.into(),
                            depth: i,
                            idle: None,
                        },
                    );
                    Link { hash, id }
                }
                Some(e) if e.parent == parent.map(|l| l.id) && *e.tokens == *block_tokens => {
                    // Computed twice (two sequences admitted before either
                    // registered it): keep one copy.
                    if !Arc::ptr_eq(&e.block, &cache.blocks()[i]) {
                        freed.push(cache.replace(i, e.block.clone()));
                    }
                    if let Some(key) = e.idle.take() {
                        p.idle.remove(&key);
                    }
                    Link { hash, id: e.id }
                }
                // A hash collision: the chain cannot go on from here.
                Some(_) => break,
            };
            chain.push(link);
        }
        for block in freed {
            self.give_back(block);
        }
    }

    /// Takes back a leaving sequence's blocks: cached ones stay cached
    /// (idle once no sequence holds them), the others are spare memory.
    pub(super) fn release(&mut self, cache: &mut SeqCache, chain: &mut Vec<Link>) {
        let blocks = cache.take_blocks();
        let links = std::mem::take(chain);
        let uncached = match &mut self.prefix {
            None => blocks,
            Some(p) => {
                p.clock += 1;
                let mut uncached = Vec::new();
                // Deepest first: the order ties are evicted in.
                for (i, block) in blocks.into_iter().enumerate().rev() {
                    let entry = links
                        .get(i)
                        .and_then(|l| p.entries.get_mut(&l.hash).map(|e| (l.hash, e)))
                        .filter(|(_, e)| Arc::ptr_eq(&e.block, &block));
                    let Some((hash, e)) = entry else {
                        uncached.push(block);
                        continue;
                    };
                    drop(block);
                    if Arc::strong_count(&e.block) == 1 {
                        let key = (p.clock, Reverse(e.depth), e.id);
                        e.idle = Some(key);
                        p.idle.insert(key, hash);
                    }
                }
                uncached
            }
        };
        for block in uncached {
            self.give_back(block);
        }
        self.trim();
    }

    /// A block for a sequence's next positions: spare memory, else new
    /// memory within the budget, else the least recently used idle block,
    /// else new memory past the budget.
    fn allocate(&mut self) -> KvBlock {
        if let Some(block) = self.spare.pop() {
            return block;
        }
        if self.allocated >= self.budget_blocks
            && let Some(block) = self.evict()
        {
            return block;
        }
        self.allocated += 1;
        KvBlock::new(&self.config, self.block_tokens)
    }

    /// A block no sequence or cache entry needs any more.
    fn give_back(&mut self, block: Arc<KvBlock>) {
        match Arc::try_unwrap(block) {
            Ok(block) if self.allocated <= self.budget_blocks => self.spare.push(block),
            // Past the budget, or (by a bug) still held elsewhere: its
            // memory goes when the last holder lets go.
            _ => self.allocated -= 1,
        }
    }

    /// Frees memory until the pool is within its budget, spare blocks
    /// first, then idle cached ones.
    fn trim(&mut self) {
        while self.allocated > self.budget_blocks {
            if self.spare.pop().is_none() && self.evict().is_none() {
                break;
            }
            self.allocated -= 1;
        }
    }

    /// Removes the idle entry first in eviction order, handing back its
    /// memory.
    fn evict(&mut self) -> Option<KvBlock> {
        let p = self.prefix.as_mut()?;
        loop {
            let (_, hash) = p.idle.pop_first()?;
            let Some(e) = p.entries.remove(&hash) else {
                continue;
            };
            p.evictions += 1;
            match Arc::try_unwrap(e.block) {
                Ok(block) => return Some(block),
                // Idle entries are held by the cache alone; were one not,
                // its holder keeps the memory.
                Err(_) => self.allocated -= 1,
            }
        }
    }
}

/// A block's key: its parent's key, its tokens and the model's salt.
fn chain_hash(salt: u64, parent: Option<u64>, tokens: &[u32]) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    salt.hash(&mut h);
    parent.hash(&mut h);
    tokens.hash(&mut h);
    h.finish()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    const BT: usize = 4;

    fn config() -> Config {
        Config {
            hidden: 4,
            layers: 2,
            heads: 1,
            kv_heads: 1,
            head_dim: 2,
            ffn: 4,
            vocab: 100,
            rms_eps: 1e-5,
            rope_theta: 10_000.0,
            rope_neox: false,
            context: 1024,
            sliding_window: None,
        }
    }

    fn pool(budget_blocks: usize) -> KvPool {
        KvPool::new(config(), BT, budget_blocks, true, "model A")
    }

    /// A sequence as the worker keeps one.
    struct Seq {
        cache: SeqCache,
        chain: Vec<Link>,
        tokens: Vec<u32>,
        cached: usize,
    }

    /// Admits `prompt` and feeds all of it (as if computed).
    fn run(pool: &mut KvPool, prompt: &[u32]) -> Seq {
        let found = pool.lookup(prompt);
        let mut s = Seq {
            cache: pool.new_cache(),
            chain: Vec::new(),
            tokens: prompt.to_vec(),
            cached: 0,
        };
        s.cached = pool.acquire(found, &mut s.cache, &mut s.chain);
        let rest = prompt.len() - s.cached;
        pool.reserve(&mut s.cache, rest);
        s.cache.advance_unwritten(rest);
        pool.register(&mut s.cache, &mut s.chain, &s.tokens);
        s
    }

    /// Feeds one generated token.
    fn decode(pool: &mut KvPool, s: &mut Seq, token: u32) {
        s.tokens.push(token);
        pool.reserve(&mut s.cache, 1);
        s.cache.advance_unwritten(1);
        pool.register(&mut s.cache, &mut s.chain, &s.tokens);
    }

    fn release(pool: &mut KvPool, mut s: Seq) {
        pool.release(&mut s.cache, &mut s.chain);
    }

    fn prompt(first: u32, len: usize) -> Vec<u32> {
        (first..first + len as u32).collect()
    }

    #[test]
    fn a_prompt_shares_the_whole_cached_blocks_it_starts_with_but_its_last_token() {
        let mut p = pool(64);
        let a = run(&mut p, &prompt(0, 10));
        assert_eq!(a.cached, 0);
        assert_eq!(a.chain.len(), 2, "two full blocks registered");
        // The same prompt: 9 tokens may come from the cache, so 2 blocks.
        let b = run(&mut p, &prompt(0, 10));
        assert_eq!(b.cached, 8);
        assert!(Arc::ptr_eq(&a.cache.blocks()[1], &b.cache.blocks()[1]));
        assert!(!Arc::ptr_eq(&a.cache.blocks()[2], &b.cache.blocks()[2]));
        // A prompt of exactly two blocks computes its second again.
        assert_eq!(run(&mut p, &prompt(0, 8)).cached, 4);
        // Same tokens after a different first block: no hit past it.
        let mut other = prompt(0, 10);
        other[1] = 99;
        assert_eq!(run(&mut p, &other).cached, 0);
        // Another model's blocks have other keys.
        let q = KvPool::new(config(), BT, 64, true, "model B");
        let salt = |p: &KvPool| p.prefix.as_ref().unwrap().salt;
        assert_ne!(
            chain_hash(salt(&p), None, &prompt(0, 4)),
            chain_hash(salt(&q), None, &prompt(0, 4))
        );
    }

    #[test]
    fn generated_tokens_fill_blocks_that_a_continuation_finds() {
        let mut p = pool(64);
        let mut a = run(&mut p, &prompt(0, 6));
        for t in 50..56 {
            decode(&mut p, &mut a, t);
        }
        assert_eq!(a.chain.len(), 3);
        let continued = a.tokens.clone();
        release(&mut p, a);
        let b = run(&mut p, &continued);
        assert_eq!(b.cached, 8, "11 of 12 tokens may hit: two whole blocks");
        let mut longer = continued.clone();
        longer.push(7);
        assert_eq!(run(&mut p, &longer).cached, 12);
    }

    #[test]
    fn a_colliding_entry_is_a_miss_not_a_wrong_answer() {
        let mut p = pool(64);
        let a = run(&mut p, &prompt(0, 9));
        release(&mut p, a);
        // Make the second block's entry claim other tokens under the same
        // hash, as a collision would.
        let px = p.prefix.as_mut().unwrap();
        let second = px.entries.values_mut().find(|e| e.depth == 1).unwrap();
        second.tokens[0] = 1234;
        assert_eq!(p.lookup(&prompt(0, 9)).links.len(), 1);
        // And a first block whose parent is not the one asked for.
        let px = p.prefix.as_mut().unwrap();
        let second = px.entries.values_mut().find(|e| e.depth == 1).unwrap();
        second.tokens[0] = 4;
        second.parent = Some(777);
        assert_eq!(p.lookup(&prompt(0, 9)).links.len(), 1);
        // A colliding entry stops registration rather than joining chains.
        let s = run(&mut p, &prompt(0, 9));
        assert_eq!((s.cached, s.chain.len()), (4, 1));
    }

    #[test]
    fn concurrent_sequences_computing_the_same_block_end_up_sharing_one() {
        let mut p = pool(64);
        // Both admitted before either registered.
        let mut a = Seq {
            cache: p.new_cache(),
            chain: Vec::new(),
            tokens: prompt(0, 9),
            cached: 0,
        };
        let mut b = Seq {
            cache: p.new_cache(),
            chain: Vec::new(),
            tokens: prompt(0, 9),
            cached: 0,
        };
        for s in [&mut a, &mut b] {
            p.reserve(&mut s.cache, 9);
            s.cache.advance_unwritten(9);
        }
        assert_eq!(p.counts().allocated_blocks, 6);
        p.register(&mut a.cache, &mut a.chain, &a.tokens);
        p.register(&mut b.cache, &mut b.chain, &b.tokens);
        assert_eq!(a.chain, b.chain);
        for i in 0..2 {
            assert!(Arc::ptr_eq(&a.cache.blocks()[i], &b.cache.blocks()[i]));
        }
        // b's two copies are spare memory now.
        assert_eq!(p.spare.len(), 2);
        assert_eq!(p.counts().cached_blocks, 2);
    }

    #[test]
    fn idle_blocks_are_evicted_least_recently_used_deepest_first_never_running_ones() {
        // Room for three prompts of two blocks.
        let mut p = pool(6);
        let a = run(&mut p, &prompt(0, 9)); // 3 blocks, 2 cached
        let b = run(&mut p, &prompt(100, 9)); // 3 blocks, 2 cached
        assert_eq!(p.counts().allocated_blocks, 6);
        release(&mut p, a);
        release(&mut p, b);
        let c = p.counts();
        assert_eq!(
            (c.allocated_blocks, c.cached_blocks, c.idle_blocks),
            (6, 4, 4)
        );
        assert_eq!(p.spare.len(), 2, "the partial blocks");
        // Needs 3 blocks: 2 spare, then evicts a's deepest (released first).
        let d = run(&mut p, &prompt(200, 9));
        assert_eq!(p.counts().evictions, 1);
        assert_eq!(
            p.lookup(&prompt(0, 9)).links.len(),
            1,
            "a's first block stays"
        );
        assert_eq!(p.lookup(&prompt(100, 9)).links.len(), 2, "b untouched");
        // Touching b makes a the least recent: a's first block goes next.
        let b2 = run(&mut p, &prompt(100, 9));
        assert_eq!(b2.cached, 8);
        assert_eq!(p.counts().evictions, 2);
        assert_eq!(p.lookup(&prompt(0, 9)).links.len(), 0);
        // Nothing idle: the pool grows past its budget rather than evict
        // what runs, and shrinks back once it is released.
        let e = run(&mut p, &prompt(300, 9));
        assert!(p.counts().allocated_blocks > 6);
        for s in [b2, d, e] {
            release(&mut p, s);
        }
        assert!(p.counts().allocated_blocks <= 6);
    }

    #[test]
    fn blocks_needed_counts_only_what_running_sequences_do_not_hold() {
        let mut p = pool(64);
        let a = run(&mut p, &prompt(0, 9));
        // Shares a's two running blocks: one new block.
        let found = p.lookup(&prompt(0, 10));
        assert_eq!(p.blocks_needed(&found, 10), 1);
        release(&mut p, a);
        // Idle cached blocks come back into use: they count.
        let found = p.lookup(&prompt(0, 10));
        assert_eq!(p.blocks_needed(&found, 10), 3);
    }

    #[test]
    fn without_prefix_caching_nothing_is_shared_and_memory_is_reused() {
        let mut p = KvPool::new(config(), BT, 64, false, "model A");
        let a = run(&mut p, &prompt(0, 9));
        release(&mut p, a);
        let b = run(&mut p, &prompt(0, 9));
        assert_eq!((b.cached, b.chain.len()), (0, 0));
        assert_eq!(p.counts().allocated_blocks, 3, "the same memory again");
        assert_eq!(p.counts().cached_blocks, 0);
    }
}
