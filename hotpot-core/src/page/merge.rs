//! Byte-level merging for MRMW: the runs of bytes a node changed (its Dirty page against the
//! twin it wrote on), applied by the owner onto whatever version is current, so writers of
//! different bytes of one page all keep their bytes; for the same bytes the later commit wins.

use serde::{Deserialize, Serialize};

use crate::pm::PAGE_BYTES;

/// Changed bytes at `offset` of a page.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Run {
    pub offset: u16,
    #[serde(with = "serde_bytes")]
    pub bytes: Vec<u8>,
}

/// The runs where `new` differs from `base` (both one page). Only changed bytes are sent:
/// an unchanged byte inside a run would overwrite another writer's commit of that byte.
pub fn diff_runs(base: &[u8], new: &[u8]) -> Vec<Run> {
    diff_runs_including(base, new, &[])
}

/// The runs where `new` differs from `base`, plus the byte ranges `also` (start, end) with
/// their bytes in `new` whether changed or not.
pub fn diff_runs_including(base: &[u8], new: &[u8], also: &[(usize, usize)]) -> Vec<Run> {
    assert_eq!(base.len(), PAGE_BYTES);
    assert_eq!(new.len(), PAGE_BYTES);
    let mut send: Vec<bool> = base.iter().zip(new).map(|(b, n)| b != n).collect();
    for (start, end) in also {
        send[(*start).min(PAGE_BYTES)..(*end).min(PAGE_BYTES)].fill(true);
    }
    let mut runs = Vec::new();
    let mut at = 0;
    while at < PAGE_BYTES {
        if !send[at] {
            at += 1;
            continue;
        }
        let start = at;
        while at < PAGE_BYTES && send[at] {
            at += 1;
        }
        runs.push(Run {
            offset: start as u16,
            bytes: new[start..at].to_vec(),
        });
    }
    runs
}

/// Apply `runs` to `page`. Runs that do not fit the page are refused (they come from the
/// network), nothing is applied then.
pub fn apply_runs(page: &mut [u8], runs: &[Run]) -> Result<(), String> {
    assert_eq!(page.len(), PAGE_BYTES);
    for run in runs {
        let end = run.offset as usize + run.bytes.len();
        if end > PAGE_BYTES {
            return Err(format!(
                "run of {} bytes at offset {} crosses the page",
                run.bytes.len(),
                run.offset
            ));
        }
    }
    for run in runs {
        let start = run.offset as usize;
        page[start..start + run.bytes.len()].copy_from_slice(&run.bytes);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn runs_rebuild_the_new_page_from_the_base(
            base in proptest::collection::vec(any::<u8>(), PAGE_BYTES),
            edits in proptest::collection::vec((0usize..PAGE_BYTES, any::<u8>()), 0..64),
        ) {
            let mut new = base.clone();
            for (at, byte) in edits {
                new[at] = byte;
            }
            let runs = diff_runs(&base, &new);
            let mut rebuilt = base.clone();
            apply_runs(&mut rebuilt, &runs).unwrap();
            prop_assert_eq!(rebuilt, new);
        }

        #[test]
        fn interleaved_writers_of_nearby_bytes_all_survive(
            writes in proptest::collection::vec((0usize..PAGE_BYTES, 1u8..=255), 1..64),
        ) {
            // Each byte written goes to one of two writers by position parity; both commit
            // their runs against the same base: every byte either wrote must be in the merge.
            let base = vec![0u8; PAGE_BYTES];
            let (mut a, mut b) = (base.clone(), base.clone());
            for (at, byte) in &writes {
                if at % 2 == 0 { a[*at] = *byte } else { b[*at] = *byte }
            }
            let mut merged = base.clone();
            apply_runs(&mut merged, &diff_runs(&base, &a)).unwrap();
            apply_runs(&mut merged, &diff_runs(&base, &b)).unwrap();
            for at in 0..PAGE_BYTES {
                let wrote = if at % 2 == 0 { a[at] } else { b[at] };
                prop_assert_eq!(merged[at], wrote, "byte {}", at);
            }
        }

        #[test]
        fn forced_ranges_are_sent_with_their_current_bytes(
            new in proptest::collection::vec(any::<u8>(), PAGE_BYTES),
            start in 0usize..PAGE_BYTES,
            len in 0usize..64,
        ) {
            let end = (start + len).min(PAGE_BYTES);
            let runs = diff_runs_including(&new, &new, &[(start, end)]);
            let mut target = vec![!0u8; PAGE_BYTES];
            apply_runs(&mut target, &runs).unwrap();
            prop_assert_eq!(&target[start..end], &new[start..end]);
            prop_assert!(target[..start].iter().chain(&target[end..]).all(|b| *b == !0u8));
        }

        #[test]
        fn disjoint_writers_both_survive_in_either_order(split in 1usize..PAGE_BYTES - 1, first_a: bool) {
            let base = vec![0u8; PAGE_BYTES];
            let mut a = base.clone();
            a[..split].fill(1);
            let mut b = base.clone();
            b[split..].fill(2);
            let (runs_a, runs_b) = (diff_runs(&base, &a), diff_runs(&base, &b));
            let mut merged = base.clone();
            if first_a {
                apply_runs(&mut merged, &runs_a).unwrap();
                apply_runs(&mut merged, &runs_b).unwrap();
            } else {
                apply_runs(&mut merged, &runs_b).unwrap();
                apply_runs(&mut merged, &runs_a).unwrap();
            }
            prop_assert!(merged[..split].iter().all(|x| *x == 1));
            prop_assert!(merged[split..].iter().all(|x| *x == 2));
        }
    }

    #[test]
    fn a_run_past_the_page_is_refused_and_nothing_applies() {
        let mut page = vec![0u8; PAGE_BYTES];
        let runs = [
            Run {
                offset: 0,
                bytes: vec![9],
            },
            Run {
                offset: 4095,
                bytes: vec![1, 2],
            },
        ];
        assert!(apply_runs(&mut page, &runs).is_err());
        assert_eq!(page[0], 0);
    }
}
