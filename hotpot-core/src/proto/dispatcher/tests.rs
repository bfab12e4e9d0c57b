//! The dispatcher's state machine under test: namespace rules, owners, leases, locks.

use super::*;
use DispatcherRequest as R;

fn params() -> DatasetParams {
    DatasetParams {
        mode: Mode::Mrmw,
        replicas: 2,
        chunk_pages: DEFAULT_CHUNK_PAGES,
    }
}

fn attr(reply: DispatcherReply) -> Attr {
    match reply {
        DispatcherReply::Attr(attr) => attr,
        other => panic!("expected attr, got {other:?}"),
    }
}

fn create(state: &mut DispatcherState, parent: Ino, name: &str) -> DispatcherReply {
    state
        .handle(
            R::Create {
                parent,
                name: name.into(),
                mode: 0o644,
                uid: 0,
                gid: 0,
                size: 0,
                params: None,
                exclusive: true,
            },
            0,
            0,
        )
        .0
}

fn joined(nodes: u32) -> DispatcherState {
    let mut state = DispatcherState::new(7, params(), 0);
    for node in 1..=nodes {
        state.handle(
            R::Join {
                node,
                addr: format!("127.0.0.1:{node}"),
                mount: String::new(),
                pm_cluster: None,
            },
            0,
            0,
        );
    }
    state
}

#[test]
fn create_assigns_owners_round_robin_over_live_nodes() {
    let mut state = joined(3);
    let file = attr(create(&mut state, ROOT_INO, "a"));
    let dataset = file.dataset.unwrap();
    let owners: Vec<NodeId> = (0..6).map(|chunk| dataset.owner_of_chunk(chunk)).collect();
    assert_eq!(owners[0..3], owners[3..6]);
    let mut sorted = owners[0..3].to_vec();
    sorted.sort();
    assert_eq!(sorted, vec![1, 2, 3]);
}

#[test]
fn join_with_a_pm_file_of_another_cluster_is_refused() {
    let mut state = joined(0);
    let join = |pm_cluster| R::Join {
        node: 1,
        addr: "a".into(),
        mount: "m".into(),
        pm_cluster,
    };
    let (reply, changed) = state.handle(join(Some(8)), 0, 0);
    assert!(matches!(
        reply,
        DispatcherReply::Failed(FsError::Invalid(_))
    ));
    assert!(!changed);
    let (reply, _) = state.handle(join(Some(7)), 0, 0);
    assert_eq!(
        reply,
        DispatcherReply::Joined {
            cluster_id: 7,
            incarnation: 1
        }
    );
    let (reply, changed) = state.handle(join(Some(7)), 0, 0);
    assert!(changed, "a join is persisted (its incarnation)");
    assert_eq!(
        reply,
        DispatcherReply::Joined {
            cluster_id: 7,
            incarnation: 2
        }
    );
}

#[test]
fn version_blocks_never_repeat_and_the_first_belongs_to_the_first_home() {
    let mut state = joined(2);
    let (reply, _) = state.handle(
        R::Create {
            parent: ROOT_INO,
            name: "d".into(),
            mode: 0o644,
            uid: 0,
            gid: 0,
            size: 4096,
            params: None,
            exclusive: true,
        },
        0,
        0,
    );
    let DispatcherReply::Attr(attr) = reply else {
        panic!("create: {reply:?}")
    };
    let dataset = attr.dataset.expect("a dataset");
    let (home, incarnation) = dataset.first_home.expect("a first home");
    assert_eq!(home, dataset.owners[0]);
    assert_eq!(incarnation, 1);
    let mut starts = Vec::new();
    for _ in 0..3 {
        let (reply, changed) = state.handle(
            R::VersionBlock {
                dataset: dataset.id,
                node: home,
            },
            0,
            0,
        );
        assert!(changed, "a granted block is persisted before the reply");
        let DispatcherReply::VersionBlock { start } = reply else {
            panic!("version block: {reply:?}")
        };
        starts.push(start);
    }
    let block = crate::proto::dispatcher::VERSION_BLOCK;
    assert_eq!(starts, vec![1 + block, 1 + 2 * block, 1 + 3 * block]);
}

