//! A small YCSB run (LMDB in write-map mode) on node 1's mount of a live 3-node cluster:
//! every operation succeeds and another node reads every loaded record.

use std::process::Command;

use hotpot_bench::ycsb::lmdb::Lmdb;
use hotpot_bench::ycsb::{generator, report, runner};
use hotpot_tests::*;

const RECORDS: u64 = 1_000;
const MAP_BYTES: usize = 64 << 20;

#[test]
fn a_ycsb_run_on_the_cluster_completes_without_errors_and_verifies_on_another_node() {
    if !fuse_available() {
        return;
    }
    let cluster = Cluster::up(3, "512MiB");
    let db_dir = cluster.mount(1).join("ycsb");
    std::fs::create_dir(&db_dir).unwrap();
    let db = Lmdb::open(&db_dir, MAP_BYTES, false).unwrap();
    let loaded = runner::load(&db, RECORDS).unwrap();
    assert_eq!(loaded["INSERT"].ok, RECORDS);
    for name in ['a', 'd', 'e', 'f'] {
        let workload = runner::Workload::core(name).unwrap();
        let (run_ms, operations) = runner::run(
            &db,
            workload,
            RECORDS,
            600,
            &runner::Pace {
                threads: 2,
                target_ops_per_sec: None,
                done: &|| {},
            },
        );
        let text = report::render(run_ms, &operations);
        println!("workload {name}:\n{text}");
        let errors: u64 = operations.values().map(|stats| stats.errors).sum();
        assert_eq!(errors, 0, "workload {name} had errors:\n{text}");
        let done: u64 = operations.values().map(|stats| stats.ok).sum();
        assert_eq!(done, 600, "workload {name} ran every operation");
        report::parse(&text).expect("the report parses");
    }
    // A target rate holds the run to it: 200 operations at 1,000 ops/s take ≥ 0.2 s.
    let started = std::time::Instant::now();
    let pace = runner::Pace {
        threads: 2,
        target_ops_per_sec: Some(1_000.0),
        done: &|| {},
    };
    runner::run(
        &db,
        runner::Workload::core('c').unwrap(),
        RECORDS,
        200,
        &pace,
    );
    assert!(
        started.elapsed() >= std::time::Duration::from_millis(190),
        "the target rate paced the run"
    );
    drop(db);
    // Node 2 opens the same files read-only: every loaded record is there and well formed.
    let _ = Command::new("sync").status();
    let reader = Lmdb::open(&cluster.mount(2).join("ycsb"), MAP_BYTES, true).unwrap();
    assert!(reader.len().unwrap() >= RECORDS);
    for number in 0..RECORDS {
        let record = reader.get(generator::key_name(number).as_bytes()).unwrap();
        assert!(
            record.as_deref().is_some_and(runner::well_formed),
            "record {number} on node 2"
        );
    }
}
