//! lock_races (after the published DSM correctness test): 3 nodes, 4 shared counters in 2
//! pages of one MRMW dataset, each guarded by its own lock; every node performs 3,000 random
//! operations (add, nested-lock moves between two counters, reads) that store and msync
//! inside the critical section and keep private tallies. At the end every node's view of
//! every counter equals the sum of all nodes' tallies for it.

use rand::{Rng, SeedableRng};

use hotpot_tests::*;

const OPERATIONS: u32 = 3_000;
/// Counter i lives at this byte offset: two counters per page, in different bytes.
const OFFSETS: [usize; 4] = [0, 2048, 4096, 6144];

fn read_counter(map: &mut Mapping, counter: usize) -> i64 {
    let at = OFFSETS[counter];
    i64::from_le_bytes(map.bytes()[at..at + 8].try_into().unwrap())
}

fn write_counter(map: &mut Mapping, counter: usize, value: i64) {
    let at = OFFSETS[counter];
    map.bytes()[at..at + 8].copy_from_slice(&value.to_le_bytes());
}

#[test]
fn shared_counters_equal_the_private_tallies_on_every_node() {
    if !fuse_available() {
        return;
    }
    let cluster = Cluster::up(3, "256MiB");
    cluster.create(1, "counters", "8KiB", "mrmw", 2);
    let secret = hotpot_net::Secret::load(&cluster.secret_file()).unwrap();
    let dispatcher = cluster.dispatcher_addr();
    let tallies: Vec<[i64; 4]> = std::thread::scope(|scope| {
        let workers: Vec<_> = (1..=3u32)
            .map(|node| {
                let secret = secret.clone();
                let dispatcher = dispatcher.clone();
                let path = cluster.mount(node).join("counters");
                let cluster = &cluster;
                scope.spawn(move || {
                    let coordinator =
                        hotpot_client::Coordinator::connect(&dispatcher, secret, node, 0);
                    let file = std::fs::File::options()
                        .read(true)
                        .write(true)
                        .open(&path)
                        .unwrap();
                    let mut map = Mapping::new(&file, 8192);
                    let mut rng = rand::rngs::StdRng::seed_from_u64(u64::from(node) * 7919);
                    let mut tally = [0i64; 4];
                    coordinator.barrier("start", 3).unwrap();
                    for operation in 0..OPERATIONS {
                        match rng.random_range(0..3) {
                            0 => {
                                let counter = rng.random_range(0..4);
                                let delta = rng.random_range(-5..=5i64);
                                let _lock = coordinator.lock(&format!("c{counter}")).unwrap();
                                let value = read_counter(&mut map, counter);
                                write_counter(&mut map, counter, value + delta);
                                map.msync().unwrap_or_else(|e| {
                                    panic!(
                                        "node {node} op {operation}: {e}\n{}",
                                        tail(cluster, node)
                                    )
                                });
                                tally[counter] += delta;
                            }
                            1 => {
                                let from = rng.random_range(0..4);
                                let to = (from + rng.random_range(1..4)) % 4;
                                let amount = rng.random_range(1..=3i64);
                                // Nested locks, always in counter order.
                                let (first, second) = (from.min(to), from.max(to));
                                let _outer = coordinator.lock(&format!("c{first}")).unwrap();
                                let _inner = coordinator.lock(&format!("c{second}")).unwrap();
                                let taken = read_counter(&mut map, from);
                                let given = read_counter(&mut map, to);
                                write_counter(&mut map, from, taken - amount);
                                write_counter(&mut map, to, given + amount);
                                map.msync().unwrap_or_else(|e| {
                                    panic!(
                                        "node {node} op {operation}: {e}\n{}",
                                        tail(cluster, node)
                                    )
                                });
                                tally[from] -= amount;
                                tally[to] += amount;
                            }
                            _ => {
                                let counter = rng.random_range(0..4);
                                let _lock = coordinator.lock(&format!("c{counter}")).unwrap();
                                let _ = read_counter(&mut map, counter);
                            }
                        }
                    }
                    coordinator.barrier("done", 3).unwrap();
                    tally
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|worker| worker.join().expect("worker"))
            .collect()
    });
    let expected: Vec<i64> = (0..4)
        .map(|counter| tallies.iter().map(|t| t[counter]).sum())
        .collect();
    println!("counters expected from tallies: {expected:?}");
    for node in 1..=3u32 {
        let file = std::fs::File::open(cluster.mount(node).join("counters")).unwrap();
        let mut map = Mapping::new_read_only(&file, 8192);
        let seen: Vec<i64> = (0..4)
            .map(|counter| read_counter(&mut map, counter))
            .collect();
        assert_eq!(seen, expected, "node {node}'s view of the counters");
        assert_eq!(seen.iter().sum::<i64>(), expected.iter().sum::<i64>());
    }
}

/// The last lines of a node's log, for a failure message.
fn tail(cluster: &Cluster, node: u32) -> String {
    let log = cluster.node_log(node);
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}
