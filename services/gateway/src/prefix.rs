//! Which prompt prefixes each replica is predicted to hold in its prefix
//! cache, from the gateway's own routing history: no tokenizer, nothing
//! from the replicas.
//!
//! A request's prompt is rendered canonically ([`PromptHashes::of`]): a
//! chat's messages in order, each its role and content between separators
//! that cannot occur in text; a completion's `prompt`. The rendering is
//! cut into blocks of [`BLOCK_BYTES`] and hashed as a chain,
//! `h_i = xxh3(chunk_i, seed = h_{i-1})`, the first seed made from the
//! model and the kind of request, so a block's hash stands for the whole
//! prefix up to its end and two models never share one. A trailing partial
//! block is not a block: the runner reuses whole cached blocks too.
//!
//! [`PrefixIndex`] is the prediction: for each replica, the block hashes
//! of the prompts last routed there, least recently used dropped first
//! once the replica's assumed cache is full. Recording a chain touches its
//! blocks last to first, so a prefix is always at least as recent as what
//! follows it: eviction takes chains from their tails and the predicted
//! set stays closed under prefixes, as the runner's own cache is.
//!
//! Pure: no I/O, no clock.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::io;

use serde_json::Value;
use xxhash_rust::xxh3::xxh3_64_with_seed;

/// Bytes of canonical prompt text per block. 240 bytes are about 60
/// tokens of English: coarse enough that a 100K-token prompt is some
/// 1,700 hashes and index entries (hashing and lookups stay well below a
/// millisecond), fine enough that a shared system prompt of a few hundred
/// tokens already spans several blocks. 240 is xxh3's largest input
/// hashed with the seed as it is: above it, every seeded call derives a
/// fresh secret, which made 256-byte blocks three times slower to chain.
/// The runner's own cache blocks are smaller; the prediction only needs
/// to say where the bulk of a prefix lives.
pub const BLOCK_BYTES: usize = 240;

/// The assumed bytes of prompt text per token, to turn a cache size in
/// tokens into blocks: about 4 for English with BPE tokenizers (and
/// exactly 4 for prompts sent as token ids, which are rendered 4 bytes an
/// id).
pub const BYTES_PER_TOKEN: usize = 4;

/// Seeds of the first block, by kind of request: a chat's rendered
/// messages and a raw completion prompt are different token sequences on
/// the replica even when their text agrees.
const CHAT: u64 = 0x6368_6174_2d76_3100;
const COMPLETION: u64 = 0x636d_706c_2d76_3100;

// Separators: bytes that never occur in UTF-8, so no text can imitate one.
/// Ends a message's role (and name).
const ROLE_END: u8 = 0xFF;
/// Ends a message, or one prompt of a batch.
const MESSAGE_END: u8 = 0xFE;
/// Between the parts of an array content.
const PART: u8 = 0xFD;
/// Before something rendered as JSON (a non-text part, tool calls, tools).
const JSON: u8 = 0xFC;
/// Between a message's role and its name.
const NAME: u8 = 0xFB;
/// Starts a prompt given as token ids, 4 bytes (little-endian) an id,
/// ended by [`TOKENS_END`] within a batch.
const TOKENS: u8 = 0xF9;
/// Ends a prompt of token ids in a batch; not a token id anyone uses.
const TOKENS_END: u32 = u32::MAX;

/// The chain of block hashes of one request's prompt, computed once.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PromptHashes {
    blocks: Vec<u64>,
    bytes: usize,
}

impl PromptHashes {
    /// The block hashes of the prompt of an OpenAI `request` to `path`
    /// (`/v1/chat/completions` or `/v1/completions`) for `model`. None
    /// (an empty chain) for any other path or a request without a prompt
    /// to speak of: such a request is routed by load alone.
    pub fn of(model: &str, path: &str, request: &Value) -> Self {
        if path.ends_with("/chat/completions") {
            let mut chain = Chain::new(model, CHAT);
            chat(&mut chain, request);
            chain.finish()
        } else if path.ends_with("/completions") {
            let mut chain = Chain::new(model, COMPLETION);
            if let Some(prompt) = request.get("prompt") {
                completion(&mut chain, prompt);
            }
            chain.finish()
        } else {
            Self::default()
        }
    }

