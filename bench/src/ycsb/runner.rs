//! The YCSB core workload run against LMDB: load phase (hashed insert order), run phase with
//! the A–F proportions and key choosers of REFERENCE.md, several threads, an optional warm-up
//! reported apart (YCSB has none), and YCSB's per-operation statistics.

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use rand::{Rng, SeedableRng};

use super::generator::{key_name, Latest, ScrambledZipfian};
use super::lmdb::Lmdb;
use super::report::OperationStats;

pub const FIELD_COUNT: usize = 10;
pub const FIELD_BYTES: usize = 100;
pub const MAX_SCAN_LENGTH: u64 = 100;

/// Proportions of one core workload (read, update, insert, scan, read-modify-write) and
/// whether its key chooser is "latest".
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Workload {
    pub name: char,
    pub read: f64,
    pub update: f64,
    pub insert: f64,
    pub scan: f64,
    pub read_modify_write: f64,
    pub latest: bool,
}

impl Workload {
    pub fn core(name: char) -> Option<Workload> {
        let w = |read, update, insert, scan, read_modify_write, latest| Workload {
            name: name.to_ascii_uppercase(),
            read,
            update,
            insert,
            scan,
            read_modify_write,
            latest,
        };
        Some(match name.to_ascii_lowercase() {
            'a' => w(0.5, 0.5, 0.0, 0.0, 0.0, false),
            'b' => w(0.95, 0.05, 0.0, 0.0, 0.0, false),
            'c' => w(1.0, 0.0, 0.0, 0.0, 0.0, false),
            'd' => w(0.95, 0.0, 0.05, 0.0, 0.0, true),
            'e' => w(0.0, 0.0, 0.05, 0.95, 0.0, false),
            'f' => w(0.5, 0.0, 0.0, 0.0, 0.5, false),
            _ => return None,
        })
    }
}

/// A record: field i is FIELD_BYTES bytes starting with the tag `b'a' + i`.
pub fn new_record(rng: &mut impl Rng) -> Vec<u8> {
    let mut record = vec![0u8; FIELD_COUNT * FIELD_BYTES];
    for (index, field) in record.chunks_mut(FIELD_BYTES).enumerate() {
        rng.fill(&mut field[1..]);
        field[0] = b'a' + index as u8;
    }
    record
}

/// Whether `record` has the shape `new_record` gives it (updates keep the tags).
pub fn well_formed(record: &[u8]) -> bool {
    record.len() == FIELD_COUNT * FIELD_BYTES
        && record
            .chunks(FIELD_BYTES)
            .enumerate()
            .all(|(index, field)| field[0] == b'a' + index as u8)
}

/// Records inserted during a run: numbers are handed out in order, and readers may choose
/// only below the first number not yet committed (YCSB's acknowledged counter).
struct Inserts {
    next: AtomicU64,
    acknowledged: Mutex<(u64, BTreeSet<u64>)>,
}

impl Inserts {
    fn new(records: u64) -> Inserts {
        Inserts {
            next: AtomicU64::new(records),
            acknowledged: Mutex::new((records, BTreeSet::new())),
        }
    }

    fn take(&self) -> u64 {
        self.next.fetch_add(1, Ordering::AcqRel)
    }

    fn acknowledge(&self, number: u64) {
        let mut state = self.acknowledged.lock().expect("inserts lock");
        let (limit, pending) = &mut *state;
        pending.insert(number);
        while pending.remove(limit) {
            *limit += 1;
        }
    }

    fn limit(&self) -> u64 {
        self.acknowledged.lock().expect("inserts lock").0
    }
}

fn record_op(stats: &mut BTreeMap<String, OperationStats>, name: &str, started: Instant, ok: bool) {
    let entry = stats.entry(name.to_string()).or_default();
    entry
        .latency_us
        .saturating_record(started.elapsed().as_micros() as u64);
    if ok {
        entry.ok += 1;
    } else {
        entry.errors += 1;
    }
}

/// Load `records` records; returns the INSERT statistics.
pub fn load(db: &Lmdb, records: u64) -> Result<BTreeMap<String, OperationStats>, String> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(records);
    let mut stats = BTreeMap::new();
    for number in 0..records {
        let started = Instant::now();
        let done = db.put(key_name(number).as_bytes(), &new_record(&mut rng));
        record_op(&mut stats, "INSERT", started, done.is_ok());
        done?;
    }
    Ok(stats)
}

/// How a run is paced and observed.
pub struct Pace<'a> {
    pub threads: u32,
    /// Total operations per second over all threads (YCSB's `target`); `None`: as fast as
    /// possible.
    pub target_ops_per_sec: Option<f64>,
    /// Called after each operation (progress).
    pub done: &'a (dyn Fn() + Sync),
}

