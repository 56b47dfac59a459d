//! The choice itself, over a plain list of facts about each candidate: probes first, then an
//! endpoint never tried and never measured, then one whose estimate went stale, then power of
//! two choices among the healthy, then the least bad of the rest.
//!
//! Why P2C rather than "cheapest of all": every node balances independently on slightly stale
//! numbers, and if all of them sent everything to the single cheapest endpoint they would
//! stampede it together. Comparing two random candidates keeps most of the benefit (the worse
//! of the two is never chosen) while spreading the herd (Mitzenmacher; Finagle, Linkerd).

use std::cmp::Ordering;
use std::time::Instant;

use rand::Rng;

/// Two costs closer than this fraction of the lower one are a tie: peak-EWMA estimates of equal
/// endpoints differ by that much from jitter alone, and letting the cheaper always win sent
/// 98 % of sequential requests to one of two equal endpoints.
pub(super) const TIE_RATIO: f64 = 0.25;
/// Two costs closer than this (ns) are a tie whatever their ratio: on a LAN or loopback, where
/// answers take a few hundred microseconds, scheduling jitter alone is of this size.
pub(super) const TIE_FLOOR_NS: f64 = 100_000.0;

/// What the choice needs to know about one candidate.
#[derive(Debug, Clone, Copy)]
pub(super) struct Choice {
    /// Relative share in the random draw, at least 1.
    pub(super) weight: u32,
    /// Lower is better: latency (ns) × load, already divided by the weight.
    pub(super) cost: f64,
    /// May take a new request (healthy, or probing with a free probe slot).
    pub(super) available: bool,
    /// Back-off expired and the probe slot is free.
    pub(super) wants_probe: bool,
    /// The peer is going away.
    pub(super) draining: bool,
    /// Start of its latest ejection, if ever ejected.
    pub(super) ejected_at: Option<Instant>,
    /// Never picked and no latency sample: nothing is known of it yet.
    pub(super) unknown: bool,
    /// Not picked for a while (and a re-measurement is allowed now): its estimate is stale.
    pub(super) stale: bool,
}

/// Index of the chosen candidate, `None` only for an empty list.
pub(super) fn choose(choices: &[Choice], rng: &mut impl Rng) -> Option<usize> {
    // An endpoint waiting for its probe gets this request, so its return does not depend on
    // winning a contest against latency numbers from before it was ejected. Oldest first.
    let probe = choices
        .iter()
        .enumerate()
        .filter(|(_, c)| c.wants_probe && !c.draining)
        .min_by_key(|(_, c)| c.ejected_at);
    if let Some((i, _)) = probe {
        return Some(i);
    }

    let healthy: Vec<usize> = (0..choices.len())
        .filter(|&i| choices[i].available && !choices[i].draining)
        .collect();
    // A new endpoint gets one request to be measured. Its assumed latency could otherwise lose
    // every contest against measured ones (a LAN answer beats any guess) and it would never be
    // tried; one request, not a burst, because from its first pick on it competes normally.
    if let Some(i) = random_where(choices, &healthy, |c| c.unknown, rng) {
        return Some(i);
    }
    // One not picked for a while is measured again. Its decayed estimate would win a contest
    // only after `decay × ln(its latency / the others')`, a wait that grows with how slow it
    // was; measuring it bounds the wait for a recovered endpoint whatever the ratio.
    if let Some(i) = random_where(choices, &healthy, |c| c.stale, rng) {
        return Some(i);
    }
    match healthy.len() {
        0 => fallback(choices),
        1 => Some(healthy[0]),
        _ => Some(two_choices(choices, &healthy, rng)),
    }
}

/// A uniformly random index of `pool` whose choice satisfies `wanted`, if any does.
fn random_where(
    choices: &[Choice],
    pool: &[usize],
    wanted: impl Fn(&Choice) -> bool,
    rng: &mut impl Rng,
) -> Option<usize> {
    let matching: Vec<usize> = pool
        .iter()
        .copied()
        .filter(|&i| wanted(&choices[i]))
        .collect();
    (!matching.is_empty()).then(|| matching[rng.gen_range(0..matching.len())])
}

