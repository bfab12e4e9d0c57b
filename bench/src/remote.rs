//! The cluster measurements, all in one run on a 3-node cluster: a raw TCP 4 KiB
//! request/reply round trip (the network floor), a local and a remote read fault through the
//! mount, and MRSW commits of 1 and 32 pages to a remote owner with replicas 2 and 3.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Instant;

use hdrhistogram::Histogram;

use crate::cluster::LocalCluster;
use crate::latency::{fault_latency, fill, msync_latency, Map, Percentiles, FAULT_STRIDE_PAGES};

pub const CHUNK_PAGES: u64 = 1024;

#[derive(serde::Serialize, serde::Deserialize)]
struct Payload(#[serde(with = "serde_bytes")] Vec<u8>);

/// The same 4 KiB request and reply through hotpot-net (framing, request ids, a reader
/// thread per connection and a worker pool): what one protocol message costs, over TCP.
fn transport_round_trip(samples: u32) -> anyhow::Result<Percentiles> {
    rpc_round_trip(samples, Arc::new(hotpot_net::Tcp), |config| config)
}

/// `transport_round_trip` over any transport; `configure` sets up the server for it.
pub fn rpc_round_trip(
    samples: u32,
    transport: Arc<dyn hotpot_net::Transport>,
    configure: impl FnOnce(hotpot_net::ServerConfig) -> hotpot_net::ServerConfig,
) -> anyhow::Result<Percentiles> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let secret = hotpot_net::Secret::from_bytes(b"benchmark-secret-0123456789");
    let config = configure(hotpot_net::ServerConfig::tcp(secret.clone(), 4));
    let server = hotpot_net::Server::spawn_with(listener, config, |payload: Payload| payload)?;
    let client =
        hotpot_net::Client::with_transport(server.local_addr().to_string(), secret, transport);
    let mut histogram = Histogram::<u64>::new(3)?;
    for _ in 0..samples {
        let start = Instant::now();
        let reply: Payload = client.call(&Payload(vec![7u8; 4096]), hotpot_net::DEFAULT_TIMEOUT)?;
        histogram.record(start.elapsed().as_nanos() as u64)?;
        anyhow::ensure!(reply.0.len() == 4096, "short reply");
    }
    Ok(Percentiles::of(&histogram))
}

/// 4 KiB request, 4 KiB reply over loopback TCP with TCP_NODELAY, as the transport does.
fn raw_round_trip(samples: u32) -> anyhow::Result<Percentiles> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let server = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut stream, _) = listener.accept()?;
        stream.set_nodelay(true)?;
        let mut buffer = [0u8; 4096];
        for _ in 0..samples {
            stream.read_exact(&mut buffer)?;
            stream.write_all(&buffer)?;
        }
        Ok(())
    });
    let mut stream = TcpStream::connect(addr)?;
    stream.set_nodelay(true)?;
    let mut buffer = [7u8; 4096];
    let mut histogram = Histogram::<u64>::new(3)?;
    for _ in 0..samples {
        let start = Instant::now();
        stream.write_all(&buffer)?;
        stream.read_exact(&mut buffer)?;
        histogram.record(start.elapsed().as_nanos() as u64)?;
    }
    server.join().expect("echo thread")?;
    Ok(Percentiles::of(&histogram))
}

pub fn pages_of_chunk(owners: &[u64], owner: u64) -> anyhow::Result<Vec<u64>> {
    let chunk = owners
        .iter()
        .position(|node| *node == owner)
        .ok_or_else(|| anyhow::anyhow!("node {owner} owns no chunk"))? as u64;
    Ok((chunk * CHUNK_PAGES..(chunk + 1) * CHUNK_PAGES).collect())
}

const FAULTS_LEN: usize = 12 << 20;

/// A 12 MiB dataset "faults" with one copy per page, its node-3 chunk written on node 3:
/// node 3's open file and every `FAULT_STRIDE_PAGES`-th page of that chunk.
pub fn fault_dataset(cluster: &LocalCluster) -> anyhow::Result<(File, Vec<u64>)> {
    let owners = cluster.create("faults", "12MiB", "mrsw", 1)?;
    let owned_by_3 = pages_of_chunk(&owners, 3)?;
    let writer = File::options()
        .read(true)
        .write(true)
        .open(cluster.mount(3).join("faults"))?;
    fill(&Map::new(&writer, FAULTS_LEN)?, &owned_by_3)?;
    let strided = owned_by_3
        .iter()
        .copied()
        .step_by(FAULT_STRIDE_PAGES as usize)
        .collect();
    Ok((writer, strided))
}

pub struct ClusterResults {
    pub raw: Percentiles,
    pub transport: Percentiles,
    pub local_fault: Percentiles,
    pub remote_fault: Percentiles,
    /// (case, latency)
    pub commits: Vec<(String, Percentiles)>,
}

pub fn measure(cluster: &LocalCluster, rounds: u32) -> anyhow::Result<ClusterResults> {
    let raw = raw_round_trip(rounds)?;
    let transport = transport_round_trip(rounds)?;
    // Faults: read on node 3 (local, the owner) and on node 2 (remote: every fault a fetch).
    let len = FAULTS_LEN;
    let (writer, strided) = fault_dataset(cluster)?;
    let local_fault = fault_latency(&writer, len, &strided)?;
    let reader = File::open(cluster.mount(2).join("faults"))?;
    let remote_fault = fault_latency(&reader, len, &strided)?;
    // Commits from node 1: pages owned by node 2 (remote) or by node 1 itself (local).
    let mut commits = Vec::new();
    for mode in ["mrsw", "mrmw"] {
        for replicas in [1u8, 2, 3] {
            let name = format!("commits-{mode}-r{replicas}");
            let owners = cluster.create(&name, "12MiB", mode, replicas)?;
            let file = File::options()
                .read(true)
                .write(true)
                .open(cluster.mount(1).join(&name))?;
            let map = Map::new(&file, len)?;
            for owner in [2u64, 1] {
                let pages = pages_of_chunk(&owners, owner)?;
                fill(&map, &pages)?;
                let place = if owner == 1 { "local" } else { "remote" };
                let cases: &[(usize, usize, &str)] = if owner == 1 {
                    &[(1, 1, "1 page")]
                } else {
                    &[
                        (1, 1, "1 page"),
                        (32, 1024, "32 x 1 KiB"),
                        (256, 64, "256 pages"),
                    ]
                };
                for (dirty, area, what) in cases {
                    let samples = if *dirty > 32 { rounds / 10 } else { rounds };
                    let latency = msync_latency(&map, &pages, *dirty, *area, samples.max(10))?;
                    commits.push((format!("{mode} r{replicas} owner {place}: {what}"), latency));
                }
            }
        }
    }
    Ok(ClusterResults {
        raw,
        transport,
        local_fault,
        remote_fault,
        commits,
    })
}
