//! Bugs planted on purpose, to prove that the simulator's checkers catch
//! them. Compiled only with the `planted-bugs` feature, which production
//! builds never enable; each switch is per thread, so one simulated cluster
//! can run broken while others in the same process run sound.

use std::cell::Cell;

thread_local! {
    static SKIP_ESCROW_CHECK: Cell<bool> = const { Cell::new(false) };
}

/// Makes `decide` on this thread allow strict-quota usage without holding
/// escrow rights (only the cluster-wide limit, as this node sees it, is
/// checked).
pub fn set_skip_escrow_check(on: bool) {
    SKIP_ESCROW_CHECK.with(|c| c.set(on));
}

/// Whether the escrow check is skipped on this thread.
pub fn skip_escrow_check() -> bool {
    SKIP_ESCROW_CHECK.with(Cell::get)
}
