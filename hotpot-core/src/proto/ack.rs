//! When an owner may acknowledge a commit it applied (the daemon and the node machine both
//! ask this): only once the dataset's copies hold the *decided* bytes. A target that missed
//! the Decide holds a prepared copy, which its restart discards and a rebuild after the
//! owner's loss cannot count; acknowledging then could lose the commit (found by hotpot-sim).

/// `decided`: nodes holding the decided bytes, the owner included (itself, every target
/// that answered the Decide, a committer that persisted its own copy); `wanted`: the copies
/// the dataset needs, `min(replicas, nodes)`. `None` when the commit may be acknowledged,
/// else why it is in doubt.
pub fn short_of_copies(decided: usize, wanted: usize) -> Option<String> {
    (decided < wanted)
        .then(|| format!("applied, but only {decided} of {wanted} copies confirmed the decision"))
}

#[cfg(test)]
mod tests {
    use super::short_of_copies;

    #[test]
    fn a_commit_is_acknowledged_only_with_every_wanted_copy_decided() {
        assert_eq!(short_of_copies(2, 2), None);
        assert_eq!(short_of_copies(3, 2), None);
        assert_eq!(short_of_copies(1, 1), None);
        assert_eq!(
            short_of_copies(1, 2).as_deref(),
            Some("applied, but only 1 of 2 copies confirmed the decision")
        );
    }
}
