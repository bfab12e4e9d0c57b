//! Crash recovery with real processes (issue: recovery). Three nodes, replicas 2. For each
//! named crash point of every commit phase (MRSW and MRMW, commits across three owners and
//! within one, on the committing node, the leader owner and a follower owner), 20 runs:
//! arm the point, commit stamped pages from a writer process until the node dies there,
//! restart it (PM kept, or PM deleted: the node lost), then check on every node that every
//! acknowledged commit is fully present and every other one is fully present or fully
//! absent, and that the next commit succeeds (nothing stays locked). After the lost-node
//! runs every committed page has two copies again.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use hotpot_tests::writer::{stamps, write_commits, Outcome};
use hotpot_tests::{fuse_available, require_program, Cluster};

const RUNS: usize = 20;
const COMMITS_PER_RUN: u64 = 3;
/// Fresh pages per commit and the page count of each dataset.
const DATASET_PAGES: u64 = 4096;
const SETTLE: Duration = Duration::from_secs(20);

#[derive(Clone, Copy, Debug, PartialEq)]
enum Span {
    /// Every commit touches pages of all three owners.
    Across,
    /// Every commit touches pages of one owner.
    One,
}

struct Case {
    mode: &'static str,
    span: Span,
    point: &'static str,
    /// Which role's node crashes: "committer", "leader" or "follower".
    role: &'static str,
}

fn cases() -> Vec<Case> {
    let mut cases = Vec::new();
    for mode in ["mrsw", "mrmw"] {
        for (point, role) in [
            ("committer.followers_prepared", "committer"),
            ("committer.leader_decided", "committer"),
            ("follower.prepared", "follower"),
            ("follower.decided", "follower"),
            ("owner.targets_prepared", "leader"),
            ("owner.decided", "leader"),
            ("owner.announced", "leader"),
        ] {
            cases.push(Case {
                mode,
                span: Span::Across,
                point,
                role,
            });
        }
        for (point, role) in [
            ("owner.targets_prepared", "leader"),
            ("owner.decided", "leader"),
            ("owner.announced", "leader"),
        ] {
            cases.push(Case {
                mode,
                span: Span::One,
                point,
                role,
            });
        }
    }
    for point in ["committer.prepared", "committer.answered"] {
        cases.push(Case {
            mode: "mrsw",
            span: Span::One,
            point,
            role: "committer",
        });
    }
    cases
}

/// One dataset per (mode, span), its owners, and the next fresh commit id.
struct Dataset {
    name: String,
    owners: Vec<u32>,
    next_commit: u64,
    next_fresh: BTreeMap<u32, u64>,
    /// Commit id -> (pages, what the writer said).
    commits: BTreeMap<u64, (Vec<u64>, Outcome)>,
}

impl Dataset {
    fn owner_of(&self, page: u64) -> u32 {
        self.owners[(page % self.owners.len() as u64) as usize]
    }

    /// The next page (past the first three) owned by `owner`.
    fn fresh_page(&mut self, owner: u32) -> u64 {
        let mut page = *self.next_fresh.get(&owner).unwrap_or(&3);
        while self.owner_of(page) != owner {
            page += 1;
        }
        assert!(page < DATASET_PAGES, "dataset {} is full", self.name);
        self.next_fresh.insert(owner, page + 1);
        page
    }

    /// Pages of the next commit: one fresh page of each owner (across) or two of `owner`.
    fn plan(&mut self, span: Span, owner: u32, count: u64) -> Vec<(u64, Vec<u64>)> {
        (0..count)
            .map(|_| {
                let id = self.next_commit;
                self.next_commit += 1;
                let pages = match span {
                    Span::Across => {
                        let owners = self.owners.clone();
                        owners.iter().map(|o| self.fresh_page(*o)).collect()
                    }
                    Span::One => vec![self.fresh_page(owner), self.fresh_page(owner)],
                };
                (id, pages)
            })
            .collect()
    }
}

