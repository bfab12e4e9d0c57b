//! `hotpot bench ycsb`: the same YCSB workloads (LMDB in write-map mode) on a 3-node hotpot
//! cluster (replicas 3, the database on node 1's mount), on tmpfs (the ceiling) and on a
//! plain FUSE passthrough (the cost of FUSE alone), side by side. YCSB's order: load, run A,
//! B, C, F, D; reload, run E. Writes each run's YCSB report, a CSV and an SVG chart.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use hdrhistogram::Histogram;
use hotpot_bench::ycsb::lmdb::Lmdb;
use hotpot_bench::ycsb::{report, runner};
use indicatif::{ProgressBar, ProgressStyle};

use crate::cluster;

const MAP_BYTES: usize = 1 << 30;

#[derive(clap::Args, Debug)]
pub struct YcsbArgs {
    /// Workloads to run, from a,b,c,d,e,f.
    #[arg(long, default_value = "a,b,c,d,e,f", value_delimiter = ',')]
    pub workloads: Vec<char>,
    /// Where to run, from hotpot, tmpfs, fuse-passthrough.
    #[arg(
        long,
        default_value = "hotpot,tmpfs,fuse-passthrough",
        value_delimiter = ','
    )]
    pub on: Vec<String>,
    /// Records loaded before the runs.
    #[arg(long, default_value_t = 10_000)]
    pub records: u64,
    /// Operations per workload.
    #[arg(long, default_value_t = 50_000)]
    pub operations: u64,
    /// Client threads.
    #[arg(long, default_value_t = 1)]
    pub threads: u32,
    /// Total operations per second to aim for (YCSB's target); default: as fast as possible.
    #[arg(long)]
    pub target: Option<f64>,
    /// Operations run before each workload's measured run, reported apart (YCSB has none).
    #[arg(long, default_value_t = 0)]
    pub warmup: u64,
    /// Directory for the reports, CSV and chart.
    #[arg(long, default_value = "ycsb-results")]
    pub results: PathBuf,
}

struct Outcome {
    ops_per_sec: f64,
    p99_us: u64,
    errors: u64,
}

/// A place to put the database; keeps what it mounted or started alive.
enum Target {
    Hotpot {
        dir: tempfile::TempDir,
    },
    Tmpfs {
        dir: tempfile::TempDir,
    },
    Passthrough {
        _session: fuser::BackgroundSession,
        _backing: tempfile::TempDir,
        mount: tempfile::TempDir,
    },
}

impl Target {
    fn start(name: &str) -> anyhow::Result<Target> {
        Ok(match name {
            "hotpot" => {
                let dir = tempfile::Builder::new().prefix("hotpot-ycsb-").tempdir()?;
                cluster::up(cluster::UpArgs {
                    nodes: 3,
                    dir: dir.path().to_path_buf(),
                    replicas: 3,
                    // LMDB is a single-writer engine: MRSW's write lease fits it.
                    mode: hotpot_core::proto::types::Mode::Mrsw,
                    pm_size: 2 << 30,
                    promote_after_ms: 10_000,
                    merge_pages_per_s: crate::node::merger::DEFAULT_PAGES_PER_S,
                    machine: false,
                    transport: Default::default(),
                })?;
                Target::Hotpot { dir }
            }
            "tmpfs" => Target::Tmpfs {
                dir: tempfile::Builder::new()
                    .prefix("hotpot-ycsb-")
                    .tempdir_in("/dev/shm")?,
            },
            "fuse-passthrough" => {
                let backing = tempfile::Builder::new()
                    .prefix("hotpot-ycsb-backing-")
                    .tempdir_in("/dev/shm")?;
                let mount = tempfile::Builder::new()
                    .prefix("hotpot-ycsb-mnt-")
                    .tempdir()?;
                let session = hotpot_bench::passthrough::mount(backing.path(), mount.path())
                    .context("mounting the FUSE passthrough")?;
                Target::Passthrough {
                    _session: session,
                    _backing: backing,
                    mount,
                }
            }
            other => bail!("unknown target '{other}': expected hotpot, tmpfs or fuse-passthrough"),
        })
    }

    fn root(&self) -> PathBuf {
        match self {
            Target::Hotpot { dir } => dir.path().join("n1").join("mnt"),
            Target::Tmpfs { dir } => dir.path().to_path_buf(),
            Target::Passthrough { mount, .. } => mount.path().to_path_buf(),
        }
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        if let Target::Hotpot { dir } = self {
            if let Err(error) = cluster::down(dir.path()) {
                eprintln!("warning: stopping the benchmark cluster: {error:#}");
            }
        }
    }
}