#[test]
fn one_node_at_a_time_holds_a_write_lease() {
    let mut state = joined(2);
    let acquire = |node, open| R::AcquireLease {
        dataset: 5,
        node,
        open,
    };
    let release = |node, open| R::ReleaseLease {
        dataset: 5,
        node,
        open,
    };
    assert_eq!(
        state.handle(acquire(1, 10), 0, 0),
        (DispatcherReply::Done, true)
    );
    // The same open asking again (a duplicate) changes nothing.
    assert_eq!(
        state.handle(acquire(1, 10), 0, 0),
        (DispatcherReply::Done, false)
    );
    // Its holder takes it again for another open.
    assert_eq!(
        state.handle(acquire(1, 11), 0, 0),
        (DispatcherReply::Done, true)
    );
    let (reply, _) = state.handle(acquire(2, 20), 0, 0);
    assert!(
        matches!(reply, DispatcherReply::Failed(FsError::Busy(ref why)) if why.contains("node 1"))
    );
    // The first open's release, arriving after the second open took it: the lease stays.
    assert_eq!(
        state.handle(release(1, 10), 0, 0),
        (DispatcherReply::Done, false)
    );
    assert!(matches!(
        state.handle(acquire(2, 20), 0, 0).0,
        DispatcherReply::Failed(FsError::Busy(_))
    ));
    assert_eq!(
        state.handle(release(1, 11), 0, 0),
        (DispatcherReply::Done, true)
    );
    assert_eq!(
        state.handle(acquire(2, 20), 0, 0),
        (DispatcherReply::Done, true)
    );
    // A holder that stops heartbeating loses the lease.
    state.handle(
        R::Heartbeat {
            node: 1,
            usage: NodeUsage::default(),
        },
        10_000,
        0,
    );
    let late = NODE_TIMEOUT_MS + 20_000;
    state.handle(
        R::Heartbeat {
            node: 1,
            usage: NodeUsage::default(),
        },
        late,
        0,
    );
    assert_eq!(
        state.handle(acquire(1, 12), late, 0),
        (DispatcherReply::Done, true)
    );
    // Node 2's late release changes nothing.
    assert_eq!(
        state.handle(release(2, 20), late, 0),
        (DispatcherReply::Done, false)
    );
}

#[test]
fn an_mrsw_datasets_version_blocks_go_to_its_lease_holder_only() {
    let mut state = joined(2);
    let (reply, _) = state.handle(
        R::Create {
            parent: ROOT_INO,
            name: "single-writer".into(),
            mode: 0o644,
            uid: 0,
            gid: 0,
            size: 4096,
            params: Some(DatasetParams {
                mode: Mode::Mrsw,
                ..params()
            }),
            exclusive: true,
        },
        0,
        0,
    );
    let dataset = attr(reply).dataset.expect("a dataset").id;
    let block = |state: &mut DispatcherState, node, now_ms| {
        state.handle(R::VersionBlock { dataset, node }, now_ms, 0).0
    };
    let refused_naming = |reply: DispatcherReply, why: &str| matches!(reply, DispatcherReply::Failed(FsError::Busy(ref said)) if said.contains(why));
    // Nobody writes it yet: nobody takes its versions.
    assert!(refused_naming(block(&mut state, 1, 0), "nobody holds"));
    let acquire = |node, open| R::AcquireLease {
        dataset,
        node,
        open,
    };
    assert_eq!(
        state.handle(acquire(1, 10), 0, 0),
        (DispatcherReply::Done, true)
    );
    assert!(matches!(
        block(&mut state, 1, 0),
        DispatcherReply::VersionBlock { .. }
    ));
    assert!(refused_naming(block(&mut state, 2, 0), "node 1 holds"));
    // Node 1 goes silent and node 2 takes the lease: node 1, still writing, gets no more
    // versions (they would be above node 2's).
    let late = NODE_TIMEOUT_MS + 1_000;
    beat(&mut state, 2, late);
    assert_eq!(
        state.handle(acquire(2, 20), late, 0),
        (DispatcherReply::Done, true)
    );
    let DispatcherReply::VersionBlock { start } = block(&mut state, 2, late) else {
        panic!("the new writer gets its block")
    };
    assert!(refused_naming(block(&mut state, 1, late), "node 2 holds"));
    // The refusal took no versions: the next block follows the new writer's.
    let DispatcherReply::VersionBlock { start: next } = block(&mut state, 2, late) else {
        panic!("the new writer gets a spare")
    };
    assert_eq!(next, start + VERSION_BLOCK);
    // Unlinked (still open on its writer's node, where the name went), it takes blocks as
    // any dataset no name refers to.
    let removed = state.handle(
        R::Unlink {
            parent: ROOT_INO,
            name: "single-writer".into(),
        },
        late,
        0,
    );
    assert!(matches!(removed.0, DispatcherReply::Removed { .. }));
    assert!(matches!(
        block(&mut state, 1, late),
        DispatcherReply::VersionBlock { .. }
    ));
}