/// Power of two choices: two distinct weighted draws from `pool`, the clearly cheaper wins.
fn two_choices(choices: &[Choice], pool: &[usize], rng: &mut impl Rng) -> usize {
    let a = weighted_draw(choices, pool, None, rng);
    let b = weighted_draw(choices, pool, Some(a), rng);
    // Ties (costs within measurement noise, e.g. two equal endpoints) go to the first draw,
    // which is itself random and weighted: equals share traffic by weight.
    if clearly_cheaper(choices[b].cost, choices[a].cost) {
        b
    } else {
        a
    }
}

/// Whether cost `x` is below `y` by more than measurement noise ([`TIE_RATIO`],
/// [`TIE_FLOOR_NS`]).
fn clearly_cheaper(x: f64, y: f64) -> bool {
    let band = (x.min(y) * TIE_RATIO).max(TIE_FLOOR_NS);
    x < y - band
}

/// One index of `pool` other than `skip`, drawn with probability proportional to weight.
/// `pool` must hold at least one index besides `skip`.
fn weighted_draw(
    choices: &[Choice],
    pool: &[usize],
    skip: Option<usize>,
    rng: &mut impl Rng,
) -> usize {
    let eligible = || pool.iter().copied().filter(move |&i| Some(i) != skip);
    let total: u64 = eligible().map(|i| u64::from(choices[i].weight)).sum();
    let mut ticket = rng.gen_range(0..total);
    let mut last = pool[0];
    for i in eligible() {
        let w = u64::from(choices[i].weight);
        if ticket < w {
            return i;
        }
        ticket -= w;
        last = i;
    }
    last
}

