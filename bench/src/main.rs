//! `hotpot-bench`: latency of a 4 KiB read fault and of msync(MS_SYNC) of 1 and 64 dirty
//! pages, through a hotpot mount (a 1-node cluster it starts and stops) and on tmpfs, side
//! by side. Prints p50/p99 per case and the hotpot/tmpfs ratios.

mod cluster;
mod latency;

use std::path::PathBuf;

use clap::Parser;

/// Measure hotpot's mount against tmpfs on this machine.
#[derive(Parser, Debug)]
#[command(name = "hotpot-bench")]
struct Args {
    /// The hotpot binary (build it with `cargo build --release -p hotpot-tools`).
    #[arg(long, default_value = "target/release/hotpot")]
    hotpot: PathBuf,
    /// Pages in the test file (each read-fault sample touches a different one).
    #[arg(long, default_value_t = 16384)]
    pages: u64,
    /// msync samples per case.
    #[arg(long, default_value_t = 2000)]
    rounds: u32,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if !args.hotpot.exists() {
        anyhow::bail!(
            "no hotpot binary at {} (run `cargo build --release -p hotpot-tools`, or pass --hotpot)",
            args.hotpot.display()
        );
    }
    let cluster = cluster::LocalCluster::up(&args.hotpot)?;
    let tmpfs = tempfile::Builder::new()
        .prefix("hotpot-bench-")
        .tempdir_in("/dev/shm")?;
    let targets = [
        ("hotpot", cluster.mount()),
        ("tmpfs", tmpfs.path().to_path_buf()),
    ];
    let mut rows = Vec::new();
    for (name, dir) in &targets {
        eprintln!("measuring {name} in {}", dir.display());
        rows.push((*name, latency::measure(dir, args.pages, args.rounds)?));
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
