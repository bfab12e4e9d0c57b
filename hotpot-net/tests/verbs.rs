//! The verbs transport on a real RDMA device (soft-RoCE in CI: `.ci/run` runs this binary in
//! the rxe guest of `../shared/tools/rxe-vm`). The device comes from `HOTPOT_RDMA_DEV`, or
//! `RXEVM_RXE_DEV` inside that guest. Without one these tests fail with a message saying how
//! to run them, unless `HOTPOT_SKIP_VERBS=1`.
#![cfg(feature = "verbs")]

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hotpot_net::verbs::{Device, Verbs};
use hotpot_net::{Client, NetError, Secret, Server, ServerConfig, MAX_FRAME_BYTES};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

fn secret() -> Secret {
    Secret::from_bytes(b"verbs-test-secret-0123456789")
}

/// The device, or None when the run opted out; panics with what to do otherwise.
fn device() -> Option<Arc<Device>> {
    if std::env::var_os("HOTPOT_SKIP_VERBS").is_some() {
        eprintln!("HOTPOT_SKIP_VERBS is set: verbs test not run");
        return None;
    }
    let name = std::env::var("HOTPOT_RDMA_DEV")
        .or_else(|_| std::env::var("RXEVM_RXE_DEV"))
        .unwrap_or_else(|_| {
            panic!(
                "no RDMA device: set HOTPOT_RDMA_DEV (e.g. rxe0), or run this binary with \
                 ../shared/tools/rxe-vm/run-in-rxe-vm.sh as .ci/run does; \
                 HOTPOT_SKIP_VERBS=1 opts out"
            )
        });
    let gid_index = std::env::var("RXEVM_RXE_GID_INDEX")
        .ok()
        .and_then(|index| index.parse().ok());
    Some(Device::open(&name, gid_index).expect("open the RDMA device"))
}

