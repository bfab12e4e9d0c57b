//! hotpot's deterministic simulator (after TigerBeetle's VOPR): the node machines of
//! `hotpot_core::proto::node`, the very code a node runs for these protocol steps, in one
//! thread over a simulated network and PM, under faults a seed chooses; checkers outside the
//! nodes. `run_seed` is the whole of one run; `hotpot-sim` runs many.

#[macro_use]
mod trace;
pub mod check;
mod dispatcher;
pub mod options;
pub mod workload;
pub mod world;

pub use check::Violation;
pub use options::Options;
pub use trace::Trace;
pub use workload::Tally;

use hotpot_core::proto::node::Bugs;
use world::World;

/// What one seed did.
pub struct Outcome {
    pub options: Options,
    pub violations: Vec<Violation>,
    pub trace: Trace,
    /// How the programs' writes ended.
    pub tally: Tally,
}

/// Run `seed` (with `bugs` planted); `trace`: keep every event's line.
pub fn run_seed(seed: u64, bugs: Bugs, trace: bool) -> Outcome {
    let mut rng = World::seed_rng(seed);
    let options = Options::from_seed(seed, &mut rng, bugs);
    let trace = if trace { Trace::on() } else { Trace::off() };
    let (violations, trace, tally) = World::new(options.clone(), rng, trace).run();
    Outcome {
        options,
        violations,
        trace,
        tally,
    }
}
