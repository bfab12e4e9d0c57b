//! `hotpot-sim`: run many seeds (`--seeds N`), or replay one (`--seed S [--trace]`).

use std::io::Write;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use clap::{Parser, ValueEnum};
use hotpot_core::proto::node::Bugs;
use hotpot_sim::run_seed;

/// The deterministic simulator: hotpot's node machines under seeded faults (message loss,
/// duplication, delay and reordering, partitions, crashes with lost or torn PM writes, nodes
/// lost with their PM, dispatcher crashes), the identical-page merger running in half the
/// worlds, one-sided reads of owners' PM (as over verbs) in half, programs with a second,
/// storing thread in half, datasets made while the cluster runs in half and a node joining
/// it in half, checked for lost or
/// partial commits, diverging copies, bytes no commit wrote, reads and views that miss or
/// show the wrong commits, dataset versions out of order, a step that panics, and a cluster
/// that does not settle once healed.
#[derive(Parser)]
#[command(name = "hotpot-sim", version)]
struct Args {
    /// Run this many seeds, from --first-seed on, and exit non-zero if any fails.
    #[arg(long, conflicts_with = "seed")]
    seeds: Option<u64>,
    /// The first of --seeds (default: a random one, printed).
    #[arg(long, requires = "seeds")]
    first_seed: Option<u64>,
    /// Replay one seed exactly.
    #[arg(long)]
    seed: Option<u64>,
    /// With --seed: print every event (the same bytes on every replay).
    #[arg(long, requires = "seed")]
    trace: bool,
    /// Threads running seeds (each seed runs on one thread; default: one per CPU).
    #[arg(long)]
    threads: Option<usize>,
    /// Plant a deliberately broken protocol variant (the checkers must catch it).
    #[arg(long, value_enum)]
    plant: Vec<Plant>,
}

#[derive(Clone, Copy, ValueEnum)]
enum Plant {
    /// The owner answers before its apply is persisted.
    AckBeforePersist,
    /// The owner takes no page lock for a commit.
    SkipLock,
    /// The owner does not send holders the new copy.
    SkipInvalidation,
    /// A home gives out the first block's versions again after a restart or a promotion.
    ReuseVersions,
    /// An MRSW writer keeps its versions when it gives the write lease back.
    KeepVersions,
    /// A holder does not register its copies again with an owner that restarted.
    IgnoreRestarts,
    /// An owner answers a read at a view's version with its current copy.
    ReadViewsCurrent,
    /// A one-sided read takes the frame it read without checking the page's slot again.
    TrustOneSidedFrame,
    /// When the kernel has dropped pages, the node forgets every base of them, also one a
    /// read served after the drop (the daemon's bug of session 20).
    ForgetRereadBases,
    /// A commit's end keeps staged what differs from its snapshot's bytes, also what a read
    /// that rebased the page meanwhile brought (the daemon's bug of session 21).
    KeepRebasedBytes,
}

fn bugs(plants: &[Plant]) -> Bugs {
    let mut bugs = Bugs::default();
    for plant in plants {
        match plant {
            Plant::AckBeforePersist => bugs.ack_before_persist = true,
            Plant::SkipLock => bugs.skip_commit_lock = true,
            Plant::SkipInvalidation => bugs.skip_holder_invalidation = true,
            Plant::ReuseVersions => bugs.reuse_first_block = true,
            Plant::KeepVersions => bugs.keep_versions_after_close = true,
            Plant::IgnoreRestarts => bugs.ignore_owner_restarts = true,
            Plant::ReadViewsCurrent => bugs.read_views_current = true,
            Plant::TrustOneSidedFrame => bugs.trust_one_sided_frame = true,
            Plant::ForgetRereadBases => bugs.forget_reread_bases = true,
            Plant::KeepRebasedBytes => bugs.keep_rebased_bytes = true,
        }
    }
    bugs
}

fn main() -> ExitCode {
    let args = Args::parse();
    let bugs = bugs(&args.plant);
    match (args.seed, args.seeds) {
        (Some(seed), _) => replay(seed, bugs, args.trace),
        (None, Some(count)) => {
            let first = args.first_seed.unwrap_or_else(rand::random);
            let threads = args
                .threads
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
            many(first, count, threads.max(1), bugs)
        }
        (None, None) => {
            eprintln!("hotpot-sim: give --seeds N or --seed S (see --help)");
            ExitCode::from(2)
        }
    }
}

fn replay(seed: u64, bugs: Bugs, trace: bool) -> ExitCode {
    let outcome = run_seed(seed, bugs, trace);
    let mut out = std::io::stdout().lock();
    let mut report = || -> std::io::Result<()> {
        for line in outcome.trace.lines() {
            writeln!(out, "{line}")?;
        }
        writeln!(out, "{}", outcome.options)?;
        writeln!(out, "seed {seed}: {}", outcome.tally)?;
        if outcome.violations.is_empty() {
            writeln!(out, "seed {seed}: ok")?;
        }
        for violation in &outcome.violations {
            writeln!(out, "seed {seed}: VIOLATION {violation}")?;
        }
        out.flush()
    };
    // A closed pipe (`| head`) is not an error of the run.
    let _ = report();
    if outcome.violations.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn many(first: u64, count: u64, threads: usize, bugs: Bugs) -> ExitCode {
    println!(
        "hotpot-sim: seeds {first}..{} on {threads} threads",
        first.wrapping_add(count)
    );
    let started = Instant::now();
    let next = AtomicU64::new(0);
    let done = AtomicUsize::new(0);
    let failures: Mutex<Vec<(u64, String)>> = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                if index >= count {
                    break;
                }
                let seed = first.wrapping_add(index);
                let outcome = run_seed(seed, bugs, false);
                if !outcome.violations.is_empty() {
                    let mut report = format!("seed {seed} FAILED ({})", outcome.options);
                    for violation in &outcome.violations {
                        report.push_str(&format!("\n  {violation}"));
                    }
                    report.push_str(&format!("\n  replay: hotpot-sim --seed {seed} --trace"));
                    println!("{report}");
                    failures.lock().expect("failures").push((seed, report));
                }
                let finished = done.fetch_add(1, Ordering::Relaxed) + 1;
                if (finished as u64).is_multiple_of((count / 10).max(1)) {
                    eprintln!(
                        "  {finished}/{count} seeds, {:.1} s",
                        started.elapsed().as_secs_f64()
                    );
                }
            });
        }
    });
    let failures = failures.into_inner().expect("failures");
    let elapsed = started.elapsed().as_secs_f64();
    if failures.is_empty() {
        println!("hotpot-sim: {count} seeds, no violation, {elapsed:.1} s");
        ExitCode::SUCCESS
    } else {
        let mut seeds: Vec<u64> = failures.iter().map(|(seed, _)| *seed).collect();
        seeds.sort_unstable();
        println!(
            "hotpot-sim: {} of {count} seeds FAILED ({elapsed:.1} s): {seeds:?}",
            failures.len()
        );
        ExitCode::FAILURE
    }
}
