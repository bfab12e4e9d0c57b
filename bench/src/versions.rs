//! `hotpot-bench versions`: the producer's msync latency with 0, 1 and 4 observers pinning
//! published versions (TCASM's promise: observers never slow the producer), and the
//! identical-page merger's throughput per CPU second.

use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;
use rand::seq::IndexedRandom;

use crate::cluster::LocalCluster;
use crate::latency::{Map, Percentiles};

const SIZE: usize = 64 << 20;
const PAGES: usize = SIZE / 4096;
/// 1% of the pages per version, as in the producer.
const PAGES_PER_VERSION: usize = PAGES / 100;

pub fn run(hotpot: &Path, rounds: u32) -> anyhow::Result<()> {
    producer(hotpot, rounds)?;
    merger(hotpot)
}

fn commit_round(map: &Map, pages: &[usize], round: u64) -> anyhow::Result<Duration> {
    let mut rng = rand::rng();
    for page in pages.choose_multiple(&mut rng, PAGES_PER_VERSION) {
        // SAFETY: inside the mapping.
        unsafe {
            std::ptr::write_volatile(map.ptr().add(page * 4096) as *mut u64, round);
        }
    }
    let started = Instant::now();
    map.msync()?;
    Ok(started.elapsed())
}

fn producer(hotpot: &Path, rounds: u32) -> anyhow::Result<()> {
    let cluster = LocalCluster::up_with_args(
        hotpot,
        3,
        "1GiB",
        &["--merge-pages-per-s".into(), "0".into()],
    )?;
    cluster.create("data", "64MiB", "mrsw", 2)?;
    let file = File::options()
        .read(true)
        .write(true)
        .open(cluster.mount(1).join("data"))?;
    let map = Map::new(&file, SIZE)?;
    // Every page once, so each version replaces existing frames.
    for page in 0..PAGES {
        // SAFETY: inside the mapping.
        unsafe { std::ptr::write_volatile(map.ptr().add(page * 4096), 1u8) };
    }
    map.msync()?;
    let pages: Vec<usize> = (0..PAGES).collect();
    let mut round = 1u64;
    println!(
        "producer on node 1: msync of {PAGES_PER_VERSION} random pages of a 64 MiB MRSW dataset \
         (3 nodes, replicas 2), {rounds} versions per case"
    );
    println!(
        "{:<34} {:>20} {:>14}",
        "case", "p50 / p99 us", "frames kept"
    );
    let mut baseline = None;
    for observers in [0usize, 1, 4] {
        // Each observer pins its own version (a commit between two opens), on nodes 2 and 3,
        // and reads it whole once.
        let mut views = Vec::new();
        for index in 0..observers {
            let node = 2 + (index % 2) as u32;
            let mut view = File::open(cluster.mount(node).join(".versions/data@latest"))
                .context("opening a view")?;
            let mut image = Vec::with_capacity(SIZE);
            view.read_to_end(&mut image)?;
            views.push(view);
            commit_round(&map, &pages, round)?;
            round += 1;
        }
        let mut histogram = Histogram::<u64>::new(3)?;
        for _ in 0..rounds {
            let took = commit_round(&map, &pages, round)?;
            histogram.record(took.as_nanos() as u64)?;
            round += 1;
        }
        let kept = frames_kept(&cluster)?;
        let latency = Percentiles::of(&histogram);
        println!(
            "{:<34} {:>20} {:>14}",
            format!("{observers} observers pinning"),
            latency.show(),
            kept
        );
        match baseline {
            None => baseline = Some(latency.p50),
            Some(none) => println!(
                "ratio {observers} observers / none, p50: {:.2}",
                latency.p50 / none
            ),
        }
        drop(views);
    }
    Ok(())
}

/// Frames kept for views on every node, from the heartbeats.
fn frames_kept(cluster: &LocalCluster) -> anyhow::Result<u64> {
    std::thread::sleep(Duration::from_millis(1200));
    let dir = cluster.dir().to_string_lossy().to_string();
    let status: serde_json::Value =
        serde_json::from_str(&cluster.hotpot(&["status", "--json", "--dir", &dir])?)?;
    Ok(status["nodes"]
        .as_array()
        .map(|nodes| {
            nodes
                .iter()
                .filter_map(|node| node["usage"]["versions"]["frames_kept"].as_u64())
                .sum()
        })
        .unwrap_or(0))
}