    /// The hashes of the prompt's whole blocks, first block first.
    pub fn blocks(&self) -> &[u64] {
        &self.blocks
    }

    /// How many whole blocks the prompt has.
    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    /// Bytes of canonical prompt text, the partial last block included.
    pub fn prompt_bytes(&self) -> usize {
        self.bytes
    }
}

/// A chat's canonical text: its tools (which templates render ahead of
/// the messages), then each message.
fn chat(chain: &mut Chain, request: &Value) {
    if let Some(tools) = request.get("tools").filter(|t| !t.is_null()) {
        chain.push(&[JSON]);
        chain.json(tools);
        chain.push(&[MESSAGE_END]);
    }
    let Some(messages) = request.get("messages").and_then(Value::as_array) else {
        return;
    };
    for message in messages {
        match message.get("role") {
            Some(Value::String(role)) => chain.push(role.as_bytes()),
            Some(other) => chain.json(other),
            None => {}
        }
        if let Some(Value::String(name)) = message.get("name") {
            chain.push(&[NAME]);
            chain.push(name.as_bytes());
        }
        chain.push(&[ROLE_END]);
        match message.get("content") {
            Some(Value::String(text)) => chain.push(text.as_bytes()),
            Some(Value::Array(parts)) => {
                for (i, part) in parts.iter().enumerate() {
                    if i > 0 {
                        chain.push(&[PART]);
                    }
                    match part.get("text") {
                        Some(Value::String(text)) => chain.push(text.as_bytes()),
                        _ => {
                            chain.push(&[JSON]);
                            chain.json(part);
                        }
                    }
                }
            }
            None | Some(Value::Null) => {}
            Some(other) => {
                chain.push(&[JSON]);
                chain.json(other);
            }
        }
        if let Some(calls) = message.get("tool_calls").filter(|c| !c.is_null()) {
            chain.push(&[JSON]);
            chain.json(calls);
        }
        chain.push(&[MESSAGE_END]);
    }
}

/// A completion's canonical text: a string as it is; token ids 4 bytes
/// each after a marker; a batch each prompt in turn, ended.
fn completion(chain: &mut Chain, prompt: &Value) {
    match prompt {
        Value::String(text) => chain.push(text.as_bytes()),
        Value::Array(items) if items.iter().all(Value::is_number) => tokens(chain, items),
        Value::Array(batch) => {
            for item in batch {
                match item {
                    Value::String(text) => chain.push(text.as_bytes()),
                    Value::Array(ids) => {
                        tokens(chain, ids);
                        chain.push(&TOKENS_END.to_le_bytes());
                    }
                    other => {
                        chain.push(&[JSON]);
                        chain.json(other);
                    }
                }
                chain.push(&[MESSAGE_END]);
            }
        }
        other => {
            chain.push(&[JSON]);
            chain.json(other);
        }
    }
}

fn tokens(chain: &mut Chain, ids: &[Value]) {
    chain.push(&[TOKENS]);
    for id in ids {
        // Ids a replica would refuse anyway share one stand-in.
        let id = id
            .as_u64()
            .and_then(|id| u32::try_from(id).ok())
            .filter(|&id| id != TOKENS_END)
            .unwrap_or(TOKENS_END - 1);
        chain.push(&id.to_le_bytes());
    }
}

/// Cuts a stream of canonical text into blocks and hashes each as it
/// fills: the text is never assembled, and each byte is hashed once.
struct Chain {
    previous: u64,
    partial: [u8; BLOCK_BYTES],
    filled: usize,
    blocks: Vec<u64>,
    bytes: usize,
}

