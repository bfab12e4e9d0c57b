//! `hotpot-bench`: measurements of hotpot against baselines on this machine, printed as
//! tables with the ratios last.
//! - `local`: 4 KiB read fault and msync of 1 and 64 dirty pages, hotpot (1 node) vs tmpfs.
//! - `cluster`: raw TCP 4 KiB round trip vs remote read fault, and MRSW commits of 1 and 32
//!   pages with replicas 2 and 3, on a 3-node cluster.
//! - `recovery`: a node lost with its PM: time until it serves again and until every page has
//!   two copies again.

mod cluster;
mod latency;
mod recovery;
mod remote;
#[cfg(feature = "verbs")]
mod transport;
mod versions;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Measure hotpot against baselines on this machine.
#[derive(Parser, Debug)]
#[command(name = "hotpot-bench")]
struct Args {
    /// The hotpot binary (build it with `cargo build --release -p hotpot-tools`).
    #[arg(long, default_value = "target/release/hotpot", global = true)]
    hotpot: PathBuf,
    /// msync (and round-trip) samples per case.
    #[arg(long, default_value_t = 2000, global = true)]
    rounds: u32,
    #[command(subcommand)]
    command: Which,
}

#[derive(Subcommand, Debug)]
enum Which {
    /// hotpot on one node vs tmpfs: read fault, msync of 1 and 64 pages.
    Local {
        /// Pages in the test file (each read-fault sample touches a different one).
        #[arg(long, default_value_t = 16384)]
        pages: u64,
    },
    /// 3 nodes: raw TCP round trip vs remote fault; MRSW commit latency, replicas 2 and 3.
    Cluster,
    /// 3 nodes: lose node 2 with its PM file under a filled dataset; time its rebuild and
    /// the re-replication back to two copies of every page.
    Recovery {
        /// Dataset size in MiB (a multiple of 4).
        #[arg(long, default_value_t = 1024)]
        size_mib: u64,
    },
    /// Published versions: the producer's msync latency with 0, 1 and 4 observers pinning
    /// versions of a 64 MiB dataset (3 nodes); the identical-page merger's pages per CPU
    /// second (1 node, 8 identical 32 MiB datasets).
    Versions,
    /// TCP vs RDMA verbs: 4 KiB RPC, remote fault (two-sided and one-sided fetch), 1-page
    /// commit. Needs an RDMA device and a build with --features verbs (hotpot and this).
    Transport {
        /// RDMA device, e.g. rxe0.
        #[arg(long)]
        rdma_dev: String,
        /// GID index (default: the device's first IPv4-mapped GID).
        #[arg(long)]
        rdma_gid_index: Option<u8>,
    },
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if !args.hotpot.exists() {
        anyhow::bail!(
            "no hotpot binary at {} (run `cargo build --release -p hotpot-tools`, or pass --hotpot)",
            args.hotpot.display()
        );
    }
    match args.command {
        Which::Local { pages } => local(&args.hotpot, pages, args.rounds),
        Which::Cluster => cluster_run(&args.hotpot, args.rounds),
        Which::Recovery { size_mib } => recovery::run(&args.hotpot, size_mib << 20),
        Which::Versions => versions::run(&args.hotpot, args.rounds),
        #[cfg(feature = "verbs")]
        Which::Transport {
            rdma_dev,
            rdma_gid_index,
        } => transport::run(&args.hotpot, args.rounds, &rdma_dev, rdma_gid_index),
        #[cfg(not(feature = "verbs"))]
        Which::Transport { .. } => anyhow::bail!(
            "hotpot-bench was built without RDMA: cargo build --release -p hotpot-bench --features verbs"
        ),
    }
}

fn cluster_run(hotpot: &std::path::Path, rounds: u32) -> anyhow::Result<()> {
    let cluster = cluster::LocalCluster::up(hotpot, 3)?;
    eprintln!("measuring on 3 nodes");
    let result = remote::measure(&cluster, rounds)?;
    println!("{:<40} {:>20}", "case", "p50 / p99 us");
    println!(
        "{:<40} {:>20}",
        "raw TCP 4 KiB round trip",
        result.raw.show()
    );
    println!(
        "{:<40} {:>20}",
        "hotpot-net 4 KiB RPC round trip",
        result.transport.show()
    );
    println!(
        "{:<40} {:>20}",
        "read fault, local owner",
        result.local_fault.show()
    );
    println!(
        "{:<40} {:>20}",
        "read fault, remote owner",
        result.remote_fault.show()
    );
    for (case, latency) in &result.commits {
        println!("{:<40} {:>20}", format!("commit {case}"), latency.show());
    }
    let floor = result.raw.p50 + result.local_fault.p50;
    println!(
        "ratio remote-fault/(raw-rtt+local-fault) p50 {:.2}",
        result.remote_fault.p50 / floor
    );
    println!(
        "ratio hotpot-net-rpc/raw-rtt p50 {:.2}",
        result.transport.p50 / result.raw.p50
    );
    let p50 = |case: &str| {
        result
            .commits
            .iter()
            .find(|(name, _)| name == case)
            .map(|(_, latency)| latency.p50)
    };
    for (case, latency) in &result.commits {
        if case.ends_with("owner remote: 1 page") {
            println!(
                "ratio commit-1p/raw-rtt {case} p50 {:.2}",
                latency.p50 / result.raw.p50
            );
        }
        if let Some(rest) = case.strip_prefix("mrmw ") {
            if let Some(mrsw) = p50(&format!("mrsw {rest}")) {
                println!("ratio mrmw/mrsw {rest} p50 {:.2}", latency.p50 / mrsw);
            }
        }
    }
    Ok(())
}

fn local(hotpot: &std::path::Path, pages: u64, rounds: u32) -> anyhow::Result<()> {
    let cluster = cluster::LocalCluster::up(hotpot, 1)?;
    let tmpfs = tempfile::Builder::new()
        .prefix("hotpot-bench-")
        .tempdir_in("/dev/shm")?;
    let targets = [
        ("hotpot", cluster.mount(1)),
        ("tmpfs", tmpfs.path().to_path_buf()),
    ];
    let mut rows = Vec::new();
    for (name, dir) in &targets {
        eprintln!("measuring {name} in {}", dir.display());
        rows.push((*name, latency::measure(dir, pages, rounds)?));
    }
    println!(
        "{:<8} {:>22} {:>22} {:>22}",
        "target", "read fault p50/p99 us", "msync 1 p50/p99 us", "msync 64 p50/p99 us"
    );
    for (name, result) in &rows {
        println!(
            "{:<8} {:>22} {:>22} {:>22}",
            name,
            result.fault.show(),
            result.msync_1.show(),
            result.msync_64.show()
        );
    }
    let (hotpot, tmpfs) = (&rows[0].1, &rows[1].1);
    println!(
        "ratio hotpot/tmpfs read-fault-p50 {:.2}",
        hotpot.fault.p50 / tmpfs.fault.p50
    );
    println!(
        "ratio hotpot/tmpfs msync-1-p50 {:.2}",
        hotpot.msync_1.p50 / tmpfs.msync_1.p50
    );
    println!(
        "ratio hotpot/tmpfs msync-64-p50 {:.2}",
        hotpot.msync_64.p50 / tmpfs.msync_64.p50
    );
    Ok(())
}