fn fresh_db(root: &Path, name: &str, records: u64) -> anyhow::Result<Lmdb> {
    let dir = root.join(name);
    std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let db = Lmdb::open(&dir, MAP_BYTES, false).map_err(|error| anyhow::anyhow!(error))?;
    runner::load(&db, records).map_err(|error| anyhow::anyhow!("load: {error}"))?;
    Ok(db)
}

fn run_target(
    args: &YcsbArgs,
    target_name: &str,
    workloads: &[runner::Workload],
) -> anyhow::Result<BTreeMap<char, Outcome>> {
    let target = Target::start(target_name)?;
    let root = target.root();
    let progress = ProgressBar::new(workloads.len() as u64 + 1).with_style(
        ProgressStyle::with_template("{prefix:>16} {bar:30} {pos}/{len} {msg}").expect("template"),
    );
    progress.set_prefix(target_name.to_string());
    progress.set_message(format!("loading {} records", args.records));
    let mut db = fresh_db(&root, "db", args.records)?;
    progress.inc(1);
    let mut outcomes = BTreeMap::new();
    for workload in workloads {
        if workload.name == 'E' {
            progress.set_message("reloading for E");
            drop(db);
            db = fresh_db(&root, "db-e", args.records)?;
        }
        let pace = runner::Pace {
            threads: args.threads,
            target_ops_per_sec: args.target,
            done: &|| {},
        };
        if args.warmup > 0 {
            progress.set_message(format!("warm-up {}", workload.name));
            let (warm_ms, warm) = runner::run(&db, *workload, args.records, args.warmup, &pace);
            let file = args.results.join(format!(
                "ycsb-{target_name}-{}-t{}-warmup.txt",
                workload.name.to_ascii_lowercase(),
                args.threads
            ));
            std::fs::write(&file, report::render(warm_ms, &warm))
                .with_context(|| format!("writing {}", file.display()))?;
        }
        progress.set_message(format!("workload {}", workload.name));
        let (run_ms, operations) =
            runner::run(&db, *workload, args.records, args.operations, &pace);
        let text = report::render(run_ms, &operations);
        let file = args.results.join(format!(
            "ycsb-{target_name}-{}-t{}.txt",
            workload.name.to_ascii_lowercase(),
            args.threads
        ));
        std::fs::write(&file, &text).with_context(|| format!("writing {}", file.display()))?;
        let mut all = Histogram::<u64>::new(3)?;
        for stats in operations.values() {
            all.add(&stats.latency_us)?;
        }
        let total: u64 = operations
            .values()
            .map(|stats| stats.ok + stats.errors)
            .sum();
        outcomes.insert(
            workload.name,
            Outcome {
                ops_per_sec: total as f64 * 1000.0 / run_ms.max(1) as f64,
                p99_us: all.value_at_quantile(0.99),
                errors: operations.values().map(|stats| stats.errors).sum(),
            },
        );
        progress.inc(1);
    }
    progress.finish_with_message("done");
    Ok(outcomes)
}

pub fn run(args: YcsbArgs) -> anyhow::Result<()> {
    let mut order: Vec<runner::Workload> = Vec::new();
    for name in ['a', 'b', 'c', 'f', 'd', 'e'] {
        if args.workloads.iter().any(|w| w.eq_ignore_ascii_case(&name)) {
            order.push(runner::Workload::core(name).expect("core workload"));
        }
    }
    if let Some(bad) = args
        .workloads
        .iter()
        .find(|w| runner::Workload::core(**w).is_none())
    {
        bail!("unknown workload '{bad}': expected letters from a to f");
    }
    if order.is_empty() || args.on.is_empty() || args.records == 0 || args.operations == 0 {
        bail!("give at least one workload, one target, and non-zero --records and --operations");
    }
    std::fs::create_dir_all(&args.results)
        .with_context(|| format!("creating {}", args.results.display()))?;
    let mut results: BTreeMap<String, BTreeMap<char, Outcome>> = BTreeMap::new();
    for target in &args.on {
        results.insert(target.clone(), run_target(&args, target, &order)?);
    }
    print_table(&args, &order, &results);
    write_csv(&args, &results)?;
    write_svg(&args, &order, &results)?;
    Ok(())
}