/// CPU seconds (user + system) the process `pid` has used.
fn cpu_seconds(pid: u64) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after_name = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .context("malformed /proc stat")?;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // Fields 14 and 15 of stat (utime, stime), counted after the name's ')'.
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(ticks as f64 / per_second)
}

/// (pages scanned, pages merged, frames saved) of node 1.
fn merger_counts(cluster: &LocalCluster) -> anyhow::Result<(u64, u64, u64)> {
    let dir = cluster.dir().to_string_lossy().to_string();
    let status: serde_json::Value =
        serde_json::from_str(&cluster.hotpot(&["status", "--json", "--dir", &dir])?)?;
    let sharing = &status["nodes"][0]["usage"]["sharing"];
    Ok((
        sharing["pages_scanned"].as_u64().unwrap_or(0),
        sharing["pages_merged"].as_u64().unwrap_or(0),
        sharing["bytes_saved"].as_u64().unwrap_or(0) / 4096,
    ))
}

fn merger(hotpot: &Path) -> anyhow::Result<()> {
    const DATASETS: usize = 8;
    const DATASET_SIZE: usize = 32 << 20;
    let cluster = LocalCluster::up_with_args(
        hotpot,
        1,
        "1GiB",
        &[
            "--replicas".into(),
            "1".into(),
            "--merge-pages-per-s".into(),
            "0".into(),
        ],
    )?;
    // Written with merging off, then one node restarted with an unbounded merger.
    let contents: Vec<u8> = (0..DATASET_SIZE / 8)
        .flat_map(|word| (word as u64).to_le_bytes())
        .collect();
    for index in 0..DATASETS {
        cluster.create(&format!("copy{index}"), "32MiB", "mrsw", 1)?;
        let mut file = File::options()
            .write(true)
            .open(cluster.mount(1).join(format!("copy{index}")))?;
        file.write_all(&contents)?;
        file.sync_all()?;
    }
    let dir = cluster.dir().to_string_lossy().to_string();
    cluster.hotpot(&["cluster", "kill", "--node", "1", "--dir", &dir])?;
    let cluster_file: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        cluster.dir().join("cluster.json"),
    )?)?;
    let mut node_args: Vec<String> = cluster_file["node_args"]
        .as_array()
        .context("cluster.json has no node_args")?
        .iter()
        .filter_map(|arg| arg.as_str().map(str::to_string))
        .collect();
    let rate_at = node_args
        .iter()
        .position(|arg| arg == "--merge-pages-per-s")
        .context("cluster.json has no --merge-pages-per-s")?;
    node_args[rate_at + 1] = "100000000".into();
    let mut patched = cluster_file.clone();
    patched["node_args"] = serde_json::json!(node_args);
    std::fs::write(
        cluster.dir().join("cluster.json"),
        serde_json::to_string_pretty(&patched)?,
    )?;
    cluster.hotpot(&["cluster", "start-node", "--node", "1", "--dir", &dir])?;
    let cluster_file: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        cluster.dir().join("cluster.json"),
    )?)?;
    let pid = cluster_file["nodes"][0]["pid"]
        .as_u64()
        .context("no pid of node 1")?;
    let pages = (DATASETS * DATASET_SIZE / 4096) as u64;
    let (cpu_start, started) = (cpu_seconds(pid)?, Instant::now());
    let (scanned_start, _, _) = merger_counts(&cluster)?;
    // The first round merges; then rounds only hash (a second's pause between rounds).
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        std::thread::sleep(Duration::from_millis(500));
        let (scanned, merged, saved) = merger_counts(&cluster)?;
        if scanned >= scanned_start + 3 * pages {
            let cpu = cpu_seconds(pid)? - cpu_start;
            println!(
                "merger: {} pages scanned ({merged} merged, {saved} frames saved) in {:.1} s, \
                 {:.2} CPU s of the node: {:.0} pages per CPU second",
                scanned - scanned_start,
                started.elapsed().as_secs_f64(),
                cpu,
                (scanned - scanned_start) as f64 / cpu
            );
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the merger scanned {scanned} pages in 120 s"
        );
    }
}
