//! Fuzzing hooks (the `fuzz/` crate, `scripts/fuzz`): not for VMM use.

/// With `on`, device workers started from now on run on the activating thread: activation
/// (and each `resume`) serves every queue once, completes what is in flight and returns, so a
/// fuzz input is served completely and deterministically by the time `activate` returns.
pub fn inline_workers(on: bool) {
    crate::worker::set_inline(on);
}