impl Chain {
    fn new(model: &str, kind: u64) -> Self {
        Self {
            previous: xxh3_64_with_seed(model.as_bytes(), kind),
            partial: [0; BLOCK_BYTES],
            filled: 0,
            blocks: Vec::new(),
            bytes: 0,
        }
    }

    fn block(&mut self, chunk: &[u8]) {
        self.previous = xxh3_64_with_seed(chunk, self.previous);
        self.blocks.push(self.previous);
    }

    fn push(&mut self, mut data: &[u8]) {
        self.bytes += data.len();
        if self.filled > 0 {
            let take = (BLOCK_BYTES - self.filled).min(data.len());
            self.partial[self.filled..self.filled + take].copy_from_slice(&data[..take]);
            self.filled += take;
            data = &data[take..];
            if self.filled < BLOCK_BYTES {
                return;
            }
            let full = self.partial;
            self.block(&full);
            self.filled = 0;
        }
        let mut whole = data.chunks_exact(BLOCK_BYTES);
        for chunk in &mut whole {
            self.block(chunk);
        }
        let rest = whole.remainder();
        self.partial[..rest.len()].copy_from_slice(rest);
        self.filled = rest.len();
    }

    /// Renders `value` as compact JSON straight into the chain.
    fn json(&mut self, value: &Value) {
        // Writing into a Chain cannot fail, nor can serialising a Value.
        let _ = serde_json::to_writer(&mut *self, value);
    }

    fn finish(self) -> PromptHashes {
        PromptHashes {
            blocks: self.blocks,
            bytes: self.bytes,
        }
    }
}

impl io::Write for Chain {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.push(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Block hashes are already uniform: the map uses them as they are.
#[derive(Default)]
struct BlockHasher(u64);

impl Hasher for BlockHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

type BlockMap = HashMap<u64, u32, BuildHasherDefault<BlockHasher>>;

/// "No slot": the end of the recency list.
const NIL: u32 = u32::MAX;

#[derive(Debug, Clone, Copy)]
struct Slot {
    hash: u64,
    /// Towards the most recent.
    newer: u32,
    /// Towards the least recent.
    older: u32,
}

/// One replica's predicted blocks: a map from hash to slot and an
/// intrusive recency list over a slab of slots that never grows past the
/// capacity, so a full replica reuses its least recent slot.
struct Resident {
    at: BlockMap,
    slots: Vec<Slot>,
    newest: u32,
    oldest: u32,
}

impl Default for Resident {
    fn default() -> Self {
        Self {
            at: BlockMap::default(),
            slots: Vec::new(),
            newest: NIL,
            oldest: NIL,
        }
    }
}

impl Resident {
    fn unlink(&mut self, i: u32) {
        let Slot { newer, older, .. } = self.slots[i as usize];
        match newer {
            NIL => self.newest = older,
            n => self.slots[n as usize].older = older,
        }
        match older {
            NIL => self.oldest = newer,
            o => self.slots[o as usize].newer = newer,
        }
    }

    fn link_newest(&mut self, i: u32) {
        self.slots[i as usize].newer = NIL;
        self.slots[i as usize].older = self.newest;
        match self.newest {
            NIL => self.oldest = i,
            n => self.slots[n as usize].newer = i,
        }
        self.newest = i;
    }

    /// Makes `hash` the most recent block, evicting the least recent one
    /// when `capacity` blocks are held already.
    fn touch(&mut self, hash: u64, capacity: usize) {
        if let Some(&i) = self.at.get(&hash) {
            if self.newest != i {
                self.unlink(i);
                self.link_newest(i);
            }
            return;
        }
        let i = if self.slots.len() < capacity {
            self.slots.push(Slot {
                hash,
                newer: NIL,
                older: NIL,
            });
            // Capacity is at most u32::MAX - 1 blocks (PrefixIndex::new).
            u32::try_from(self.slots.len() - 1).unwrap_or(NIL - 1)
        } else {
            let i = self.oldest;
            self.unlink(i);
            self.at.remove(&self.slots[i as usize].hash);
            self.slots[i as usize].hash = hash;
            i
        };
        self.at.insert(hash, i);
        self.link_newest(i);
    }

    fn matched(&self, hashes: &[u64]) -> usize {
        match hashes.first() {
            // The usual answer of a replica that never saw the prompt.
            Some(first) if self.at.contains_key(first) => {}
            _ => return 0,
        }
        // The held blocks are closed under prefixes (module doc): a chain
        // is held up to some block and not after it, so its first miss is
        // found by bisection, in a dozen lookups however long the prompt.
        hashes.partition_point(|h| self.at.contains_key(h))
    }

    /// [`Self::matched`] block by block, as the bisection must find it.
    #[cfg(test)]
    fn matched_linearly(&self, hashes: &[u64]) -> usize {
        hashes
            .iter()
            .take_while(|h| self.at.contains_key(h))
            .count()
    }
}

/// Which blocks each replica is predicted to hold (see the module doc).
/// Replicas are named by id; memory is at most the capacity's worth of
/// blocks (a few tens of bytes each) per replica recorded.
pub struct PrefixIndex {
    capacity_blocks: usize,
    replicas: HashMap<String, Resident>,
}

impl std::fmt::Debug for PrefixIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrefixIndex")
            .field("capacity_blocks", &self.capacity_blocks)
            .field("replicas", &self.replicas.len())
            .finish()
    }
}

