//! `hotpot demo`: the main job in one command. Starts a local 3-node cluster, runs a short
//! YCSB A and B on LMDB in node 1's mount and reads the database from nodes 2 and 3, runs a
//! workload on node 1 that commits pages through mmap + msync, reads every
//! committed page through the other nodes' mounts, crashes node 1 with SIGKILL, restarts it on
//! its PM file, verifies every committed byte again, prints a report and cleans up.

use std::collections::BTreeMap;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use rand::Rng;

use crate::cluster;

#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Directory for the demo cluster (default: a new directory under /tmp).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Commits (msync calls) to run.
    #[arg(long, default_value_t = 300)]
    pub commits: u32,
    /// Pages written per commit.
    #[arg(long, default_value_t = 16)]
    pub pages_per_commit: u32,
    /// Keep the cluster directory (PM file, logs) after the demo.
    #[arg(long)]
    pub keep: bool,
}

const DATASET_BYTES: usize = 64 << 20;
const DATASET_PAGES: u64 = (DATASET_BYTES / 4096) as u64;

/// Stops the demo cluster however the demo ends.
struct Teardown {
    dir: PathBuf,
    keep: bool,
}

impl Drop for Teardown {
    fn drop(&mut self) {
        if let Err(error) = cluster::down(&self.dir) {
            eprintln!("warning: stopping the demo cluster: {error:#}");
        }
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

struct YcsbSummary {
    ops_per_sec: [f64; 2],
    errors: u64,
    verified: u64,
}

const YCSB_RECORDS: u64 = 2_000;
const YCSB_OPERATIONS: u64 = 3_000;

/// A short YCSB A and B on LMDB (write-map, commits by msync) in node 1's mount, with a live
/// progress bar; then readers on nodes 2 and 3 open the same database and check every record.
fn ycsb_phase(dir: &std::path::Path) -> anyhow::Result<YcsbSummary> {
    use hotpot_bench::ycsb::{generator, lmdb::Lmdb, report, runner};
    const MAP_BYTES: usize = 256 << 20;
    println!("== YCSB on LMDB in node 1's mount: load {YCSB_RECORDS} records, run A and B");
    let db_dir = dir.join("n1").join("mnt").join("ycsb");
    std::fs::create_dir(&db_dir)?;
    let db = Lmdb::open(&db_dir, MAP_BYTES, false).map_err(|e| anyhow::anyhow!(e))?;
    runner::load(&db, YCSB_RECORDS).map_err(|e| anyhow::anyhow!("load: {e}"))?;
    let mut summary = YcsbSummary {
        ops_per_sec: [0.0; 2],
        errors: 0,
        verified: 0,
    };
    for (index, name) in ['a', 'b'].into_iter().enumerate() {
        let progress = ProgressBar::new(YCSB_OPERATIONS).with_style(
            ProgressStyle::with_template("  workload {prefix} {bar:40} {pos}/{len} ops {per_sec}")
                .expect("progress template"),
        );
        progress.set_prefix(name.to_ascii_uppercase().to_string());
        let workload = runner::Workload::core(name).expect("core workload");
        let (run_ms, operations) = runner::run(
            &db,
            workload,
            YCSB_RECORDS,
            YCSB_OPERATIONS,
            &runner::Pace {
                threads: 2,
                target_ops_per_sec: None,
                done: &|| progress.inc(1),
            },
        );
        progress.finish();
        print!("{}", report::render(run_ms, &operations));
        summary.ops_per_sec[index] = YCSB_OPERATIONS as f64 * 1000.0 / run_ms.max(1) as f64;
        summary.errors += operations.values().map(|stats| stats.errors).sum::<u64>();
    }
    drop(db);
    for node in [2, 3] {
        let reader = Lmdb::open(
            &dir.join(format!("n{node}")).join("mnt").join("ycsb"),
            MAP_BYTES,
            true,
        )
        .map_err(|e| anyhow::anyhow!("node {node}: {e}"))?;
        for number in 0..YCSB_RECORDS {
            let record = reader
                .get(generator::key_name(number).as_bytes())
                .map_err(|e| anyhow::anyhow!(e))?;
            if !record.as_deref().is_some_and(runner::well_formed) {
                bail!("record {number} is missing or damaged on node {node}");
            }
            summary.verified += 1;
        }
    }
    println!("  nodes 2 and 3 read all {YCSB_RECORDS} records of node 1's database");
    Ok(summary)
}

/// Read every committed page through `path`; returns how many are wrong.
fn verify(path: &std::path::Path, latest: &BTreeMap<u64, u32>) -> anyhow::Result<u64> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut buffer = [0u8; 4096];
    let mut bad = 0;
    for (page, commit) in latest {
        file.read_exact_at(&mut buffer, page * 4096)?;
        if buffer != stamp_page(*commit, *page) {
            bad += 1;
        }
    }
    Ok(bad)
}

fn stamp_page(commit: u32, page: u64) -> [u8; 4096] {
    let mut bytes = [0u8; 4096];
    for (index, word) in bytes.chunks_mut(8).enumerate() {
        let value = (u64::from(commit) << 40) ^ (page << 12) ^ index as u64;
        word.copy_from_slice(&value.to_le_bytes());
    }
    bytes
}

pub fn run(args: DemoArgs) -> anyhow::Result<()> {
    if args.commits == 0 || args.pages_per_commit == 0 {
        bail!("--commits and --pages-per-commit must be at least 1");
    }
    let dir = match args.dir {
        Some(dir) => dir,
        None => std::env::temp_dir().join(format!("hotpot-demo-{}", std::process::id())),
    };
    println!(
        "== hotpot demo: a 3-node cluster (replicas 2) in {}",
        dir.display()
    );
    cluster::up(cluster::UpArgs {
        nodes: 3,
        dir: dir.clone(),
        replicas: 2,
        mode: hotpot_core::proto::types::Mode::Mrsw,
        pm_size: 512 << 20,
        promote_after_ms: 10_000,
        merge_pages_per_s: crate::node::merger::DEFAULT_PAGES_PER_S,
        machine: false,
        transport: Default::default(),
    })?;
    let dir = dir.canonicalize()?;
    let _teardown = Teardown {
        dir: dir.clone(),
        keep: args.keep,
    };
    let ycsb = ycsb_phase(&dir)?;
    let path = dir.join("n1").join("mnt").join("orders");
    let file = std::fs::File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.set_len(DATASET_BYTES as u64)?;

    println!(
        "== {} commits of {} random pages each through mmap + msync(MS_SYNC)",
        args.commits, args.pages_per_commit
    );
    // SAFETY: mapping the file we just created, with its size.
    let map = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            DATASET_BYTES,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        )
    };
    if map == libc::MAP_FAILED {
        bail!("mmap: {}", std::io::Error::last_os_error());
    }
    let map = map as *mut u8;
    let progress = ProgressBar::new(u64::from(args.commits)).with_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} commits, {per_sec} {msg}")
            .expect("progress template"),
    );
    let mut latest: BTreeMap<u64, u32> = BTreeMap::new();
    let mut msync_ns = Histogram::<u64>::new(3)?;
    let mut rng = rand::rng();
    for commit in 1..=args.commits {
        for _ in 0..args.pages_per_commit {
            let page = rng.random_range(0..DATASET_PAGES);
            let bytes = stamp_page(commit, page);
            // SAFETY: the page is inside the mapping.
            unsafe {
                std::ptr::copy_nonoverlapping(bytes.as_ptr(), map.add(page as usize * 4096), 4096)
            };
            latest.insert(page, commit);
        }
        let start = Instant::now();
        // SAFETY: syncing our own mapping.
        if unsafe { libc::msync(map as *mut libc::c_void, DATASET_BYTES, libc::MS_SYNC) } != 0 {
            bail!("msync failed: {}", std::io::Error::last_os_error());
        }
        msync_ns.record(start.elapsed().as_nanos() as u64)?;
        progress.inc(1);
    }
    progress.finish_with_message("done");
    // SAFETY: unmapping what we mapped.
    unsafe { libc::munmap(map as *mut libc::c_void, DATASET_BYTES) };
    drop(file);

    let mount = |node: u32| dir.join(format!("n{node}")).join("mnt").join("orders");
    println!("== readers on nodes 2 and 3 check every committed page");
    let bad_on_readers = verify(&mount(2), &latest)? + verify(&mount(3), &latest)?;

    println!("== crash: SIGKILL node 1, restart it on its PM file");
    cluster::kill(&dir, 1, false)?;
    let restart = Instant::now();
    cluster::start_node(&dir, 1)?;
    let restart_time = restart.elapsed();

    println!("== verify every committed page after the restart, on nodes 1 and 3");
    let bad = verify(&mount(1), &latest)? + verify(&mount(3), &latest)?;
    crate::admin::stat(&path, None, false)?;
    println!();
    println!("report");
    println!(
        "  YCSB on LMDB (node 1)       A {:.0} ops/s, B {:.0} ops/s, {} errors; {} records read on nodes 2 and 3",
        ycsb.ops_per_sec[0], ycsb.ops_per_sec[1], ycsb.errors, ycsb.verified
    );
    println!("  commits acknowledged        {}", args.commits);
    println!("  pages committed (distinct)  {}", latest.len());
    println!(
        "  msync latency               p50 {:.1} us, p99 {:.1} us, max {:.1} us",
        msync_ns.value_at_quantile(0.5) as f64 / 1e3,
        msync_ns.value_at_quantile(0.99) as f64 / 1e3,
        msync_ns.max() as f64 / 1e3
    );
    println!(
        "  restart after SIGKILL       {:.0} ms (until the mount answered)",
        restart_time.as_secs_f64() * 1e3
    );
    println!(
        "  pages after crash (n1, n3)  {} of {}, {} wrong",
        2 * latest.len() as u64 - bad,
        2 * latest.len(),
        bad
    );
    println!(
        "  pages checked on nodes 2, 3  {} of {}, {} wrong",
        2 * latest.len() as u64 - bad_on_readers,
        2 * latest.len(),
        bad_on_readers
    );
    if bad + bad_on_readers != 0 {
        bail!("{} committed page reads were wrong", bad + bad_on_readers);
    }
    Ok(())
}