#[test]
fn user_locks_exclude_and_barriers_release_all_parties_together() {
    let mut state = joined(2);
    let acquire = |node| R::LockAcquire {
        name: "c0".into(),
        holder: (node, 7),
    };
    assert_eq!(state.handle(acquire(1), 0, 0).0, DispatcherReply::Done);
    assert!(matches!(
        state.handle(acquire(2), 0, 0).0,
        DispatcherReply::Failed(FsError::Busy(_))
    ));
    let release = R::LockRelease {
        name: "c0".into(),
        holder: (1, 7),
    };
    assert_eq!(state.handle(release.clone(), 0, 0).0, DispatcherReply::Done);
    assert!(matches!(
        state.handle(release, 0, 0).0,
        DispatcherReply::Failed(FsError::Invalid(_))
    ));
    assert_eq!(state.handle(acquire(2), 0, 0).0, DispatcherReply::Done);
    let arrive = |node, round| R::Barrier {
        name: "b".into(),
        parties: 2,
        member: (node, 0),
        round,
    };
    assert_eq!(state.handle(arrive(1, 0), 0, 0).0, DispatcherReply::Waiting);
    assert_eq!(
        state.handle(arrive(1, 0), 0, 0).0,
        DispatcherReply::Waiting,
        "asking again is safe"
    );
    assert_eq!(state.handle(arrive(2, 0), 0, 0).0, DispatcherReply::Done);
    assert_eq!(
        state.handle(arrive(1, 0), 0, 0).0,
        DispatcherReply::Done,
        "round 0 has passed"
    );
    assert_eq!(state.handle(arrive(1, 1), 0, 0).0, DispatcherReply::Waiting);
}

#[test]
fn create_without_live_nodes_fails() {
    let mut state = DispatcherState::new(7, params(), 0);
    assert!(matches!(
        create(&mut state, ROOT_INO, "a"),
        DispatcherReply::Failed(FsError::Io(_))
    ));
}

#[test]
fn long_names_are_refused() {
    let mut state = joined(1);
    let long = "x".repeat(256);
    assert_eq!(
        create(&mut state, ROOT_INO, &long),
        DispatcherReply::Failed(FsError::NameTooLong)
    );
    assert!(matches!(
        create(&mut state, ROOT_INO, &"x".repeat(255)),
        DispatcherReply::Attr(_)
    ));
}

#[test]
fn rename_over_a_file_drops_its_dataset_and_state_round_trips() {
    let mut state = joined(1);
    let a = attr(create(&mut state, ROOT_INO, "a"));
    let b = attr(create(&mut state, ROOT_INO, "b"));
    let (reply, changed) = state.handle(
        R::Rename {
            parent: ROOT_INO,
            name: "a".into(),
            new_parent: ROOT_INO,
            new_name: "b".into(),
        },
        0,
        0,
    );
    assert!(changed);
    assert_eq!(reply, DispatcherReply::Removed { dropped: b.dataset });
    let found = attr(state.handle(R::Resolve { path: "b".into() }, 0, 0).0);
    assert_eq!(found.ino, a.ino);
    let json = serde_json::to_string(&state).unwrap();
    let back: DispatcherState = serde_json::from_str(&json).unwrap();
    assert_eq!(back.inodes, state.inodes);
}

