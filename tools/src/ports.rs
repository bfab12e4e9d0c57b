//! Listening ports for a local cluster's processes.
//!
//! `cluster up` chooses each process's port and the process binds it a moment later (and binds
//! the same port again when it restarts). A port the kernel hands out for bind(port 0) lies in
//! the ephemeral range, the same range every outgoing connection takes its source port from:
//! one of the many connections a busy machine opens can take it in between, and the node then
//! fails with "Address already in use". So ports come from below the ephemeral range, where
//! the kernel never assigns one by itself. The start is random, so two clusters coming up at
//! once seldom try the same ports, and each port is checked free by binding it.

use std::collections::BTreeSet;
use std::net::TcpListener;

use anyhow::bail;
use rand::Rng;

/// The lowest port `cluster up` uses: below it lie the ports of well-known services.
const LOWEST: u16 = 10_000;

/// Where the kernel's ephemeral ports begin (Linux's default if the range cannot be read).
fn ephemeral_start() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}

/// The ports `pick` chooses from: from `LOWEST` up to the ephemeral range.
fn candidates() -> anyhow::Result<std::ops::Range<u16>> {
    let end = ephemeral_start();
    if end <= LOWEST + 100 {
        bail!(
            "the ephemeral port range starts at {end} (/proc/sys/net/ipv4/ip_local_port_range), \
             leaving no ports between {LOWEST} and it for a local cluster"
        );
    }
    Ok(LOWEST..end)
}

/// A port on 127.0.0.1 that nothing listens on now, outside the ephemeral range and not in
/// `taken` (the ports this cluster has already chosen; its processes may not have bound them
/// yet).
pub fn pick(taken: &BTreeSet<u16>) -> anyhow::Result<u16> {
    let range = candidates()?;
    let size = range.end - range.start;
    let start = rand::rng().random_range(0..size);
    for step in 0..size {
        let port = range.start + (start + step) % size;
        if !taken.contains(&port) && TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!(
        "no free port on 127.0.0.1 between {} and {}",
        range.start,
        range.end - 1
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_picked_port_is_free_below_the_ephemeral_range_and_not_taken() {
        let mut taken = BTreeSet::new();
        for _ in 0..50 {
            let port = pick(&taken).unwrap();
            assert!(port >= LOWEST && port < ephemeral_start(), "port {port}");
            assert!(!taken.contains(&port), "port {port} chosen twice");
            TcpListener::bind(("127.0.0.1", port)).unwrap();
            taken.insert(port);
        }
    }

    #[test]
    fn a_port_something_listens_on_is_not_picked() {
        let range = candidates().unwrap();
        // Every candidate but one is taken; the one left is held by a listener.
        let held = (range.start..range.end)
            .find_map(|port| TcpListener::bind(("127.0.0.1", port)).ok())
            .unwrap();
        let held_port = held.local_addr().unwrap().port();
        let taken: BTreeSet<u16> = (range.start..range.end)
            .filter(|&port| port != held_port)
            .collect();
        assert!(pick(&taken).is_err());
        drop(held);
        assert_eq!(pick(&taken).unwrap(), held_port);
    }
}
