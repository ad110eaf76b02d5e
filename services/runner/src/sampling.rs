//! Choosing the next token from logits: penalties, temperature, top-k,
//! top-p, a seeded generator; greedy at temperature 0.

use rand::{Rng, SeedableRng, rngs::StdRng};

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: usize,
    pub repetition_penalty: f32,
    pub frequency_penalty: f32,
    pub presence_penalty: f32,
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            repetition_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            seed: None,
        }
    }
}

pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    counts: std::collections::HashMap<u32, u32>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = match params.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        Self {
            params,
            rng,
            counts: Default::default(),
        }
    }

    /// The sampler as it stood after choosing `generated`: the penalties
    /// count those tokens and the generator has made the draws they took
    /// (one per token when sampling, none when greedy), so a continuation
    /// of a seeded request picks what the uninterrupted one would have.
    pub fn resume(params: SamplingParams, generated: &[u32]) -> Self {
        let mut sampler = Self::new(params);
        for &id in generated {
            if sampler.params.temperature > 0.0 {
                let _: f32 = sampler.rng.random();
            }
            *sampler.counts.entry(id).or_default() += 1;
        }
        sampler
    }

    /// Picks a token and remembers it for the penalties.
    pub fn sample(&mut self, logits: &mut [f32]) -> u32 {
        for (&id, &n) in &self.counts {
            let Some(l) = logits.get_mut(id as usize) else {
                continue;
            };
            if self.params.repetition_penalty != 1.0 {
                *l = if *l > 0.0 {
                    *l / self.params.repetition_penalty
                } else {
                    *l * self.params.repetition_penalty
                };
            }
            *l -= self.params.frequency_penalty * n as f32 + self.params.presence_penalty;
        }
        let id = if self.params.temperature <= 0.0 {
            argmax(logits)
        } else {
            self.sample_distribution(logits)
        };
        *self.counts.entry(id).or_default() += 1;
        id
    }

    fn sample_distribution(&mut self, logits: &[f32]) -> u32 {
        // Exactly one draw per token whatever the logits, taken first:
        // [`Sampler::resume`] replays a continuation's draws by count.
        let mut x: f32 = self.rng.random();
        let t = self.params.temperature;
        // Tokens more than 30 temperatures below the best have a relative
        // probability under e^-30: leaving them out spares sorting the
        // whole vocabulary on every token.
        let best = logits.iter().fold(f32::NEG_INFINITY, |a, &l| a.max(l));
        let floor = best - 30.0 * t;
        let mut order: Vec<u32> = (0..logits.len() as u32)
            .filter(|&i| logits[i as usize] >= floor)
            .collect();
        if order.is_empty() {
            return argmax(logits);
        }
        let k = if self.params.top_k == 0 {
            order.len()
        } else {
            self.params.top_k.min(order.len())
        };
        order.select_nth_unstable_by(k.saturating_sub(1), |a, b| {
            logits[*b as usize].total_cmp(&logits[*a as usize])
        });
        order.truncate(k);
        order.sort_by(|a, b| logits[*b as usize].total_cmp(&logits[*a as usize]));
        let max = logits[order[0] as usize];
        let mut probs: Vec<f32> = order
            .iter()
            .map(|i| ((logits[*i as usize] - max) / t).exp())
            .collect();
        let sum: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= sum);
        if self.params.top_p < 1.0 {
            let mut cumulative = 0.0;
            let mut keep = probs.len();
            for (i, p) in probs.iter().enumerate() {
                cumulative += p;
                if cumulative >= self.params.top_p {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
            let sum: f32 = probs.iter().sum();
            probs.iter_mut().for_each(|p| *p /= sum);
        }
        for (i, p) in probs.iter().enumerate() {
            if x < *p {
                return order[i];
            }
            x -= p;
        }
        order[probs.len() - 1]
    }
}

pub fn argmax(logits: &[f32]) -> u32 {
    logits
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map_or(0, |(i, _)| i as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_and_seeded_sampling_are_repeatable() {
        let logits = vec![0.1, 2.0, 1.9, -1.0];
        let mut greedy = Sampler::new(SamplingParams {
            temperature: 0.0,
            ..Default::default()
        });
        assert_eq!(greedy.sample(&mut logits.clone()), 1);
        let draw = |seed| {
            let mut s = Sampler::new(SamplingParams {
                temperature: 1.0,
                seed: Some(seed),
                ..Default::default()
            });
            (0..20)
                .map(|_| s.sample(&mut logits.clone()))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        let mut top1 = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_k: 1,
            seed: Some(1),
            ..Default::default()
        });
        assert!((0..10).all(|_| top1.sample(&mut logits.clone()) == 1));
    }

    #[test]
    fn a_resumed_sampler_continues_as_the_uninterrupted_one() {
        let logits = vec![0.3, 1.0, 0.9, 0.2, -0.5];
        for temperature in [0.0, 0.8] {
            let params = SamplingParams {
                temperature,
                seed: Some(11),
                frequency_penalty: 0.4,
                ..Default::default()
            };
            let mut whole = Sampler::new(params.clone());
            let all: Vec<u32> = (0..30).map(|_| whole.sample(&mut logits.clone())).collect();
            for k in [0, 1, 7, 29] {
                let mut resumed = Sampler::resume(params.clone(), &all[..k]);
                let rest: Vec<u32> = (k..30)
                    .map(|_| resumed.sample(&mut logits.clone()))
                    .collect();
                assert_eq!(
                    rest,
                    all[k..],
                    "temperature {temperature}, resumed after {k}"
                );
            }
        }
    }

    #[test]
    fn penalties_discourage_repeats() {
        let mut s = Sampler::new(SamplingParams {
            temperature: 0.0,
            presence_penalty: 1.0,
            ..Default::default()
        });
        let logits = vec![1.0, 0.5];
        assert_eq!(s.sample(&mut logits.clone()), 0);
        assert_eq!(
            s.sample(&mut logits.clone()),
            1,
            "the repeated token lost 1.0"
        );
    }
}