/// No healthy candidate: a sick endpoint beats none. The non-draining endpoint ejected longest
/// ago is the likeliest to have recovered; a draining peer may still finish a request in its
/// grace period, so it comes last, cheapest first.
fn fallback(choices: &[Choice]) -> Option<usize> {
    let oldest_ejected = choices
        .iter()
        .enumerate()
        .filter(|(_, c)| !c.draining)
        .min_by_key(|(_, c)| c.ejected_at)
        .map(|(i, _)| i);
    oldest_ejected.or_else(|| {
        choices
            .iter()
            .enumerate()
            .min_by(|(_, a), (_, b)| a.cost.partial_cmp(&b.cost).unwrap_or(Ordering::Equal))
            .map(|(i, _)| i)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;
    use std::time::Duration;

    /// A healthy candidate whose cost is `ms` milliseconds.
    fn healthy(ms: f64, weight: u32) -> Choice {
        Choice {
            weight,
            cost: ms * 1e6,
            available: true,
            wants_probe: false,
            draining: false,
            ejected_at: None,
            unknown: false,
            stale: false,
        }
    }

    fn ejected(at: Instant) -> Choice {
        Choice {
            available: false,
            ejected_at: Some(at),
            ..healthy(1.0, 100)
        }
    }

    fn counts(choices: &[Choice], n: usize, seed: u64) -> Vec<usize> {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut hits = vec![0; choices.len()];
        for _ in 0..n {
            hits[choose(choices, &mut rng).unwrap()] += 1;
        }
        hits
    }

    #[test]
    fn empty_list_chooses_nothing() {
        assert_eq!(choose(&[], &mut StdRng::seed_from_u64(1)), None);
    }

    #[test]
    fn the_costliest_of_three_is_never_chosen_and_the_cheapest_wins_its_pairs() {
        let hits = counts(
            &[healthy(1.0, 100), healthy(2.0, 100), healthy(3.0, 100)],
            3_000,
            7,
        );
        assert_eq!(hits[2], 0);
        // The cheapest is in 2 of the 3 possible pairs and wins both.
        assert!((1_800..2_200).contains(&hits[0]), "{hits:?}");
    }

    #[test]
    fn equals_within_measurement_noise_share_and_clear_differences_do_not() {
        // 1.0 and 1.2 ms: within the band, an even split (it was 98/2 when the cheaper of the
        // pair always won).
        let hits = counts(&[healthy(1.0, 100), healthy(1.2, 100)], 4_000, 5);
        assert!((1_800..2_200).contains(&hits[1]), "{hits:?}");
        // 0.30 and 0.38 ms on loopback: 80 us apart, below the absolute floor.
        let hits = counts(&[healthy(0.30, 100), healthy(0.38, 100)], 4_000, 5);
        assert!((1_800..2_200).contains(&hits[1]), "{hits:?}");
        // 1 and 1.5 ms, or 0.3 and 10 ms: the cheaper always wins its pair.
        assert_eq!(
            counts(&[healthy(1.0, 100), healthy(1.5, 100)], 1_000, 5)[1],
            0
        );
        assert_eq!(
            counts(&[healthy(0.3, 100), healthy(10.0, 100)], 1_000, 5)[1],
            0
        );
        assert!(clearly_cheaper(1.0e6, 1.3e6) && !clearly_cheaper(1.0e6, 1.2e6));
        assert!(!clearly_cheaper(1.3e6, 1.0e6));
    }

    #[test]
    fn draws_are_weighted() {
        // Equal costs: the first draw decides, so shares follow the weights.
        let hits = counts(&[healthy(1.0, 100), healthy(1.0, 300)], 4_000, 3);
        assert!((800..1_200).contains(&hits[0]), "{hits:?}");
    }

    #[test]
    fn weighted_draw_never_returns_the_skipped_index() {
        let choices = [healthy(1.0, 1), healthy(1.0, 1_000_000), healthy(1.0, 1)];
        let mut rng = StdRng::seed_from_u64(9);
        for _ in 0..1_000 {
            assert_ne!(weighted_draw(&choices, &[0, 1, 2], Some(1), &mut rng), 1);
        }
    }

    #[test]
    fn an_unknown_endpoint_is_tried_before_measured_ones() {
        let new = Choice {
            unknown: true,
            ..healthy(1.0, 100)
        };
        assert_eq!(counts(&[healthy(0.1, 100), new], 10, 1), [0, 10]);
        // Unless it cannot take requests.
        let draining_new = Choice {
            draining: true,
            ..new
        };
        assert_eq!(counts(&[healthy(0.1, 100), draining_new], 10, 1), [10, 0]);
    }

    #[test]
    fn a_stale_endpoint_is_measured_again_after_unknown_ones() {
        let stale = Choice {
            stale: true,
            ..healthy(9.0, 100)
        };
        assert_eq!(counts(&[healthy(0.1, 100), stale], 10, 1), [0, 10]);
        let new = Choice {
            unknown: true,
            ..healthy(1.0, 100)
        };
        assert_eq!(counts(&[stale, new], 10, 1), [0, 10]);
        // Not when it cannot take requests.
        let ejected_stale = Choice {
            available: false,
            ..stale
        };
        assert_eq!(counts(&[healthy(0.1, 100), ejected_stale], 10, 1), [10, 0]);
    }

    #[test]
    fn a_free_probe_slot_takes_the_request() {
        let t0 = Instant::now();
        let probe = Choice {
            available: true,
            wants_probe: true,
            ..ejected(t0)
        };
        assert_eq!(counts(&[healthy(0.1, 100), probe], 10, 1), [0, 10]);
    }

    #[test]
    fn fallback_prefers_the_endpoint_ejected_longest_ago_then_draining() {
        let t0 = Instant::now();
        let later = ejected(t0 + Duration::from_secs(1));
        let draining = Choice {
            draining: true,
            ..healthy(0.1, 100)
        };
        assert_eq!(
            choose(
                &[later, ejected(t0), draining],
                &mut StdRng::seed_from_u64(1)
            ),
            Some(1)
        );
        let expensive = Choice {
            cost: 9e6,
            ..draining
        };
        assert_eq!(
            choose(&[expensive, draining], &mut StdRng::seed_from_u64(1)),
            Some(1)
        );
    }
}
