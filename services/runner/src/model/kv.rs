//! Paged KV caches: a sequence's keys and values live in fixed-size
//! blocks of positions ([`KvBlock`]), each holding every layer's rows for
//! its positions. A sequence holds its blocks by `Arc`: full blocks may be
//! shared with other sequences and with the engine's prefix cache, and
//! are never written again; the model writes only into blocks the
//! sequence holds alone (its partial last block always is).

use std::sync::Arc;

use super::{Config, ModelError};

/// The keys and values of `block_tokens` positions, every layer's
/// (`[layer][kv_head][position in the block][head_dim]`, the same for
/// values): one head's keys of a block are contiguous, which attention
/// reads markedly faster than rows of every head.
#[derive(Clone)]
pub struct KvBlock {
    k: Vec<f32>,
    v: Vec<f32>,
}

impl std::fmt::Debug for KvBlock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvBlock")
            .field("floats", &self.k.len())
            .finish()
    }
}

impl KvBlock {
    /// A zeroed block of `block_tokens` positions for `config`'s model.
    pub fn new(config: &Config, block_tokens: usize) -> Self {
        let n = config.layers * block_tokens * config.kv_dim();
        Self {
            k: vec![0.0; n],
            v: vec![0.0; n],
        }
    }

    /// Bytes of keys and values one position takes in `config`'s model.
    pub fn bytes_per_token(config: &Config) -> usize {
        2 * config.layers * config.kv_dim() * std::mem::size_of::<f32>()
    }

    fn floats(&self) -> usize {
        self.k.len()
    }

    /// Layer `layer`'s keys and values (`block_tokens × kv_dim` each).
    fn layer(&self, layer: usize, per_layer: usize) -> (&[f32], &[f32]) {
        let r = layer * per_layer..(layer + 1) * per_layer;
        (&self.k[r.clone()], &self.v[r])
    }

    fn layer_mut(&mut self, layer: usize, per_layer: usize) -> (&mut [f32], &mut [f32]) {
        let r = layer * per_layer..(layer + 1) * per_layer;
        (&mut self.k[r.clone()], &mut self.v[r])
    }
}

/// The keys and values one sequence has seen: its blocks, in position
/// order, and how many positions they hold.
#[derive(Debug)]
pub struct SeqCache {
    blocks: Vec<Arc<KvBlock>>,
    len: usize,
    block_tokens: usize,
}

impl Default for SeqCache {
    fn default() -> Self {
        Self::new(DEFAULT_BLOCK_TOKENS)
    }
}

/// Positions per block unless the engine is told otherwise.
pub const DEFAULT_BLOCK_TOKENS: usize = 16;

impl SeqCache {
    /// An empty cache with blocks of `block_tokens` positions (at least 1).
    pub fn new(block_tokens: usize) -> Self {
        Self {
            blocks: Vec::new(),
            len: 0,
            block_tokens: block_tokens.max(1),
        }
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn block_tokens(&self) -> usize {
        self.block_tokens
    }
    /// The blocks, in position order; the last may be partly filled or
    /// not yet used.
    pub fn blocks(&self) -> &[Arc<KvBlock>] {
        &self.blocks
    }
    /// Positions the blocks held can take.
    pub fn room(&self) -> usize {
        self.blocks.len() * self.block_tokens
    }
    /// Appends a full block of another sequence's (or the prefix cache's):
    /// its positions count as filled. Only onto a cache that fills whole
    /// blocks and holds no spare one.
    pub fn push_full(&mut self, block: Arc<KvBlock>) -> Result<(), ModelError> {
        if self.len != self.room() {
            return Err(ModelError::Shape(
                "a shared block after a partly filled one".into(),
            ));
        }
        self.blocks.push(block);
        self.len += self.block_tokens;
        Ok(())
    }
    /// Appends an empty block for the sequence's next positions.
    pub fn push_empty(&mut self, block: KvBlock) {
        self.blocks.push(Arc::new(block));
    }
    /// Puts `block` in place of block `index`: the same positions' keys
    /// and values, held elsewhere too (a duplicate the prefix cache
    /// already has).
    pub fn replace(&mut self, index: usize, block: Arc<KvBlock>) -> Arc<KvBlock> {
        std::mem::replace(&mut self.blocks[index], block)
    }
    /// Empties the cache, handing back its blocks.
    pub fn take_blocks(&mut self) -> Vec<Arc<KvBlock>> {
        self.len = 0;
        std::mem::take(&mut self.blocks)
    }

    /// Adds fresh blocks until `tokens` more positions fit.
    pub(super) fn make_room(&mut self, config: &Config, tokens: usize) {
        while self.room() < self.len + tokens {
            self.push_empty(KvBlock::new(config, self.block_tokens));
        }
    }

    /// Fails on a block of another shape than `config`'s.
    pub(super) fn check(&self, config: &Config) -> Result<(), ModelError> {
        let floats = config.layers * self.block_tokens * config.kv_dim();
        if self.blocks.iter().any(|b| b.floats() != floats) {
            return Err(ModelError::Shape(format!(
                "a KV block does not hold {} positions of this model",
                self.block_tokens
            )));
        }
        Ok(())
    }

    /// Writes layer `layer`'s key and value (`[kv_head][head_dim]`) of
    /// position `pos`. The block must be this sequence's alone.
    pub(super) fn write(
        &mut self,
        layer: usize,
        head_dim: usize,
        pos: usize,
        key: &[f32],
        value: &[f32],
    ) -> Result<(), ModelError> {
        let bt = self.block_tokens;
        let block = Arc::get_mut(&mut self.blocks[pos / bt])
            .ok_or_else(|| ModelError::Shape(format!("position {pos} is in a shared KV block")))?;
        let (k, v) = block.layer_mut(layer, bt * key.len());
        let row = pos % bt;
        for (h, (key, value)) in key
            .chunks_exact(head_dim)
            .zip(value.chunks_exact(head_dim))
            .enumerate()
        {
            let at = (h * bt + row) * head_dim..(h * bt + row + 1) * head_dim;
            k[at.clone()].copy_from_slice(key);
            v[at].copy_from_slice(value);
        }
        Ok(())
    }

    /// Layer `layer`'s key and value slices of the blocks that hold the
    /// first `positions` positions.
    pub(super) fn layer_blocks(
        &self,
        layer: usize,
        kv_dim: usize,
        positions: usize,
    ) -> (Vec<&[f32]>, Vec<&[f32]>) {
        let per_layer = self.block_tokens * kv_dim;
        self.blocks[..positions.div_ceil(self.block_tokens)]
            .iter()
            .map(|b| b.layer(layer, per_layer))
            .unzip()
    }

    pub(super) fn advance(&mut self, tokens: usize) {
        self.len += tokens;
    }

    /// Counts `tokens` more positions as filled without computing them:
    /// the pool's tests move sequences along without a model.
    #[cfg(test)]
    pub(crate) fn advance_unwritten(&mut self, tokens: usize) {
        assert!(self.len + tokens <= self.room());
        self.len += tokens;
    }
}
