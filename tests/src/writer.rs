//! Stamped commits from a separate writer process (scripts/commit_writer.py), for the
//! recovery and chaos tests: the first 16 bytes of each page of commit `id` become
//! (`id`, page), then msync. A separate process, because a node killed under a mapping makes
//! the next touch of it a SIGBUS.

use std::collections::BTreeMap;
use std::io::BufRead;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// What the writer said of a commit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// msync returned 0: must be present everywhere.
    Acked,
    /// msync failed, or was never reached: all or nothing.
    NotAcked,
    /// The writer died while writing its stamps (SIGBUS): never a whole commit.
    Torn,
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/commit_writer.py")
}

/// Run the writer on `file` (mapped over `size` bytes); what became of each commit of
/// `plan` (commit id, pages).
pub fn write_commits(file: &Path, size: u64, plan: &[(u64, Vec<u64>)]) -> BTreeMap<u64, Outcome> {
    let plan_json = serde_json::to_string(plan).expect("plan as JSON");
    let mut child = Command::new("python3")
        .arg(script())
        .arg(file)
        .arg(size.to_string())
        .arg(&plan_json)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the commit writer (python3)");
    let mut outcomes: BTreeMap<u64, Outcome> = plan
        .iter()
        .map(|(id, _)| (*id, Outcome::NotAcked))
        .collect();
    let stdout = child.stdout.take().expect("writer stdout");
    for line in std::io::BufReader::new(stdout).lines() {
        let line = line.unwrap_or_default();
        let mut words = line.split_whitespace();
        let (Some(word), Some(Ok(id))) = (words.next(), words.next().map(str::parse::<u64>)) else {
            continue;
        };
        let outcome = match word {
            "try" => Outcome::Torn,
            "ack" => Outcome::Acked,
            _ => Outcome::NotAcked,
        };
        outcomes.insert(id, outcome);
    }
    let _ = child.wait();
    outcomes
}

/// The (commit, page) stamp of each of `pages` of `file`, read with pread.
pub fn stamps(file: &Path, pages: &[u64]) -> Result<BTreeMap<u64, (u64, u64)>, String> {
    let file = std::fs::File::open(file).map_err(|e| format!("open: {e}"))?;
    let mut bytes = [0u8; 16];
    let mut stamps = BTreeMap::new();
    for page in pages {
        file.read_exact_at(&mut bytes, page * 4096)
            .map_err(|e| format!("read of page {page}: {e}"))?;
        stamps.insert(
            *page,
            (
                u64::from_le_bytes(bytes[0..8].try_into().expect("8 bytes")),
                u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes")),
            ),
        );
    }
    Ok(stamps)
}
