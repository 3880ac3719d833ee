//! [`TollgateRuntime`]: openraft's async runtime for Tollgate — tokio for
//! tasks, time and channels, exactly as `openraft::TokioRuntime` — with a
//! random source that a simulation can seed.
//!
//! This module owns the one random source of the Raft group (openraft draws
//! its election timeouts from it) and offers it to the rest of the process
//! ([`random_u64`], [`random_range`], [`thread_rng`]) so that a seeded
//! simulation replays the same choices. Unless [`seed_thread_rng`] was called
//! on the current thread, draws come from `rand::thread_rng()`, as in
//! openraft's own runtime. It must not read the wall clock or start threads:
//! time is tokio's, so a paused or simulated clock drives every timer.
//!
//! Seeding is per thread. A simulation is deterministic only on a
//! current-thread runtime (turmoil runs every host on the thread that runs
//! the simulation); on a multi-thread runtime each worker has its own
//! generator, unseeded unless seeded there.

use std::cell::RefCell;
use std::future::Future;
use std::marker::PhantomData;
use std::ops::Range;
use std::time::Duration;

use openraft::async_runtime::TokioOneShotSender;
use openraft::{AsyncRuntime, OptionalSend, TokioInstant};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

thread_local! {
    /// This thread's seeded generator, if [`seed_thread_rng`] was called.
    static SEEDED: RefCell<Option<StdRng>> = const { RefCell::new(None) };
}

/// Makes every later draw on this thread ([`thread_rng`], [`random_u64`],
/// [`random_range`], openraft's election timeouts) come from a generator
/// seeded with `seed`, restarting the sequence if it was already seeded.
pub fn seed_thread_rng(seed: u64) {
    SEEDED.with(|seeded| *seeded.borrow_mut() = Some(StdRng::seed_from_u64(seed)));
}

/// Returns this thread to unpredictable draws from `rand::thread_rng()`.
pub fn unseed_thread_rng() {
    SEEDED.with(|seeded| *seeded.borrow_mut() = None);
}

/// Runs `f` on this thread's generator: the seeded one if any, else
/// `rand::thread_rng()`.
fn with_rng<R>(f: impl FnOnce(&mut dyn RngCore) -> R) -> R {
    SEEDED.with(|seeded| match seeded.borrow_mut().as_mut() {
        Some(rng) => f(rng),
        None => f(&mut rand::thread_rng()),
    })
}

/// A random `u64` from this thread's generator.
pub fn random_u64() -> u64 {
    with_rng(|rng| rng.next_u64())
}

/// A random value in `range` (start included, end excluded) from this
/// thread's generator. An empty range yields `range.start` rather than
/// panicking.
pub fn random_range(range: Range<u64>) -> u64 {
    if range.is_empty() {
        return range.start;
    }
    with_rng(|rng| rng.gen_range(range))
}

/// A handle onto this thread's generator; see [`SeedableThreadRng`].
pub fn thread_rng() -> SeedableThreadRng {
    SeedableThreadRng {
        _not_send: PhantomData,
    }
}

/// A handle onto the generator of the thread it was made on: the seeded
/// one after [`seed_thread_rng`], else `rand::thread_rng()`. Like rand's
/// `ThreadRng` it cannot leave its thread, and it holds no state of its own,
/// so handles made before or after seeding all draw from the current
/// generator.
#[derive(Clone, Debug)]
pub struct SeedableThreadRng {
    // The generator is thread-local; a handle sent elsewhere would silently
    // draw from another thread's.
    _not_send: PhantomData<*const ()>,
}

impl RngCore for SeedableThreadRng {
    fn next_u32(&mut self) -> u32 {
        with_rng(|rng| rng.next_u32())
    }

    fn next_u64(&mut self) -> u64 {
        with_rng(|rng| rng.next_u64())
    }

    fn fill_bytes(&mut self, dest: &mut [u8]) {
        with_rng(|rng| rng.fill_bytes(dest));
    }

    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand::Error> {
        with_rng(|rng| rng.try_fill_bytes(dest))
    }
}

/// openraft's async runtime for Tollgate: tokio for tasks, timers, instants
/// and one-shot channels (as `openraft::TokioRuntime`), and
/// [`SeedableThreadRng`] for randomness.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TollgateRuntime;

