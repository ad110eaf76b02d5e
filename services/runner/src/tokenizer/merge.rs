//! The merge engine both families share: adjacent pieces merge pair by
//! pair from a heap, best pair first (lowest merge rank, or highest score
//! of the merged token), leftmost among equals.

use std::collections::{BinaryHeap, HashMap};

use super::Tokenizer;

/// Which adjacent pair merges first.
pub(super) enum Ranking {
    /// `(left id, right id) → rank`, lower first.
    Merges(HashMap<(u32, u32), u32>),
    /// The merged token's score, higher first.
    Scores(Vec<f32>),
}

/// A merge candidate in the queue: best priority, then leftmost.
#[derive(PartialEq)]
struct Candidate {
    priority: f32,
    left: usize,
    right: usize,
    /// Byte length of the merged piece when queued; a stale entry no
    /// longer matches.
    len: usize,
}

impl Eq for Candidate {}

impl Ord for Candidate {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.priority
            .total_cmp(&other.priority)
            .then(other.left.cmp(&self.left))
    }
}

impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// A piece of the text being merged: a byte range, linked to its
/// neighbours.
#[derive(Clone, Copy)]
pub(super) struct Piece {
    start: usize,
    end: usize,
    prev: Option<usize>,
    next: Option<usize>,
    id: Option<u32>,
}

impl Tokenizer {
    /// Merges the characters of `text` pair by pair, best pair first.
    fn merge(&self, text: &str) -> Vec<Piece> {
        let mut pieces: Vec<Piece> = text
            .char_indices()
            .map(|(i, c)| Piece {
                start: i,
                end: i + c.len_utf8(),
                prev: None,
                next: None,
                id: None,
            })
            .collect();
        let count = pieces.len();
        for (i, p) in pieces.iter_mut().enumerate() {
            p.prev = i.checked_sub(1);
            p.next = (i + 1 < count).then_some(i + 1);
            p.id = self.ids.get(&text[p.start..p.end]).copied();
        }
        let candidate = |pieces: &[Piece], left: usize, right: usize| -> Option<Candidate> {
            let (l, r) = (&pieces[left], &pieces[right]);
            let merged = self.ids.get(&text[l.start..r.end]).copied()?;
            let priority = match &self.ranking {
                Ranking::Merges(ranks) => -(*ranks.get(&(l.id?, r.id?))? as f32),
                Ranking::Scores(scores) => scores[merged as usize],
            };
            Some(Candidate {
                priority,
                left,
                right,
                len: r.end - l.start,
            })
        };
        let mut queue: BinaryHeap<Candidate> = BinaryHeap::new();
        for i in 1..count {
            queue.extend(candidate(&pieces, i - 1, i));
        }
        while let Some(c) = queue.pop() {
            let (l, r) = (pieces[c.left], pieces[c.right]);
            if l.end == l.start
                || r.end == r.start
                || l.next != Some(c.right)
                || r.end - l.start != c.len
            {
                continue;
            }
            pieces[c.left].end = r.end;
            pieces[c.left].next = r.next;
            pieces[c.left].id = self.ids.get(&text[l.start..r.end]).copied();
            pieces[c.right].end = pieces[c.right].start;
            if let Some(n) = r.next {
                pieces[n].prev = Some(c.left);
                queue.extend(candidate(&pieces, c.left, n));
            }
            if let Some(p) = l.prev {
                queue.extend(candidate(&pieces, p, c.left));
            }
        }
        let mut out = Vec::new();
        let mut at = (count > 0).then_some(0);
        while let Some(i) = at {
            out.push(pieces[i]);
            at = pieces[i].next;
        }
        out
    }

    pub(super) fn encode_sentencepiece(&self, text: &str, out: &mut Vec<u32>) {
        for piece in self.merge(text) {
            match piece.id {
                Some(id) => out.push(id),
                None => {
                    for b in text[piece.start..piece.end].bytes() {
                        if let Some(id) = self.byte_tokens[b as usize].or(self.unknown) {
                            out.push(id);
                        }
                    }
                }
            }
        }
    }

    pub(super) fn encode_byte_level(&self, piece: &str, out: &mut Vec<u32>) {
        if let Ok(cache) = self.cache.lock()
            && let Some(ids) = cache.get(piece)
        {
            out.extend_from_slice(ids);
            return;
        }
        let mapped: String = piece.bytes().map(|b| self.byte_char[b as usize]).collect();
        if self.ignore_merges
            && let Some(id) = self.ids.get(&mapped)
        {
            out.push(*id);
            return;
        }
        let mut ids = Vec::new();
        for p in self.merge(&mapped) {
            match p.id {
                Some(id) => ids.push(id),
                // Unknown symbol: fall back to its single-byte tokens.
                None => ids.extend(
                    mapped[p.start..p.end]
                        .chars()
                        .filter_map(|c| self.ids.get(c.encode_utf8(&mut [0; 4]) as &str).copied()),
                ),
            }
        }
        out.extend_from_slice(&ids);
        if let Ok(mut cache) = self.cache.lock()
            && cache.len() < 100_000
        {
            cache.insert(piece.to_string(), ids);
        }
    }
}
