//! Fuzz smoke (issue: recovery, check 4): the wire decoder (frame reader and the postcard
//! decoding of every message type) and the PM decoders (superblock, slots, redo records, and
//! a whole pool recovery on a damaged image) get HOTPOT_FUZZ_SECS (default 60) of mutated
//! inputs each, the two targets at once. Inputs start from valid encodings and are mutated
//! (bit flips, byte overwrites, truncation, extension, spliced ranges), so most get past the
//! first check. No input may panic; bad input must come back as an error. cargo fuzz needs
//! a nightly compiler these machines do not have, hence this form. HOTPOT_FUZZ_SEED replays.

use std::time::{Duration, Instant};

use hotpot_core::page::Run;
use hotpot_core::pm::layout::{decode_redo, Geometry, SlotRecord, Superblock};
use hotpot_core::pm::{CopyState, Pool, SimRegion, SlotChange, TxRole, TxTag, PAGE_BYTES};
use hotpot_core::proto::messages::{
    DispatcherReply, DispatcherRequest, NodeReply, NodeRequest, OwnerPages, PageWrite,
    VersionedPage,
};
use hotpot_core::proto::types::{FsError, PageLocation};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn budget() -> Duration {
    Duration::from_secs(
        std::env::var("HOTPOT_FUZZ_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(60),
    )
}

fn rng(target: &str) -> StdRng {
    let seed = std::env::var("HOTPOT_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("fuzz {target}: seed {seed} (HOTPOT_FUZZ_SEED={seed} replays it)");
    StdRng::seed_from_u64(seed)
}

/// One to four random mutations of `input`.
fn mutate(rng: &mut StdRng, input: &[u8]) -> Vec<u8> {
    let mut bytes = input.to_vec();
    for _ in 0..rng.random_range(1..=4) {
        match rng.random_range(0..6) {
            0 if !bytes.is_empty() => {
                let at = rng.random_range(0..bytes.len());
                bytes[at] ^= 1 << rng.random_range(0..8);
            }
            1 if !bytes.is_empty() => {
                let at = rng.random_range(0..bytes.len());
                bytes[at] = rng.random();
            }
            2 => {
                let keep = rng.random_range(0..=bytes.len());
                bytes.truncate(keep);
            }
            3 => {
                let extra = rng.random_range(1..64);
                bytes.extend((0..extra).map(|_| rng.random::<u8>()));
            }
            4 if bytes.len() > 8 => {
                // An interesting integer somewhere (lengths, counts, versions).
                let at = rng.random_range(0..bytes.len() - 8);
                let value: u64 =
                    [0, 1, u32::MAX as u64, u64::MAX, 1 << 31, 4096][rng.random_range(0..6)];
                bytes[at..at + 8].copy_from_slice(&value.to_le_bytes());
            }
            _ if bytes.len() > 2 => {
                let from = rng.random_range(0..bytes.len());
                let to = rng.random_range(0..bytes.len());
                let len = rng.random_range(0..=(bytes.len() - from.max(to)).min(32));
                let chunk = bytes[from..from + len].to_vec();
                bytes[to..to + len].copy_from_slice(&chunk);
            }
            _ => {}
        }
    }
    bytes
}

fn wire_seeds() -> Vec<Vec<u8>> {
    let page = vec![7u8; PAGE_BYTES];
    let requests = vec![
        NodeRequest::Fetch {
            dataset: 3,
            page: 9,
            from: 2,
        },
        NodeRequest::Locate {
            dataset: 3,
            page: 9,
            from: 2,
        },
        NodeRequest::Prepare {
            tx: (1, 2),
            owner: 2,
            commit: Some(((3, 4), 1)),
            dataset: 3,
            committer: true,
            pages: vec![VersionedPage {
                page: 1,
                version: 2,
                bytes: page.clone(),
            }],
        },
        NodeRequest::OwnerPrepare {
            tx: (3, 5),
            dataset: hotpot_core::proto::types::Dataset {
                id: 1,
                params: hotpot_core::proto::types::DatasetParams {
                    mode: hotpot_core::proto::types::Mode::Mrmw,
                    replicas: 2,
                    chunk_pages: 1,
                },
                owners: vec![2, 3, 1],
                first_home: Some((2, 1)),
            },
            ino: 5,
            committer: 3,
            committer_prepared: false,
            leader: 1,
            pages: OwnerPages::Runs(vec![(
                4,
                vec![Run {
                    offset: 10,
                    bytes: vec![1, 2, 3],
                }],
            )]),
        },
        NodeRequest::Register {
            dataset: 1,
            from: 2,
            pages: vec![(1, 2), (3, 4)],
            tx: None,
        },
        NodeRequest::Confirm {
            txs: vec![(1, 2)],
            node: 3,
        },
    ];
    let replies = vec![
        NodeReply::Pages(vec![VersionedPage {
            page: 1,
            version: 2,
            bytes: page.clone(),
        }]),
        NodeReply::Failed(FsError::Busy("held".into())),
        NodeReply::Decision(true),
        NodeReply::Located(Some(PageLocation {
            version: 4,
            frame_offset: 1 << 20,
            slot_offset: 4096,
            slot: vec![1u8; 64],
            data_crc: 7,
        })),
    ];
    let dispatcher = vec![
        DispatcherRequest::Lookup {
            parent: 1,
            name: "a".into(),
        },
        DispatcherRequest::Barrier {
            name: "b".into(),
            parties: 3,
            member: (1, 2),
            round: 4,
        },
    ];
    let dispatcher_replies = vec![DispatcherReply::Done, DispatcherReply::Waiting];
    let writes = vec![PageWrite {
        page: 1,
        base_version: 0,
        bytes: page,
    }];
    let mut seeds = Vec::new();
    for request in &requests {
        seeds.push(hotpot_net::frame::encode(7, request).unwrap());
    }
    for reply in &replies {
        seeds.push(hotpot_net::frame::encode(8, reply).unwrap());
    }
    for request in &dispatcher {
        seeds.push(hotpot_net::frame::encode(9, request).unwrap());
    }
    for reply in &dispatcher_replies {
        seeds.push(hotpot_net::frame::encode(10, reply).unwrap());
    }
    seeds.push(hotpot_net::frame::encode(11, &writes).unwrap());
    // The seeds themselves decode to what was encoded.
    let (_, body) = hotpot_net::frame::read_frame(&mut &seeds[1][..])
        .unwrap()
        .unwrap();
    assert_eq!(
        postcard::from_bytes::<NodeRequest>(&body).unwrap(),
        requests[1]
    );
    seeds
}

/// Decode `bytes` as a frame and its body as every message type. Returns whether anything
/// decoded (for the report); a panic fails the test.
fn decode_wire(bytes: &[u8]) -> bool {
    let Ok(Some((_, body))) = hotpot_net::frame::read_frame(&mut &bytes[..]) else {
        return false;
    };
    let a = postcard::from_bytes::<NodeRequest>(&body).is_ok();
    let b = postcard::from_bytes::<NodeReply>(&body).is_ok();
    let c = postcard::from_bytes::<DispatcherRequest>(&body).is_ok();
    let d = postcard::from_bytes::<DispatcherReply>(&body).is_ok();
    a || b || c || d
}

#[test]
fn wire_decoder_survives_mutated_frames() {
    let mut rng = rng("wire");
    let seeds = wire_seeds();
    let started = Instant::now();
    let (mut runs, mut decoded) = (0u64, 0u64);
    while started.elapsed() < budget() {
        for _ in 0..256 {
            let seed = &seeds[rng.random_range(0..seeds.len())];
            let input = if rng.random_range(0..16) == 0 {
                (0..rng.random_range(0..64)).map(|_| rng.random()).collect()
            } else {
                mutate(&mut rng, seed)
            };
            decoded += decode_wire(&input) as u64;
            runs += 1;
        }
    }
    eprintln!(
        "fuzz wire: {runs} inputs in {:?}, {decoded} decoded as some message, no panic",
        started.elapsed()
    );
    assert!(runs > 1000, "too few inputs ran: {runs}");
}

/// A small pool with committed pages, a kept follower record and a kept leader outcome.
fn pool_image() -> Vec<u8> {
    let region = std::sync::Arc::new(SimRegion::from_image(vec![0u8; 1 << 20]));
    let (mut pool, _) = Pool::open(Box::new(std::sync::Arc::clone(&region)), 1, 7).unwrap();
    let changes = |pool: &mut Pool, pages: &[u64], version: u64| -> Vec<SlotChange> {
        pages
            .iter()
            .map(|page| {
                let frame = pool.alloc_frame().unwrap();
                pool.frame_mut(frame).fill(*page as u8 ^ version as u8);
                SlotChange::Put {
                    page: (4, *page),
                    version,
                    frame,
                    state: CopyState::Committed,
                }
            })
            .collect()
    };
    let plain = changes(&mut pool, &[0, 1, 2], 1);
    pool.commit(&plain, TxTag::default()).unwrap();
    let led = changes(&mut pool, &[3], 1);
    let leader = TxTag {
        role: TxRole::Leader,
        tx: (3, 9),
        leader: 1,
        participants: 0b110,
    };
    pool.commit(&led, leader).unwrap();
    let followed = changes(&mut pool, &[0, 5], 2);
    let follower = TxTag {
        role: TxRole::Follower,
        tx: (3, 10),
        leader: 2,
        participants: 0,
    };
    std::mem::forget(pool.prepare(&followed, follower).unwrap());
    region.crash_image()
}

#[test]
fn pm_decoders_and_recovery_survive_damaged_metadata() {
    let mut rng = rng("pm");
    let image = pool_image();
    let geometry = Geometry::for_pool_bytes(image.len() as u64).unwrap();
    let metadata = geometry.frames_offset as usize;
    // The valid image recovers, with what was put in it.
    let (pool, report) = Pool::open(Box::new(SimRegion::from_image(image.clone())), 1, 7).unwrap();
    assert_eq!((report.records_pending, report.outcomes_kept), (1, 1));
    assert_eq!(pool.page((4, 1)).unwrap().record.version, 1);
    drop(pool);
    let superblock = image[..64].to_vec();
    let slot = image[geometry.slots_offset as usize..][..64].to_vec();
    let redo_at = geometry.redo_offset as usize;
    let redo = image[redo_at..redo_at + 4 * 4096].to_vec();
    let started = Instant::now();
    let (mut runs, mut opened, mut refused) = (0u64, 0u64, 0u64);
    while started.elapsed() < budget() {
        for _ in 0..32 {
            let _ = Superblock::decode(&mutate(&mut rng, &superblock), 1 << 20);
            let mut slot_bytes = mutate(&mut rng, &slot);
            slot_bytes.resize(64, 0);
            let _ = SlotRecord::decode(&slot_bytes, geometry.frame_count);
            let mut redo_bytes = mutate(&mut rng, &redo);
            redo_bytes.resize(4 * 4096, 0);
            let _ = decode_redo(&redo_bytes, &geometry);
            runs += 3;
        }
        // A whole recovery on an image whose metadata got a few damaged bytes.
        let mut damaged = image.clone();
        for _ in 0..rng.random_range(1..=8) {
            let at = match rng.random_range(0..3) {
                0 => rng.random_range(0..64),
                1 => rng.random_range(geometry.slots_offset as usize..redo_at),
                _ => rng.random_range(redo_at..metadata),
            };
            damaged[at] = rng.random();
        }
        match Pool::open(Box::new(SimRegion::from_image(damaged)), 1, 7) {
            Ok(_) => opened += 1,
            Err(_) => refused += 1,
        }
        runs += 1;
    }
    eprintln!(
        "fuzz pm: {runs} inputs in {:?}; damaged pools: {opened} opened, {refused} refused with an error; no panic",
        started.elapsed()
    );
    assert!(
        refused > 0,
        "no damaged pool was ever refused: the damage missed everything"
    );
}