impl PrefixIndex {
    /// An empty index assuming each replica caches `capacity_tokens`
    /// tokens of prompt (at [`BYTES_PER_TOKEN`]).
    pub fn new(capacity_tokens: usize) -> Self {
        let capacity_blocks = capacity_tokens.saturating_mul(BYTES_PER_TOKEN) / BLOCK_BYTES;
        Self {
            capacity_blocks: capacity_blocks.min(NIL as usize - 1),
            replicas: HashMap::new(),
        }
    }

    /// Blocks a replica is assumed to hold at most.
    pub fn capacity_blocks(&self) -> usize {
        self.capacity_blocks
    }

    /// How many leading blocks of `hashes` (a chain from
    /// [`PromptHashes::blocks`]) `replica` is predicted to hold: the
    /// longest prefix, up to the first block it lacks. No allocation; one
    /// lookup for a replica without the first block, about log2(blocks)
    /// otherwise.
    pub fn matched(&self, replica: &str, hashes: &[u64]) -> usize {
        self.replicas
            .get(replica)
            .map_or(0, |resident| resident.matched(hashes))
    }

    /// A prompt with `hashes` was served by `replica`: it now holds them,
    /// up to its capacity (a prompt longer than the cache keeps its
    /// head, the part other prompts can share).
    pub fn record(&mut self, replica: &str, hashes: &[u64]) {
        let kept = &hashes[..hashes.len().min(self.capacity_blocks)];
        if kept.is_empty() {
            return;
        }
        let resident = match self.replicas.get_mut(replica) {
            Some(resident) => resident,
            None => self.replicas.entry(replica.to_string()).or_default(),
        };
        for &hash in kept.iter().rev() {
            resident.touch(hash, self.capacity_blocks);
        }
    }

    /// `replica`'s cache is gone (it restarted, moved or left).
    pub fn forget(&mut self, replica: &str) {
        self.replicas.remove(replica);
    }

    /// Blocks `replica` is predicted to hold.
    pub fn blocks(&self, replica: &str) -> usize {
        self.replicas.get(replica).map_or(0, |r| r.at.len())
    }

