//! Hash seeding for the usage and gossip maps.
//!
//! This module owns [`FastState`], the hasher of every map keyed by
//! request-supplied text. Outside the simulator each map is seeded at random
//! (HashDoS resistance). The deterministic simulator pins the seed for the
//! thread a simulated cluster runs on, so that a map's iteration order, and
//! with it the order of gossip entries, replays exactly from one seed. It
//! must not be used for anything that needs a secret.

use std::cell::Cell;
use std::hash::BuildHasher;

thread_local! {
    static PINNED_SEED: Cell<Option<u64>> = const { Cell::new(None) };
}

/// Pins the seed of every [`FastState`] created on this thread from now on
/// (`None` goes back to random seeds). For the deterministic simulator.
pub fn pin_seed(seed: Option<u64>) {
    PINNED_SEED.with(|s| s.set(seed));
}

/// A foldhash builder: randomly seeded, unless the thread's seed is pinned.
#[derive(Clone, Debug)]
pub struct FastState(foldhash::fast::FixedState);

impl Default for FastState {
    fn default() -> Self {
        let seed = PINNED_SEED.with(Cell::get).unwrap_or_else(|| {
            // A fresh random seed per map, as foldhash's RandomState gives.
            foldhash::fast::RandomState::default().hash_one(0u64)
        });
        Self(foldhash::fast::FixedState::with_seed(seed))
    }
}

impl BuildHasher for FastState {
    type Hasher = foldhash::fast::FoldHasher;

    fn build_hasher(&self) -> Self::Hasher {
        self.0.build_hasher()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn order() -> Vec<u32> {
        let mut m: HashMap<u32, (), FastState> = HashMap::default();
        for i in 0..64 {
            m.insert(i, ());
        }
        m.keys().copied().collect()
    }

    #[test]
    fn a_pinned_seed_replays_the_iteration_order() {
        pin_seed(Some(7));
        let a = order();
        let b = order();
        pin_seed(None);
        assert_eq!(a, b);
    }

    #[test]
    fn unpinned_maps_are_seeded_apart() {
        pin_seed(None);
        let a = FastState::default().hash_one("subject");
        let b = FastState::default().hash_one("subject");
        assert_ne!(a, b);
    }
}