fn print_table(
    args: &YcsbArgs,
    order: &[runner::Workload],
    results: &BTreeMap<String, BTreeMap<char, Outcome>>,
) {
    println!(
        "YCSB on LMDB (write-map), {} records, {} operations, {} thread(s)",
        args.records, args.operations, args.threads
    );
    print!("{:<9}", "workload");
    for target in &args.on {
        print!(" {:>16} {:>10}", format!("{target} ops/s"), "p99 us");
    }
    let baselines: Vec<&String> = args.on.iter().filter(|t| *t != "hotpot").collect();
    for baseline in &baselines {
        print!(" {:>18}", format!("hotpot/{baseline}"));
    }
    println!();
    for workload in order {
        print!("{:<9}", workload.name);
        for target in &args.on {
            let outcome = &results[target][&workload.name];
            let errors = if outcome.errors > 0 {
                format!(" ({} errors)", outcome.errors)
            } else {
                String::new()
            };
            print!(
                " {:>16.0} {:>10}{errors}",
                outcome.ops_per_sec, outcome.p99_us
            );
        }
        if let Some(hotpot) = results.get("hotpot") {
            for baseline in &baselines {
                print!(
                    " {:>18.2}",
                    hotpot[&workload.name].ops_per_sec
                        / results[*baseline][&workload.name].ops_per_sec
                );
            }
        }
        println!();
    }
    if let Some(hotpot) = results.get("hotpot") {
        for baseline in &baselines {
            for workload in order {
                let ratio = hotpot[&workload.name].ops_per_sec
                    / results[*baseline][&workload.name].ops_per_sec;
                println!(
                    "ratio hotpot/{baseline} {} {ratio:.2}",
                    workload.name.to_ascii_lowercase()
                );
            }
        }
    }
}

fn write_csv(
    args: &YcsbArgs,
    results: &BTreeMap<String, BTreeMap<char, Outcome>>,
) -> anyhow::Result<()> {
    let mut csv =
        String::from("target,workload,threads,records,operations,ops_per_sec,p99_us,errors\n");
    for (target, outcomes) in results {
        for (workload, outcome) in outcomes {
            csv.push_str(&format!(
                "{target},{workload},{},{},{},{:.1},{},{}\n",
                args.threads,
                args.records,
                args.operations,
                outcome.ops_per_sec,
                outcome.p99_us,
                outcome.errors
            ));
        }
    }
    let path = args.results.join(format!("ycsb-t{}.csv", args.threads));
    std::fs::write(&path, csv).with_context(|| format!("writing {}", path.display()))
}

/// A grouped bar chart of ops/s (log scale) per workload and target.
fn write_svg(
    args: &YcsbArgs,
    order: &[runner::Workload],
    results: &BTreeMap<String, BTreeMap<char, Outcome>>,
) -> anyhow::Result<()> {
    let colors = ["#d95f02", "#1b9e77", "#7570b3"];
    let (width, height, left, bottom) = (120 + 110 * order.len(), 360, 70.0, 300.0);
    let max = results
        .values()
        .flat_map(|o| o.values())
        .map(|o| o.ops_per_sec)
        .fold(1.0, f64::max);
    let scale = |value: f64| (value.max(1.0).log10() / max.log10().max(1.0)) * 260.0;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"11\">\n\
         <text x=\"10\" y=\"16\">YCSB on LMDB, ops/s (log scale), {} records, {} ops, {} thread(s)</text>\n",
        args.records, args.operations, args.threads
    );
    for (index, workload) in order.iter().enumerate() {
        let x0 = left + index as f64 * 110.0;
        svg.push_str(&format!(
            "<text x=\"{}\" y=\"{}\">{}</text>\n",
            x0 + 35.0,
            bottom + 18.0,
            workload.name
        ));
        for (slot, target) in args.on.iter().enumerate() {
            let value = results[target][&workload.name].ops_per_sec;
            let bar = scale(value);
            svg.push_str(&format!(
                "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"28\" height=\"{bar:.1}\" fill=\"{}\"><title>{target} {value:.0} ops/s</title></rect>\n",
                x0 + slot as f64 * 30.0,
                bottom - bar,
                colors[slot % colors.len()]
            ));
        }
    }
    for (slot, target) in args.on.iter().enumerate() {
        svg.push_str(&format!(
            "<rect x=\"{}\" y=\"{}\" width=\"10\" height=\"10\" fill=\"{}\"/><text x=\"{}\" y=\"{}\">{target}</text>\n",
            left + slot as f64 * 140.0,
            bottom + 32.0,
            colors[slot % colors.len()],
            left + slot as f64 * 140.0 + 14.0,
            bottom + 41.0
        ));
    }
    svg.push_str("</svg>\n");
    let path = args.results.join(format!("ycsb-t{}.svg", args.threads));
    std::fs::write(&path, svg).with_context(|| format!("writing {}", path.display()))
}
