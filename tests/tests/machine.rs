//! `hotpot node --machine`: nodes running the node machine (the protocol `hotpot-sim`
//! checks) as their daemon. What a program sees must be what it sees on thread-based nodes:
//! an msync's bytes at once through other nodes' mappings (the machine's invalidation
//! ordering), concurrent MRMW writers' bytes merged, and every acknowledged commit kept
//! across a kill -9 and restart of an owner. And a cluster is one protocol or the other: a
//! thread-based node refuses a machine's call, saying why. (`HOTPOT_TEST_MACHINE=1` runs
//! every process test without fault points against the machine; see README.)

use std::os::unix::fs::FileExt;
use std::sync::{Arc, Barrier};

use hotpot_core::proto::messages::{NodeReply, NodeRequest};
use hotpot_core::proto::types::FsError;
use hotpot_tests::*;

const MACHINE: &[&str] = &["--machine"];

/// Three pages of `path` in three chunks (three owners), stamped with `round`.
fn stamp_pages(map: &mut Mapping, pages: &[u64], round: u64) {
    for page in pages {
        let at = *page as usize * 4096;
        map.bytes()[at..at + 4096].copy_from_slice(&page_pattern(round, *page));
    }
}

#[test]
fn machine_nodes_keep_commits_coherent_merged_and_across_kill_9() {
    if !fuse_available() {
        return;
    }
    let cluster = Cluster::up_with(3, "256MiB", &[], MACHINE);
    cluster.wait_views_settled();

    // MRSW: each msync on node 1 is seen at once through node 2's mapping.
    let path = cluster.create_chunked(1, "coherent", "192KiB", "mrsw", 2, "64KiB");
    let owners = cluster.chunk_owners(&path);
    let writer_file = cluster.open_rw(1, "coherent");
    let mut writer = Mapping::new(&writer_file, 192 << 10);
    let reader_file = std::fs::File::open(cluster.mount(2).join("coherent")).unwrap();
    let reader = Mapping::new_read_only(&reader_file, 192 << 10);
    let probes = [1u64, 16 + 2, 32 + 3];
    for round in 1..=30u64 {
        stamp_pages(&mut writer, &probes, round);
        writer.msync().expect("msync returns 0");
        for page in probes {
            assert!(
                reader.page(page as usize) == page_pattern(round, page),
                "round {round}: node 2's mapping of page {page} (owner {}) is stale",
                owners[(page / 16) as usize]
            );
        }
    }

    // MRMW: three nodes write their thirds of the same pages at once; all three stay.
    cluster.create(1, "merged", "16KiB", "mrmw", 2);
    let third = 4096 / 3;
    let rounds = 20u32;
    let barrier = Arc::new(Barrier::new(3));
    std::thread::scope(|scope| {
        for node in 1..=3u32 {
            let (barrier, cluster) = (barrier.clone(), &cluster);
            scope.spawn(move || {
                let mut map = Mapping::new(&cluster.open_rw(node, "merged"), 16 << 10);
                for round in 1..=rounds {
                    for page in 0..4 {
                        let start = page * 4096 + (node as usize - 1) * third;
                        map.bytes()[start..start + third].fill(round as u8 + node as u8);
                    }
                    barrier.wait();
                    map.msync()
                        .unwrap_or_else(|error| panic!("node {node} round {round}: {error}"));
                }
            });
        }
    });
    let merged_right = |node: u32| {
        let bytes = std::fs::read(cluster.mount(node).join("merged")).unwrap();
        (0..4).all(|page| {
            (0..3).all(|writer| {
                let start = page * 4096 + writer * third;
                bytes[start..start + third]
                    .iter()
                    .all(|byte| *byte == rounds as u8 + writer as u8 + 1)
            })
        })
    };
    for node in 1..=3 {
        assert!(merged_right(node), "node {node} lost a writer's third");
    }

    // Kill -9 an owner and start it again: every acknowledged commit is there, on every
    // node, and every page is back at its replica count.
    let killed = owners[1] as u32;
    cluster.kill(killed);
    cluster.start(killed);
    for node in 1..=3u32 {
        let file = std::fs::File::open(cluster.mount(node).join("coherent")).unwrap();
        let mut page = vec![0u8; 4096];
        for probe in probes {
            file.read_exact_at(&mut page, probe * 4096).unwrap();
            assert!(
                page == page_pattern(30, probe),
                "after node {killed}'s restart, node {node} reads page {probe} wrong"
            );
        }
        assert!(
            merged_right(node),
            "after node {killed}'s restart, node {node}"
        );
    }
    let stat = cluster.stat_json(&path);
    assert_eq!(stat["pages_committed"], probes.len(), "{stat}");
    assert!(stat["min_copies"].as_u64().unwrap() >= 2, "{stat}");
}

#[test]
fn a_thread_based_node_refuses_a_node_machines_call() {
    if !fuse_available() {
        return;
    }
    if !protocol_args().is_empty() {
        println!("HOTPOT_TEST_MACHINE=1: every cluster runs the node machine, nothing to refuse");
        return;
    }
    let cluster = Cluster::up(1, "64MiB");
    let addr = cluster.info()["nodes"][0]["addr"]
        .as_str()
        .expect("node address")
        .to_string();
    let secret = hotpot_net::Secret::load(&cluster.secret_file()).unwrap();
    let client = hotpot_net::Client::new(addr, secret);
    let call = NodeRequest::Call {
        from: 2,
        call: 1,
        request: Box::new(NodeRequest::PinnedVersions { dataset: 1 }),
    };
    let reply: NodeReply = client
        .call(&call, std::time::Duration::from_secs(5))
        .expect("an answer");
    match reply {
        NodeReply::Failed(FsError::Invalid(why)) => assert!(
            why.contains("--machine") && why.contains("every node of a cluster"),
            "{why}"
        ),
        other => panic!("a machine's call answered {other:?}"),
    }
}