/// Every acknowledged commit fully present on every node; every other fully present or
/// fully absent, the same on every node but the committer, whose failed commits stay staged
/// there (its own writes, retried by its next msync) and so read as present.
fn check(cluster: &Cluster, dataset: &Dataset, committer: u32) -> Result<(u64, u64), String> {
    let mut present_on_first: Option<BTreeMap<u64, bool>> = None;
    let pages: Vec<u64> = dataset
        .commits
        .values()
        .filter(|(_, outcome)| *outcome != Outcome::Torn)
        .flat_map(|(pages, _)| pages.iter().copied())
        .collect();
    for node in 1..=3 {
        let stamps = stamps(&cluster.mount(node).join(&dataset.name), &pages)
            .map_err(|e| format!("node {node}: {e}"))?;
        let mut present = BTreeMap::new();
        for (id, (pages, outcome)) in &dataset.commits {
            if *outcome == Outcome::Torn {
                continue;
            }
            let acked = *outcome == Outcome::Acked;
            let here: Vec<bool> = pages
                .iter()
                .map(|page| stamps[page] == (*id, *page))
                .collect();
            let all = here.iter().all(|p| *p);
            let none = here.iter().all(|p| !*p);
            if !all && !none {
                return Err(format!(
                    "commit {id} is partly present on node {node}: pages {pages:?} present {here:?}"
                ));
            }
            if acked && !all {
                return Err(format!(
                    "acknowledged commit {id} is missing on node {node}"
                ));
            }
            present.insert(*id, all);
        }
        if node == committer {
            continue;
        }
        match &present_on_first {
            None => present_on_first = Some(present),
            Some(first) if *first != present => {
                let differ: Vec<_> = first
                    .iter()
                    .filter(|(id, p)| present.get(id) != Some(p))
                    .collect();
                return Err(format!(
                    "node {node} disagrees with another node on {differ:?}"
                ));
            }
            Some(_) => {}
        }
    }
    let present = present_on_first.unwrap_or_default();
    let acked = dataset
        .commits
        .values()
        .filter(|(_, outcome)| *outcome == Outcome::Acked)
        .count() as u64;
    Ok((acked, present.values().filter(|p| **p).count() as u64))
}