impl AsyncRuntime for TollgateRuntime {
    type JoinError = tokio::task::JoinError;
    type JoinHandle<T: OptionalSend + 'static> = tokio::task::JoinHandle<T>;
    type Sleep = tokio::time::Sleep;
    type Instant = TokioInstant;
    type TimeoutError = tokio::time::error::Elapsed;
    type Timeout<R, T: Future<Output = R> + OptionalSend> = tokio::time::Timeout<T>;
    type ThreadLocalRng = SeedableThreadRng;
    type OneshotSender<T: OptionalSend> = TokioOneShotSender<T>;
    type OneshotReceiverError = tokio::sync::oneshot::error::RecvError;
    type OneshotReceiver<T: OptionalSend> = tokio::sync::oneshot::Receiver<T>;

    fn spawn<T>(future: T) -> Self::JoinHandle<T::Output>
    where
        T: Future + OptionalSend + 'static,
        T::Output: OptionalSend + 'static,
    {
        tokio::task::spawn(future)
    }

    fn sleep(duration: Duration) -> Self::Sleep {
        tokio::time::sleep(duration)
    }

    fn sleep_until(deadline: Self::Instant) -> Self::Sleep {
        tokio::time::sleep_until(deadline)
    }

    fn timeout<R, F: Future<Output = R> + OptionalSend>(
        duration: Duration,
        future: F,
    ) -> Self::Timeout<R, F> {
        tokio::time::timeout(duration, future)
    }

    fn timeout_at<R, F: Future<Output = R> + OptionalSend>(
        deadline: Self::Instant,
        future: F,
    ) -> Self::Timeout<R, F> {
        tokio::time::timeout_at(deadline, future)
    }

    fn is_panic(join_error: &Self::JoinError) -> bool {
        join_error.is_panic()
    }

    fn thread_rng() -> Self::ThreadLocalRng {
        thread_rng()
    }

    fn oneshot<T>() -> (Self::OneshotSender<T>, Self::OneshotReceiver<T>)
    where
        T: OptionalSend,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        (TokioOneShotSender(tx), rx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn draws(n: usize) -> Vec<u64> {
        (0..n).map(|_| random_u64()).collect()
    }

    #[test]
    fn the_same_seed_replays_the_same_sequence() {
        seed_thread_rng(7);
        let first = draws(16);
        seed_thread_rng(7);
        assert_eq!(draws(16), first);

        // Every entry point draws from the one sequence.
        seed_thread_rng(7);
        let mut rng = thread_rng();
        assert_eq!(rng.next_u64(), first[0]);
        assert_eq!(random_u64(), first[1]);
        assert_eq!(TollgateRuntime::thread_rng().next_u64(), first[2]);
        unseed_thread_rng();
    }

    #[test]
    fn different_seeds_give_different_sequences() {
        seed_thread_rng(1);
        let one = draws(8);
        seed_thread_rng(2);
        let two = draws(8);
        assert_ne!(one, two);
        unseed_thread_rng();
    }

    #[test]
    fn election_timeouts_follow_the_seed() {
        let config = openraft::Config {
            election_timeout_min: 1_000,
            election_timeout_max: 2_000,
            ..Default::default()
        };
        let timeouts = |seed| {
            seed_thread_rng(seed);
            (0..8)
                .map(|_| config.new_rand_election_timeout::<TollgateRuntime>())
                .collect::<Vec<_>>()
        };
        let first = timeouts(42);
        assert_eq!(timeouts(42), first);
        assert!(first.iter().all(|t| (1_000..2_000).contains(t)));
        assert_ne!(timeouts(43), first);
        unseed_thread_rng();
    }

    #[test]
    fn seeding_is_per_thread_and_can_be_undone() {
        seed_thread_rng(5);
        let here = draws(4);
        // Another thread is unaffected: it draws from rand's own generator.
        let there = std::thread::spawn(|| draws(4))
            .join()
            .expect("thread draws");
        assert_ne!(here, there);
        unseed_thread_rng();
        assert_ne!(draws(4), here);
    }

    #[test]
    fn random_range_stays_in_range_and_tolerates_empty_ranges() {
        seed_thread_rng(9);
        assert!((0..1_000).all(|_| (10..20).contains(&random_range(10..20))));
        assert_eq!(random_range(5..5), 5);
        #[allow(clippy::reversed_empty_ranges)]
        let inverted = random_range(9..3);
        assert_eq!(inverted, 9);
        unseed_thread_rng();
    }
}
