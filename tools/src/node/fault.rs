//! Named crash points for the recovery tests, compiled in only with the cargo feature
//! `fault-injection`. `HOTPOT_FAULT=<point>` (or `<point>@<n>`: the n-th time it is reached)
//! makes the node kill itself with SIGKILL there, exactly as `kill -9` would: no unwinding,
//! no unmount, PM left as the crash leaves it. The points are listed in docs/design.md
//! ("Recovery", fault injection).

#[cfg(feature = "fault-injection")]
mod enabled {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;

    struct Armed {
        point: String,
        at_hit: u64,
        hits: AtomicU64,
    }

    fn armed() -> Option<&'static Armed> {
        static ARMED: OnceLock<Option<Armed>> = OnceLock::new();
        ARMED
            .get_or_init(|| {
                let spec = std::env::var("HOTPOT_FAULT").ok()?;
                let (point, at_hit) = match spec.split_once('@') {
                    Some((point, n)) => (point.to_string(), n.parse().unwrap_or(1)),
                    None => (spec, 1),
                };
                Some(Armed {
                    point,
                    at_hit,
                    hits: AtomicU64::new(0),
                })
            })
            .as_ref()
    }

    pub fn point(name: &str) {
        let Some(armed) = armed() else { return };
        if armed.point != name {
            return;
        }
        if armed.hits.fetch_add(1, Ordering::SeqCst) + 1 == armed.at_hit {
            eprintln!(
                "fault injection: node {} crashes at {name}",
                std::process::id()
            );
            // SAFETY: kill(2) on our own pid; SIGKILL cannot be caught.
            unsafe {
                libc::kill(libc::getpid(), libc::SIGKILL);
            }
        }
    }
}

#[cfg(feature = "fault-injection")]
pub use enabled::point;

/// Without the feature a point costs nothing.
#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn point(_name: &str) {}