#[test]
fn directory_rules_hold() {
    let mut state = joined(1);
    let dir = attr(
        state
            .handle(
                R::Mkdir {
                    parent: ROOT_INO,
                    name: "d".into(),
                    mode: 0o755,
                    uid: 0,
                    gid: 0,
                },
                0,
                0,
            )
            .0,
    );
    create(&mut state, dir.ino, "f");
    let (reply, _) = state.handle(
        R::Rmdir {
            parent: ROOT_INO,
            name: "d".into(),
        },
        0,
        0,
    );
    assert_eq!(reply, DispatcherReply::Failed(FsError::NotEmpty));
    let (reply, _) = state.handle(
        R::Rename {
            parent: ROOT_INO,
            name: "d".into(),
            new_parent: dir.ino,
            new_name: "x".into(),
        },
        0,
        0,
    );
    assert!(matches!(
        reply,
        DispatcherReply::Failed(FsError::Invalid(_))
    ));
    let (reply, _) = state.handle(
        R::Unlink {
            parent: dir.ino,
            name: "f".into(),
        },
        0,
        0,
    );
    assert!(matches!(
        reply,
        DispatcherReply::Removed { dropped: Some(_) }
    ));
    let (reply, _) = state.handle(
        R::Rmdir {
            parent: ROOT_INO,
            name: "d".into(),
        },
        0,
        0,
    );
    assert_eq!(reply, DispatcherReply::Removed { dropped: None });
}

fn beat(state: &mut DispatcherState, node: NodeId, now_ms: u64) -> BTreeMap<NodeId, NodeId> {
    match state
        .handle(
            R::Heartbeat {
                node,
                usage: NodeUsage::default(),
            },
            now_ms,
            0,
        )
        .0
    {
        DispatcherReply::Status { successors, .. } => successors,
        other => panic!("expected status, got {other:?}"),
    }
}

#[test]
fn a_silent_node_is_replaced_by_the_next_live_one_and_stays_replaced() {
    let mut state = joined(3);
    state.set_promote_after_ms(5_000);
    for now in [1_000, 2_000] {
        for node in 1..=3 {
            assert!(
                beat(&mut state, node, now).is_empty(),
                "nobody is silent yet"
            );
        }
    }
    // Node 2 stops; nodes 1 and 3 go on.
    for now in (3_000..=8_000).step_by(1_000) {
        beat(&mut state, 1, now);
        beat(&mut state, 3, now);
    }
    assert_eq!(beat(&mut state, 1, 8_000), BTreeMap::from([(2, 3)]));
    // Node 2 comes back: it stays replaced (node 3 holds the current pages now).
    beat(&mut state, 2, 9_000);
    assert_eq!(beat(&mut state, 1, 9_000), BTreeMap::from([(2, 3)]));
    // Node 3 stops: its chunks, and node 2's, go to the next live node after 3: node 1.
    for now in (10_000..=16_000).step_by(1_000) {
        beat(&mut state, 1, now);
        beat(&mut state, 2, now);
    }
    assert_eq!(
        beat(&mut state, 1, 16_000),
        BTreeMap::from([(2, 1), (3, 1)])
    );
    // The map is persisted state.
    let saved = serde_json::to_string(&state).unwrap();
    let restored: DispatcherState = serde_json::from_str(&saved).unwrap();
    assert_eq!(restored.successors, BTreeMap::from([(2, 1), (3, 1)]));
}

#[test]
fn promotion_is_off_unless_configured() {
    let mut state = joined(2);
    beat(&mut state, 1, 1_000);
    beat(&mut state, 2, 1_000);
    assert!(beat(&mut state, 1, 100_000).is_empty());
}