/// Run `operations` operations of `workload` over `records` loaded records. Returns the run
/// time in ms and the statistics per operation.
pub fn run(
    db: &Lmdb,
    workload: Workload,
    records: u64,
    operations: u64,
    pace: &Pace<'_>,
) -> (u64, BTreeMap<String, OperationStats>) {
    let threads = pace.threads;
    let done = pace.done;
    // Each thread keeps its share of the target: one operation every `interval`.
    let interval = pace
        .target_ops_per_sec
        .filter(|rate| *rate > 0.0)
        .map(|rate| std::time::Duration::from_secs_f64(f64::from(threads.max(1)) / rate));
    let threads = threads.max(1);
    // YCSB sizes the zipfian over the keys the run may insert too.
    let key_space = records + (operations as f64 * workload.insert * 2.0) as u64;
    let inserts = Inserts::new(records);
    let started = Instant::now();
    let per_thread: Vec<BTreeMap<String, OperationStats>> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|thread| {
                let inserts = &inserts;
                scope.spawn(move || {
                    let mut rng = rand::rngs::StdRng::seed_from_u64(0x9c5b ^ u64::from(thread));
                    let zipfian = ScrambledZipfian::new(key_space);
                    let mut latest = Latest::new(records);
                    let mut stats = BTreeMap::new();
                    let share = operations / u64::from(threads) + u64::from(u64::from(thread) < operations % u64::from(threads));
                    let thread_started = Instant::now();
                    for index in 0..share {
                        if let Some(interval) = interval {
                            let due = thread_started + interval * index as u32;
                            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                                std::thread::sleep(wait);
                            }
                        }
                        let known = inserts.limit();
                        let mut choose = |rng: &mut rand::rngs::StdRng| loop {
                            let number = if workload.latest { latest.next(known - 1, rng) } else { zipfian.next(rng) };
                            if number < known {
                                break key_name(number);
                            }
                        };
                        let dice: f64 = rng.random();
                        let op_started = Instant::now();
                        if dice < workload.read {
                            let key = choose(&mut rng);
                            let ok = matches!(db.get(key.as_bytes()), Ok(Some(record)) if well_formed(&record));
                            record_op(&mut stats, "READ", op_started, ok);
                        } else if dice < workload.read + workload.update {
                            let key = choose(&mut rng);
                            let field = rng.random_range(0..FIELD_COUNT);
                            let value = new_record(&mut rng);
                            let ok = db
                                .update(key.as_bytes(), |record| {
                                    let at = field * FIELD_BYTES;
                                    record[at + 1..at + FIELD_BYTES].copy_from_slice(&value[at + 1..at + FIELD_BYTES]);
                                })
                                .unwrap_or(false);
                            record_op(&mut stats, "UPDATE", op_started, ok);
                        } else if dice < workload.read + workload.update + workload.insert {
                            let number = inserts.take();
                            let ok = db.put(key_name(number).as_bytes(), &new_record(&mut rng)).is_ok();
                            if ok {
                                inserts.acknowledge(number);
                            }
                            record_op(&mut stats, "INSERT", op_started, ok);
                        } else if dice < workload.read + workload.update + workload.insert + workload.scan {
                            let key = choose(&mut rng);
                            let length = rng.random_range(1..=MAX_SCAN_LENGTH) as usize;
                            let ok = db.scan(key.as_bytes(), length).is_ok();
                            record_op(&mut stats, "SCAN", op_started, ok);
                        } else {
                            let key = choose(&mut rng);
                            let field = rng.random_range(0..FIELD_COUNT);
                            let ok = db
                                .update(key.as_bytes(), |record| {
                                    let at = field * FIELD_BYTES;
                                    record[at + 1] = record[at + 1].wrapping_add(1);
                                })
                                .unwrap_or(false);
                            record_op(&mut stats, "READ-MODIFY-WRITE", op_started, ok);
                        }
                        done();
                    }
                    stats
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|worker| worker.join().expect("ycsb thread"))
            .collect()
    });
    let run_time_ms = started.elapsed().as_millis() as u64;
    let mut merged: BTreeMap<String, OperationStats> = BTreeMap::new();
    for stats in per_thread {
        for (name, part) in stats {
            let entry = merged.entry(name).or_default();
            entry
                .latency_us
                .add(&part.latency_us)
                .expect("same histogram bounds");
            entry.ok += part.ok;
            entry.errors += part.errors;
        }
    }
    (run_time_ms, merged)
}
