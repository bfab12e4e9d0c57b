//! TCP against verbs, in one run on one machine (issue 7's numbers): a 4 KiB hotpot-net RPC
//! over each transport; a remote read fault through the mount, fetched two-sided over TCP,
//! two-sided over verbs and one-sided over verbs; an MRSW commit of one page to a remote
//! owner (replicas 1) over each transport. Needs an RDMA device (`--rdma-dev`; this kernel
//! has none, so run it inside ../shared/tools/rxe-vm's guest) and a hotpot built with the
//! `verbs` feature. Under soft-RoCE and software emulation only the ratios mean anything.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use crate::cluster::LocalCluster;
use crate::latency::{fault_latency, fill, msync_latency, Map, Percentiles};
use crate::remote::{fault_dataset, pages_of_chunk, rpc_round_trip};

const LEN: usize = 12 << 20;

struct Row {
    name: String,
    latency: Percentiles,
}

/// Remote fault and 1-page commit latency on a 3-node cluster started with `args`.
fn on_cluster(
    hotpot: &Path,
    args: &[String],
    rounds: u32,
) -> anyhow::Result<(Percentiles, Percentiles)> {
    let cluster = LocalCluster::up_with_args(hotpot, 3, "256MiB", args)?;
    let (_, strided) = fault_dataset(&cluster)?;
    let reader = File::open(cluster.mount(2).join("faults"))?;
    // A first fault opens the connection (and, over verbs, learns what the owner exposes).
    fault_latency(&reader, LEN, &strided[..1])?;
    let fault = fault_latency(&reader, LEN, &strided[1..])?;
    let owners = cluster.create("commits", "12MiB", "mrsw", 1)?;
    let file = File::options()
        .read(true)
        .write(true)
        .open(cluster.mount(1).join("commits"))?;
    let map = Map::new(&file, LEN)?;
    let pages = pages_of_chunk(&owners, 2)?;
    fill(&map, &pages)?;
    let commit = msync_latency(&map, &pages, 1, 1, rounds)?;
    Ok((fault, commit))
}

pub fn run(hotpot: &Path, rounds: u32, device: &str, gid_index: Option<u8>) -> anyhow::Result<()> {
    let opened = hotpot_net::verbs::Device::open(device, gid_index)?;
    eprintln!("4 KiB RPCs");
    let rpc_tcp = rpc_round_trip(rounds, Arc::new(hotpot_net::Tcp), |config| config)?;
    let rpc_verbs = rpc_round_trip(
        rounds,
        Arc::new(hotpot_net::verbs::Verbs::new(opened.clone())),
        |mut config| {
            config.verbs = Some(opened.clone());
            config
        },
    )?;
    let mut verbs: Vec<String> = ["--transport", "verbs", "--rdma-dev", device]
        .iter()
        .map(|arg| arg.to_string())
        .collect();
    if let Some(index) = gid_index {
        verbs.extend(["--rdma-gid-index".to_string(), index.to_string()]);
    }
    let mut two_sided = verbs.clone();
    two_sided.push("--rdma-no-one-sided".into());
    eprintln!("cluster on tcp");
    let (fault_tcp, commit_tcp) = on_cluster(hotpot, &[], rounds)?;
    eprintln!("cluster on verbs, two-sided fetches");
    let (fault_two, commit_two) = on_cluster(hotpot, &two_sided, rounds)?;
    eprintln!("cluster on verbs, one-sided fetches");
    let (fault_one, commit_one) = on_cluster(hotpot, &verbs, rounds)?;
    let rows = [
        Row {
            name: "4 KiB RPC, tcp".into(),
            latency: rpc_tcp,
        },
        Row {
            name: "4 KiB RPC, verbs".into(),
            latency: rpc_verbs,
        },
        Row {
            name: "remote fault, tcp".into(),
            latency: fault_tcp,
        },
        Row {
            name: "remote fault, verbs two-sided".into(),
            latency: fault_two,
        },
        Row {
            name: "remote fault, verbs one-sided".into(),
            latency: fault_one,
        },
        Row {
            name: "1-page commit, tcp".into(),
            latency: commit_tcp,
        },
        Row {
            name: "1-page commit, verbs (two-sided fetch cluster)".into(),
            latency: commit_two,
        },
        Row {
            name: "1-page commit, verbs".into(),
            latency: commit_one,
        },
    ];
    println!("{:<48} {:>20}", "case", "p50 / p99 us");
    for row in &rows {
        println!("{:<48} {:>20}", row.name, row.latency.show());
    }
    let ratio = |a: usize, b: usize| rows[a].latency.p50 / rows[b].latency.p50;
    println!("ratio verbs/tcp 4 KiB RPC p50 {:.2}", ratio(1, 0));
    println!(
        "ratio verbs two-sided/tcp remote fault p50 {:.2}",
        ratio(3, 2)
    );
    println!(
        "ratio verbs one-sided/verbs two-sided remote fault p50 {:.2}",
        ratio(4, 3)
    );
    println!(
        "ratio verbs one-sided/tcp remote fault p50 {:.2}",
        ratio(4, 2)
    );
    println!("ratio verbs/tcp 1-page commit p50 {:.2}", ratio(7, 5));
    Ok(())
}