fn settle(cluster: &Cluster, dataset: &Dataset, committer: u32, what: &str) {
    let deadline = Instant::now() + SETTLE;
    loop {
        match check(cluster, dataset, committer) {
            Ok(_) => return,
            Err(why) if Instant::now() > deadline => fail(cluster, &format!("{what}: {why}")),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// Fail with the nodes' log tails (full logs copied to a kept directory).
fn fail(cluster: &Cluster, why: &str) -> ! {
    let kept = cluster.keep_logs("hotpot-recovery-failure");
    // Where each node process's threads are (a hung restart shows here).
    let mut states = String::new();
    for entry in cluster.info()["nodes"]
        .as_array()
        .cloned()
        .unwrap_or_default()
    {
        let pid = entry["pid"].as_u64().unwrap_or(0);
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
            .into_iter()
            .flatten();
        for task in tasks.flatten() {
            let path = task.path();
            let read = |name: &str| std::fs::read_to_string(path.join(name)).unwrap_or_default();
            states.push_str(&format!(
                "node {} pid {pid} task {}: {} wchan {}\n",
                entry["id"],
                task.file_name().to_string_lossy(),
                read("stat").split(' ').nth(2).unwrap_or("?"),
                read("wchan")
            ));
        }
    }
    let _ = std::fs::write(kept.join("processes.txt"), states);
    panic!(
        "{why}\n(full node logs copied to {})\n--- node 1 log tail ---\n{}\n--- node 2 ---\n{}\n--- node 3 ---\n{}",
        kept.display(),
        tail(&cluster.node_log(1)),
        tail(&cluster.node_log(2)),
        tail(&cluster.node_log(3))
    )
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(25)..].join("\n")
}

fn crash_matrix(wipe: bool) {
    if !fuse_available() {
        return;
    }
    require_program("python3", "apt-get install python3");
    let cluster = Cluster::up_with_env(3, "256MiB", &[("HOTPOT_RESOLVE_AFTER_MS", "200")]);
    // Committer node 3; the leader of a commit across owners is node 1, a follower node 2.
    let committer = 3u32;
    let mut datasets: BTreeMap<(&str, bool), Dataset> = BTreeMap::new();
    for mode in ["mrsw", "mrmw"] {
        for across in [true, false] {
            let name = format!("{mode}-{}", if across { "across" } else { "one" });
            let path = cluster.create_chunked(
                committer,
                &name,
                &format!("{}KiB", DATASET_PAGES * 4),
                mode,
                2,
                "4KiB",
            );
            let owners: Vec<u32> = cluster
                .chunk_owners(&path)
                .into_iter()
                .take(3)
                .map(|owner| owner as u32)
                .collect();
            datasets.insert(
                (mode, across),
                Dataset {
                    name,
                    owners,
                    next_commit: 1,
                    next_fresh: BTreeMap::new(),
                    commits: BTreeMap::new(),
                },
            );
        }
    }
    let mut crashes = 0;
    // HOTPOT_RECOVERY_CASES=<text>: only the cases whose "mode span point" contains it.
    let only = std::env::var("HOTPOT_RECOVERY_CASES").unwrap_or_default();
    for case in cases() {
        if !format!("{} {:?} {}", case.mode, case.span, case.point).contains(&only) {
            continue;
        }
        let dataset = datasets
            .get_mut(&(case.mode, case.span == Span::Across))
            .unwrap();
        let victim = match case.role {
            "committer" => committer,
            "leader" => 1,
            _ => 2,
        };
        for run in 0..RUNS {
            let what = format!(
                "{} {:?} crash of node {victim} at {} (run {run}, PM {})",
                case.mode,
                case.span,
                case.point,
                if wipe { "deleted" } else { "kept" }
            );
            cluster.arm_fault(victim, case.point);
            // Single-owner commits go to the leader's pages (node 1 owns, 3 commits).
            let plan = dataset.plan(case.span, 1, COMMITS_PER_RUN);
            let file = cluster.mount(committer).join(&dataset.name);
            let outcomes = write_commits(&file, DATASET_PAGES * 4096, &plan);
            for (id, pages) in &plan {
                dataset.commits.insert(*id, (pages.clone(), outcomes[id]));
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            while cluster.is_running(victim) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if cluster.is_running(victim) {
                fail(
                    &cluster,
                    &format!("{what}: the node never reached the point"),
                );
            }
            crashes += 1;
            if wipe {
                std::fs::remove_file(cluster.pm_file(victim)).expect("delete the PM file");
            }
            if let Err(why) = cluster.try_start(victim) {
                fail(&cluster, &format!("{what}: {why}"));
            }
            settle(&cluster, dataset, committer, &what);
            // Nothing stays locked: the next commit succeeds.
            let next = dataset.plan(case.span, 1, 1);
            let outcome = write_commits(&file, DATASET_PAGES * 4096, &next)[&next[0].0];
            if outcome != Outcome::Acked {
                fail(
                    &cluster,
                    &format!("{what}: the commit after recovery failed ({outcome:?})"),
                );
            }
            dataset
                .commits
                .insert(next[0].0, (next[0].1.clone(), Outcome::Acked));
            settle(&cluster, dataset, committer, &what);
        }
        let (acked, present) = check(&cluster, dataset, committer).unwrap();
        eprintln!(
            "{} {:?} {} on node {victim}: {RUNS} crashes; {acked} commits acknowledged, all present; {present} present in all",
            case.mode, case.span, case.point
        );
    }
    eprintln!(
        "{crashes} crashes, PM {}",
        if wipe { "deleted" } else { "kept" }
    );
    if wipe {
        // Every committed page has two copies again (re-replication is periodic).
        for dataset in datasets.values() {
            let path = cluster.mount(1).join(&dataset.name);
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let stat = cluster.stat_json(&path);
                // No committed page (its cases filtered out by HOTPOT_RECOVERY_CASES): nothing
                // to count, and `min_copies` is null.
                let committed = stat["pages_committed"].as_u64().unwrap_or(0);
                if committed == 0 || stat["min_copies"].as_u64().unwrap_or(0) >= 2 {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "pages of {} stayed below 2 copies: {stat}",
                    dataset.name
                );
                std::thread::sleep(Duration::from_millis(250));
            }
        }
    }
}

#[test]
fn every_crash_point_with_the_pm_kept_loses_no_acknowledged_commit_and_splits_none() {
    crash_matrix(false);
}

#[test]
fn every_crash_point_with_the_node_lost_loses_no_acknowledged_commit_and_splits_none() {
    crash_matrix(true);
}
