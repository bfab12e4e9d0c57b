//! Named crash points for the recovery tests, compiled in only with the cargo feature
//! `fault-injection`. A point is armed by `HOTPOT_FAULT=<point>` at start or by
//! `hotpot cluster arm-fault` on a running node; the first time the node reaches it, it kills
//! itself with SIGKILL, exactly as `kill -9` would: no unwinding, no unmount, PM left as the
//! crash leaves it. Armed as `panic:<point>`, the thread that reaches it panics instead (a bug
//! in one thread, which stops the whole node: `main.rs`, fail-stop). Armed as `drop:<point>`,
//! a point that can drop its request (`drops`) drops every one, as if the messages were lost,
//! until another point is armed (`none`, which no code reaches, disarms). The points are
//! listed in docs/design.md ("Recovery").

#[cfg(feature = "fault-injection")]
mod enabled {
    use std::sync::Mutex;

    static ARMED: Mutex<Option<String>> = Mutex::new(None);
    static FROM_ENV: std::sync::Once = std::sync::Once::new();

    fn armed() -> std::sync::MutexGuard<'static, Option<String>> {
        FROM_ENV.call_once(|| {
            if let Ok(point) = std::env::var("HOTPOT_FAULT") {
                *ARMED.lock().expect("fault lock") = Some(point);
            }
        });
        ARMED.lock().expect("fault lock")
    }

    pub fn arm(point: &str) -> Result<(), String> {
        *armed() = Some(point.to_string());
        Ok(())
    }

    pub fn point(name: &str) {
        let armed = armed().clone();
        match armed.as_deref() {
            Some(point) if point == name => {
                eprintln!("fault injection: crashing at {name}");
                // SAFETY: kill(2) on our own pid; SIGKILL cannot be caught.
                unsafe {
                    libc::kill(libc::getpid(), libc::SIGKILL);
                }
            }
            Some(point) if point.strip_prefix("panic:") == Some(name) => {
                panic!("fault injection: panic at {name}")
            }
            _ => {}
        }
    }

    pub fn drops(name: &str) -> bool {
        let dropping = armed()
            .as_deref()
            .is_some_and(|point| point.strip_prefix("drop:") == Some(name));
        if dropping {
            eprintln!("fault injection: dropping the request at {name}");
        }
        dropping
    }
}

#[cfg(feature = "fault-injection")]
pub use enabled::{arm, drops, point};

#[cfg(not(feature = "fault-injection"))]
pub fn arm(_point: &str) -> Result<(), String> {
    Err("this hotpot was built without the fault-injection feature".into())
}

/// Without the feature a point costs nothing.
#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn point(_name: &str) {}

/// Whether the request at this point is to be dropped (never, without the feature).
#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn drops(_name: &str) -> bool {
    false
}
