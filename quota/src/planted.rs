//! Bugs planted on purpose, to prove that the simulator's checkers catch
//! them. The switches take effect only in builds with the `planted-bugs`
//! feature, which production builds never enable; elsewhere setting one is
//! refused. Each switch is per thread, so one simulated cluster can run
//! broken while others in the same process run sound.

use std::cell::Cell;

thread_local! {
    static SKIP_ESCROW_CHECK: Cell<bool> = const { Cell::new(false) };
}

/// This build cannot plant bugs.
#[derive(Debug, thiserror::Error)]
#[error("this build has no planted bugs; rebuild with `--features planted-bugs`")]
pub struct NotCompiled;

/// Whether this build can plant bugs.
pub const COMPILED: bool = cfg!(feature = "planted-bugs");

/// Makes `decide` on this thread allow strict-quota usage without holding
/// escrow rights (only the cluster-wide limit, as this node sees it, is
/// checked). Turning it off always works.
pub fn set_skip_escrow_check(on: bool) -> Result<(), NotCompiled> {
    if on && !COMPILED {
        return Err(NotCompiled);
    }
    SKIP_ESCROW_CHECK.with(|c| c.set(on));
    Ok(())
}

/// Whether the escrow check is skipped on this thread.
pub(crate) fn skip_escrow_check() -> bool {
    COMPILED && SKIP_ESCROW_CHECK.with(Cell::get)
}