#[derive(Serialize, Deserialize)]
enum Request {
    /// Answer with the payload reversed.
    Echo(#[serde(with = "serde_bytes")] Vec<u8>),
    /// Answer after this many milliseconds.
    Sleep(u64),
}

#[derive(Serialize, Deserialize, Debug, PartialEq)]
enum Reply {
    Echo(#[serde(with = "serde_bytes")] Vec<u8>),
    Slept,
}

fn handle(request: Request) -> Reply {
    match request {
        Request::Echo(mut bytes) => {
            bytes.reverse();
            Reply::Echo(bytes)
        }
        Request::Sleep(ms) => {
            std::thread::sleep(Duration::from_millis(ms));
            Reply::Slept
        }
    }
}

fn serve(device: &Arc<Device>) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    Server::spawn_with(
        listener,
        ServerConfig {
            secret: secret(),
            workers: 4,
            verbs: Some(device.clone()),
        },
        handle,
    )
    .unwrap()
}

fn verbs_client(device: &Arc<Device>, addr: &str) -> Client {
    Client::with_transport(addr, secret(), Arc::new(Verbs::new(device.clone())))
}

/// A size between 1 byte and `max`, log-uniform (many small, some large).
fn size(rng: &mut impl Rng, max: usize) -> usize {
    let bits = rng.random_range(0.0..(max as f64).log2());
    (2f64.powf(bits) as usize).clamp(1, max)
}

#[test]
fn ten_thousand_rpcs_of_random_sizes_from_concurrent_callers_get_their_own_replies() {
    let Some(device) = device() else { return };
    let server = serve(&device);
    let client = Arc::new(verbs_client(&device, &server.local_addr().to_string()));
    assert_eq!(client.transport(), "verbs");
    let started = Instant::now();
    let done = AtomicU64::new(0);
    let bytes = AtomicU64::new(0);
    std::thread::scope(|scope| {
        for thread in 0..8u64 {
            let client = client.clone();
            let (done, bytes) = (&done, &bytes);
            scope.spawn(move || {
                let mut rng = rand::rngs::StdRng::seed_from_u64(thread);
                for _ in 0..1250 {
                    let payload: Vec<u8> = (0..size(&mut rng, 16 << 10))
                        .map(|_| rng.random())
                        .collect();
                    let mut expected = payload.clone();
                    expected.reverse();
                    let reply: Reply = client
                        .call(&Request::Echo(payload), Duration::from_secs(120))
                        .unwrap();
                    assert_eq!(
                        reply,
                        Reply::Echo(expected),
                        "a reply went to the wrong caller"
                    );
                    bytes.fetch_add(reply_len(&reply), Ordering::Relaxed);
                    done.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
    });
    assert_eq!(done.load(Ordering::Relaxed), 10_000);
    // One frame as large as the bound allows (less the frame and message headers).
    let largest = vec![7u8; MAX_FRAME_BYTES - 64];
    let reply: Reply = client
        .call(&Request::Echo(largest), Duration::from_secs(600))
        .unwrap();
    assert_eq!(reply_len(&reply), (MAX_FRAME_BYTES - 64) as u64);
    let over = vec![0u8; MAX_FRAME_BYTES];
    assert!(matches!(
        client.call::<_, Reply>(&Request::Echo(over), Duration::from_secs(5)),
        Err(NetError::FrameTooLarge { .. })
    ));
    println!(
        "10,000 RPCs ({} MiB echoed) + one {} MiB frame over verbs in {:.1} s",
        bytes.load(Ordering::Relaxed) >> 20,
        MAX_FRAME_BYTES >> 20,
        started.elapsed().as_secs_f64()
    );
}

fn reply_len(reply: &Reply) -> u64 {
    match reply {
        Reply::Echo(bytes) => bytes.len() as u64,
        Reply::Slept => 0,
    }
}

/// Entry point of the child server process of the next test (does nothing otherwise).
#[test]
fn child_server_process() {
    if std::env::var_os("HOTPOT_VERBS_CHILD_SERVER").is_none() {
        return;
    }
    let device = device().expect("the parent checked for a device");
    let server = serve(&device);
    println!("listening {}", server.local_addr());
    std::thread::sleep(Duration::from_secs(600));
}

struct ChildServer(Child);

impl Drop for ChildServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_peer_that_dies_fails_pending_calls_with_a_typed_error_not_a_hang() {
    let Some(device) = device() else { return };
    let mut child = ChildServer(
        Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "child_server_process", "--nocapture"])
            .env("HOTPOT_VERBS_CHILD_SERVER", "1")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut lines = BufReader::new(child.0.stdout.take().unwrap()).lines();
    let addr = loop {
        let line = lines
            .next()
            .expect("the child server printed its address")
            .unwrap();
        if let Some(addr) = line.strip_prefix("listening ") {
            break addr.to_string();
        }
    };
    let client = Arc::new(verbs_client(&device, &addr));
    let reply: Reply = client
        .call(&Request::Echo(vec![1, 2, 3]), Duration::from_secs(30))
        .unwrap();
    assert_eq!(reply, Reply::Echo(vec![3, 2, 1]));
    let pending: Vec<_> = (0..4)
        .map(|_| {
            let client = client.clone();
            std::thread::spawn(move || {
                let started = Instant::now();
                let result =
                    client.call::<_, Reply>(&Request::Sleep(60_000), Duration::from_secs(60));
                (result, started.elapsed())
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let _ = child.0.kill();
    for call in pending {
        let (result, took) = call.join().unwrap();
        assert!(
            matches!(result, Err(NetError::Disconnected { .. })),
            "pending call ended with {result:?}"
        );
        assert!(took < Duration::from_secs(20), "the call took {took:?}");
    }
    let _ = child.0.wait();
    let after = client.call::<_, Reply>(&Request::Echo(vec![1]), Duration::from_secs(5));
    assert!(
        matches!(after, Err(NetError::Connect { .. })),
        "a call to the dead peer: {after:?}"
    );
}

#[test]
fn a_tcp_only_server_refuses_a_verbs_client_with_a_reason() {
    let Some(device) = device() else { return };
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let server = Server::spawn(listener, secret(), 2, handle).unwrap();
    let client = verbs_client(&device, &server.local_addr().to_string());
    match client.call::<_, Reply>(&Request::Echo(vec![1]), Duration::from_secs(5)) {
        Err(NetError::Connect { source, .. }) => {
            assert!(source.to_string().contains("TCP only"), "{source}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    let tcp = Client::new(server.local_addr().to_string(), secret());
    let reply: Reply = tcp
        .call(&Request::Echo(vec![1, 2]), Duration::from_secs(5))
        .unwrap();
    assert_eq!(reply, Reply::Echo(vec![2, 1]), "TCP clients still served");
}

#[test]
fn one_sided_reads_return_the_exposed_bytes() {
    let Some(device) = device() else { return };
    // A process exposes one region; this test owns it for the process's life.
    let region: &'static mut [u8] = Box::leak(vec![0u8; 1 << 20].into_boxed_slice());
    for (index, byte) in region.iter_mut().enumerate() {
        *byte = (index * 7 % 251) as u8;
    }
    // SAFETY: leaked above, so mapped for the life of the process.
    unsafe { device.expose(region.as_mut_ptr(), region.len()) }.unwrap();
    let server = serve(&device);
    let client = verbs_client(&device, &server.local_addr().to_string());
    assert_eq!(client.remote_bytes(), 1 << 20);
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    for _ in 0..200 {
        let length = rng.random_range(1..200_000);
        let offset = rng.random_range(0..(1 << 20) - length);
        let mut read = vec![0u8; length];
        client.remote_read(offset as u64, &mut read).unwrap();
        assert_eq!(read, region[offset..offset + length]);
    }
    let mut past = vec![0u8; 16];
    assert!(client.remote_read((1 << 20) - 8, &mut past).is_err());
    let tcp = Client::new(server.local_addr().to_string(), secret());
    assert_eq!(tcp.remote_bytes(), 0);
    assert!(matches!(
        tcp.remote_read(0, &mut past),
        Err(NetError::Unsupported { .. })
    ));
}