    /// The replicas with predicted blocks.
    pub fn replicas(&self) -> impl Iterator<Item = &str> {
        self.replicas.keys().map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const CHAT_PATH: &str = "/v1/chat/completions";
    const COMPLETIONS_PATH: &str = "/v1/completions";

    fn text(bytes: usize, seed: u8) -> String {
        (0..bytes)
            .map(|i| char::from(b'a' + ((i as u8).wrapping_mul(7) ^ seed) % 26))
            .collect()
    }

    fn chat_of(messages: &[(&str, &str)]) -> Value {
        let messages: Vec<Value> = messages
            .iter()
            .map(|(role, content)| json!({"role": role, "content": content}))
            .collect();
        json!({"model": "m", "messages": messages})
    }

    fn hashes(path: &str, request: &Value) -> PromptHashes {
        PromptHashes::of("m", path, request)
    }

    #[test]
    fn prompts_sharing_a_prefix_share_its_whole_blocks_and_no_more() {
        let shared = text(BLOCK_BYTES * 3 + 10, 1);
        let a = hashes(
            COMPLETIONS_PATH,
            &json!({"prompt": format!("{shared}{}", text(600, 2))}),
        );
        let b = hashes(
            COMPLETIONS_PATH,
            &json!({"prompt": format!("{shared}{}", text(600, 3))}),
        );
        assert_eq!(a.len(), (BLOCK_BYTES * 3 + 610) / BLOCK_BYTES);
        let common = a
            .blocks()
            .iter()
            .zip(b.blocks())
            .take_while(|(x, y)| x == y)
            .count();
        assert_eq!(common, 3, "the fourth block differs after 10 shared bytes");
        // A chain: equal later blocks are not equal hashes once an earlier
        // block differs.
        let tail = text(BLOCK_BYTES * 2, 9);
        let c = hashes(
            COMPLETIONS_PATH,
            &json!({"prompt": format!("{}{tail}", text(BLOCK_BYTES, 4))}),
        );
        let d = hashes(
            COMPLETIONS_PATH,
            &json!({"prompt": format!("{}{tail}", text(BLOCK_BYTES, 5))}),
        );
        assert!(c.blocks().iter().zip(d.blocks()).all(|(x, y)| x != y));
    }

    #[test]
    fn a_trailing_partial_block_is_not_a_block() {
        let cases = [
            (0, 0),
            (BLOCK_BYTES - 1, 0),
            (BLOCK_BYTES, 1),
            (BLOCK_BYTES * 2 - 1, 1),
            (256, 1),
            (BLOCK_BYTES * 2, 2),
        ];
        for (bytes, blocks) in cases {
            let h = hashes(COMPLETIONS_PATH, &json!({"prompt": text(bytes, 0)}));
            assert_eq!(h.len(), blocks, "{bytes} bytes");
            assert_eq!(h.prompt_bytes(), bytes);
        }
    }

    #[test]
    fn text_pushed_in_pieces_hashes_as_text_pushed_whole() {
        let whole = text(BLOCK_BYTES * 5 + 17, 6);
        let expected = {
            let mut chain = Chain::new("m", COMPLETION);
            chain.push(whole.as_bytes());
            chain.finish()
        };
        assert_eq!(expected.len(), 5);
        for piece in [1, 7, 239, 240, 241, 1000] {
            let mut chain = Chain::new("m", COMPLETION);
            for chunk in whole.as_bytes().chunks(piece) {
                chain.push(chunk);
            }
            assert_eq!(chain.finish(), expected, "pieces of {piece} bytes");
        }
    }

    #[test]
    fn separators_keep_different_requests_apart() {
        let long = text(BLOCK_BYTES * 2, 0);
        let differ = |a: &PromptHashes, b: &PromptHashes, what: &str| {
            assert!(!a.is_empty() && !b.is_empty(), "{what}: empty");
            assert_ne!(a.blocks()[0], b.blocks()[0], "{what}");
        };
        // Where the role ends and the content starts.
        differ(
            &hashes(CHAT_PATH, &chat_of(&[("user", &format!("x{long}"))])),
            &hashes(CHAT_PATH, &chat_of(&[("userx", &long)])),
            "role and content",
        );
        // Where one message ends and the next begins.
        let (a, b) = long.split_at(100);
        let (c, d) = long.split_at(101);
        differ(
            &hashes(CHAT_PATH, &chat_of(&[("user", a), ("user", b)])),
            &hashes(CHAT_PATH, &chat_of(&[("user", c), ("user", d)])),
            "message boundary",
        );
        // Models never share blocks.
        let request = chat_of(&[("user", &long)]);
        differ(
            &PromptHashes::of("m", CHAT_PATH, &request),
            &PromptHashes::of("n", CHAT_PATH, &request),
            "model",
        );
        // A chat and a completion of the same text are different prompts.
        differ(
            &hashes(CHAT_PATH, &request),
            &hashes(COMPLETIONS_PATH, &json!({"prompt": long})),
            "kind",
        );
        // Text parts are text; a part that is not is not confused with it.
        let parts = json!({"messages": [{"role": "user", "content": [
            {"type": "text", "text": long},
        ]}]});
        assert_eq!(hashes(CHAT_PATH, &parts), hashes(CHAT_PATH, &request));
        let image = json!({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": long}},
        ]}]});
        differ(
            &hashes(CHAT_PATH, &image),
            &hashes(CHAT_PATH, &request),
            "image part",
        );
        // Token ids, a batch of strings, one string.
        let ids: Vec<u32> = (0..200).collect();
        let as_ids = hashes(COMPLETIONS_PATH, &json!({"prompt": ids}));
        assert_eq!(as_ids.len(), 200 * 4 / BLOCK_BYTES);
        differ(
            &hashes(COMPLETIONS_PATH, &json!({"prompt": [a, b]})),
            &hashes(COMPLETIONS_PATH, &json!({"prompt": [c, d]})),
            "batch boundary",
        );
    }

    #[test]
    fn a_chat_that_goes_on_shares_the_blocks_of_its_earlier_turns() {
        let system = text(BLOCK_BYTES * 4, 1);
        let first = chat_of(&[("system", &system), ("user", "What is it?")]);
        let later = chat_of(&[
            ("system", &system),
            ("user", "What is it?"),
            ("assistant", &text(300, 2)),
            ("user", "And then?"),
        ]);
        let (a, b) = (hashes(CHAT_PATH, &first), hashes(CHAT_PATH, &later));
        assert!(b.len() > a.len());
        assert_eq!(a.blocks(), &b.blocks()[..a.len()]);
    }

    #[test]
    fn requests_without_a_prompt_have_no_blocks() {
        for (path, request) in [
            (CHAT_PATH, json!({"model": "m"})),
            (CHAT_PATH, json!({"messages": "nonsense"})),
            (COMPLETIONS_PATH, json!({"model": "m"})),
            ("/v1/embeddings", json!({"input": text(2000, 0)})),
        ] {
            assert!(hashes(path, &request).is_empty(), "{path} {request}");
        }
    }

    fn chain(n: usize, seed: u8) -> Vec<u64> {
        hashes(
            COMPLETIONS_PATH,
            &json!({"prompt": text(n * BLOCK_BYTES, seed)}),
        )
        .blocks()
        .to_vec()
    }

    /// An index holding `blocks` blocks per replica.
    fn index(blocks: usize) -> PrefixIndex {
        PrefixIndex::new(blocks * BLOCK_BYTES / BYTES_PER_TOKEN)
    }

    #[test]
    fn a_replica_holds_what_was_routed_to_it_and_matches_the_longest_prefix() {
        let mut index = index(100);
        let a = chain(10, 1);
        assert_eq!(index.matched("r1", &a), 0);
        index.record("r1", &a[..6]);
        assert_eq!(index.matched("r1", &a), 6, "the recorded prefix");
        assert_eq!(index.matched("r2", &a), 0, "another replica");
        assert_eq!(index.matched("r1", &chain(10, 2)), 0, "another prompt");
        assert_eq!(index.matched("r1", &a[..3]), 3, "a shorter prompt");
        assert_eq!(index.matched("r1", &[]), 0);
        assert_eq!(index.blocks("r1"), 6);
        index.forget("r1");
        assert_eq!(index.matched("r1", &a), 0);
        assert_eq!(index.blocks("r1"), 0);
    }

    #[test]
    fn a_full_replica_drops_its_least_recent_chains_from_their_tails() {
        let mut index = index(8);
        let (a, b, c) = (chain(4, 1), chain(4, 2), chain(3, 3));
        index.record("r", &a);
        index.record("r", &b);
        assert_eq!(index.blocks("r"), 8);
        // Using a again makes b the least recent.
        assert_eq!(index.matched("r", &a), 4);
        index.record("r", &a);
        index.record("r", &c);
        assert_eq!(index.blocks("r"), 8, "never more than the capacity");
        assert_eq!(index.matched("r", &a), 4);
        assert_eq!(index.matched("r", &c), 3);
        // b lost its last three blocks, its head survives: still a prefix.
        assert_eq!(index.matched("r", &b), 1);
        // Touching a prefix refreshes it ahead of the rest of its chain:
        // the next eviction takes b's head, then a's tail.
        index.record("r", &a[..1]);
        index.record("r", &chain(2, 4));
        assert_eq!(index.matched("r", &b), 0);
        assert_eq!(index.matched("r", &a), 3);
        assert_eq!(index.matched("r", &c), 3);
        // A chain longer than the cache keeps its head.
        let long = chain(20, 5);
        index.record("r", &long);
        assert_eq!(index.matched("r", &long), 8);
        assert_eq!(index.blocks("r"), 8);
    }

    /// A tiny deterministic generator (xorshift64*).
    struct Draw(u64);

    impl Draw {
        fn below(&mut self, n: usize) -> usize {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n as u64) as usize
        }
    }

    #[test]
    fn held_blocks_stay_closed_under_prefixes_so_bisection_finds_the_first_miss() {
        // Chains that share prefixes of every length: a few roots, each
        // grown by branches, recorded in a random order into a cache that
        // holds a fraction of them, with prefixes of them recorded too.
        let mut draw = Draw(0x5EED);
        let roots: Vec<String> = (0..4).map(|i| text(BLOCK_BYTES * 6, i)).collect();
        let prompts: Vec<Vec<u64>> = (0..40)
            .map(|i| {
                let root = &roots[i % roots.len()];
                let keep = draw.below(root.len());
                let grown = format!("{}{}", &root[..keep], text(BLOCK_BYTES * 4, i as u8 + 9));
                hashes(COMPLETIONS_PATH, &json!({"prompt": grown}))
                    .blocks()
                    .to_vec()
            })
            .collect();
        for capacity in [1, 5, 17, 60] {
            let mut index = index(capacity);
            for _ in 0..400 {
                let prompt = &prompts[draw.below(prompts.len())];
                let cut = 1 + draw.below(prompt.len());
                index.record("r", &prompt[..cut]);
                let resident = &index.replicas["r"];
                for p in &prompts {
                    assert_eq!(
                        resident.matched(p),
                        resident.matched_linearly(p),
                        "capacity {capacity}"
                    );
                }
            }
        }
    }

    #[test]
    fn the_capacity_is_tokens_at_four_bytes_each() {
        let index = PrefixIndex::new(20_000);
        assert_eq!(index.capacity_blocks(), 20_000 * 4 / BLOCK_BYTES);
        let mut none = PrefixIndex::new(0);
        none.record("r", &chain(3, 1));
        assert_eq!(none.blocks("r"), 0);
        assert_eq!(none.replicas().count(), 0);
    }
}
