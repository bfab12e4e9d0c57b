//! Harness for multi-process tests: builds the `hotpot` binary, starts clusters of real
//! processes in unique temp dirs with unique ports, and tears them down (processes stopped,
//! mounts unmounted, files removed) when the guard drops, also when a test fails.
//! Prerequisites that are missing fail the test with what to install, unless the opt-out
//! variable HOTPOT_SKIP_FUSE_TESTS=1 is set (then the test says it skipped).

pub mod writer;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

static HOTPOT_BIN: OnceLock<PathBuf> = OnceLock::new();

/// The `hotpot` binary of this workspace, built once per test process, with the crash points
/// of the recovery tests compiled in (inert unless armed) and the verbs transport.
/// `HOTPOT_TEST_BIN` names a binary built that way instead (the rxe guest of `.ci/run`, where
/// cargo is slow, uses it).
pub fn hotpot_bin() -> PathBuf {
    HOTPOT_BIN
        .get_or_init(|| {
            if let Some(bin) = std::env::var_os("HOTPOT_TEST_BIN") {
                let bin = PathBuf::from(bin);
                assert!(
                    bin.exists(),
                    "HOTPOT_TEST_BIN={} does not exist",
                    bin.display()
                );
                return bin;
            }
            let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
                .parent()
                .expect("workspace")
                .to_path_buf();
            let target = std::env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| workspace.join("target"));
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let status = Command::new(cargo)
                .args([
                    "build",
                    "--quiet",
                    "-p",
                    "hotpot-tools",
                    "--bin",
                    "hotpot",
                    "--features",
                    "fault-injection,verbs",
                ])
                .current_dir(&workspace)
                .status()
                .expect("run cargo build for the hotpot binary");
            assert!(status.success(), "building the hotpot binary failed");
            let bin = target.join("debug").join("hotpot");
            assert!(bin.exists(), "no hotpot binary at {}", bin.display());
            bin
        })
        .clone()
}

/// Drop the kernel's cached pages of `file` (clean ones: a dirty page is written back
/// first): the next read of them asks the node.
pub fn drop_cached_pages(file: &std::fs::File) {
    use std::os::fd::AsRawFd;
    // SAFETY: an advisory call on a descriptor the caller holds open.
    let status = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(status, 0, "posix_fadvise(DONTNEED) failed: errno {status}");
}

/// `true` if the test should run; `false` (with a note) only under the explicit opt-out.
/// Panics with what to install when FUSE is missing.
pub fn fuse_available() -> bool {
    if std::env::var("HOTPOT_SKIP_FUSE_TESTS").as_deref() == Ok("1") {
        eprintln!("SKIPPED: HOTPOT_SKIP_FUSE_TESTS=1 is set");
        return false;
    }
    assert!(
        Path::new("/dev/fuse").exists(),
        "/dev/fuse is missing: these tests need FUSE (modprobe fuse; apt-get install fuse3), \
         or set HOTPOT_SKIP_FUSE_TESTS=1 to skip them explicitly"
    );
    // SAFETY: geteuid cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    assert!(
        root || which("fusermount3"),
        "mounting needs root or fusermount3 (apt-get install fuse3), or set HOTPOT_SKIP_FUSE_TESTS=1"
    );
    true
}

pub fn which(program: &str) -> bool {
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
        .unwrap_or(false)
}

/// Panics with an install hint if `program` is not on PATH.
pub fn require_program(program: &str, install: &str) {
    assert!(which(program), "{program} is not installed: {install}");
}

pub fn run(command: &mut Command) -> Output {
    let output = command
        .output()
        .unwrap_or_else(|error| panic!("cannot run {command:?}: {error}"));
    output
}

pub fn run_ok(command: &mut Command) -> String {
    let output = run(command);
    assert!(
        output.status.success(),
        "{command:?} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).to_string()
}

/// `hotpot cluster up` arguments for the transport the tests run on: TCP, unless
/// `HOTPOT_TEST_TRANSPORT=verbs`, then verbs on `HOTPOT_RDMA_DEV` (or, in the rxe guest,
/// `RXEVM_RXE_DEV` with its GID index).
pub fn transport_args() -> Vec<String> {
    match std::env::var("HOTPOT_TEST_TRANSPORT").as_deref() {
        Err(_) | Ok("tcp") => Vec::new(),
        Ok("verbs") => {
            let device = std::env::var("HOTPOT_RDMA_DEV")
                .or_else(|_| std::env::var("RXEVM_RXE_DEV"))
                .expect("HOTPOT_TEST_TRANSPORT=verbs needs HOTPOT_RDMA_DEV (e.g. rxe0)");
            let mut args = vec![
                "--transport".into(),
                "verbs".into(),
                "--rdma-dev".into(),
                device,
            ];
            if let Ok(index) = std::env::var("RXEVM_RXE_GID_INDEX") {
                args.extend(["--rdma-gid-index".into(), index]);
            }
            args
        }
        Ok(other) => panic!("HOTPOT_TEST_TRANSPORT={other}: tcp or verbs"),
    }
}

/// `hotpot cluster up` arguments for the node protocol the tests run: the thread-based one,
/// unless `HOTPOT_TEST_MACHINE=1`, then the node machine (`--machine`).
pub fn protocol_args() -> Vec<String> {
    match std::env::var("HOTPOT_TEST_MACHINE").as_deref() {
        Err(_) | Ok("0") => Vec::new(),
        Ok("1") => vec!["--machine".into()],
        Ok(other) => panic!("HOTPOT_TEST_MACHINE={other}: 0 or 1"),
    }
}

/// The transport name `hotpot status` should show for the links of a test cluster.
pub fn expected_transport() -> &'static str {
    if transport_args().is_empty() {
        "tcp"
    } else {
        "verbs"
    }
}

/// The chunk owners a `hotpot stat --json` answer lists.
pub fn owners_in(stat: &serde_json::Value) -> Vec<u64> {
    stat["chunk_owners"]
        .as_array()
        .expect("chunk_owners")
        .iter()
        .map(|owner| owner.as_u64().expect("a node id"))
        .collect()
}

/// A running local cluster; stopped and removed on drop.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub nodes: u32,
    /// Environment for every node this cluster starts (and restarts).
    env: Vec<(String, String)>,
}

impl Cluster {
    pub fn up(nodes: u32, pm_size: &str) -> Cluster {
        Cluster::up_with_env(nodes, pm_size, &[])
    }

    /// `up`, with `env` set for every node process (now and at restarts).
    pub fn up_with_env(nodes: u32, pm_size: &str, env: &[(&str, &str)]) -> Cluster {
        Cluster::up_with(nodes, pm_size, env, &[])
    }

    /// `up_with_env`, with more arguments for `hotpot cluster up` (e.g. promotion timing).
    pub fn up_with(nodes: u32, pm_size: &str, env: &[(&str, &str)], up_args: &[&str]) -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("hotpot-test-")
            .tempdir()
            .expect("temp dir");
        let cluster = Cluster {
            dir,
            nodes,
            env: env
                .iter()
                .map(|(key, value)| (key.to_string(), value.to_string()))
                .collect(),
        };
        run_ok(
            Command::new(hotpot_bin())
                .envs(cluster.env.iter().map(|(k, v)| (k, v)))
                .args([
                    "cluster",
                    "up",
                    "--nodes",
                    &nodes.to_string(),
                    "--pm-size",
                    pm_size,
                    "--dir",
                ])
                .arg(cluster.dir.path())
                .args(up_args)
                .args(transport_args())
                .args(if up_args.contains(&"--machine") {
                    Vec::new()
                } else {
                    protocol_args()
                }),
        );
        cluster
    }

    /// Every node reports open links to its peers (within 5 s: heartbeats carry them), all
    /// over `transport`.
    pub fn assert_links_use(&self, transport: &str) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let status = self.status_json();
            let nodes = status["nodes"].as_array().expect("nodes").clone();
            let links: Vec<(u64, String)> = nodes
                .iter()
                .flat_map(|node| {
                    let id = node["id"].as_u64().expect("id");
                    node["usage"]["links"]
                        .as_array()
                        .cloned()
                        .unwrap_or_default()
                        .into_iter()
                        .map(move |link| (id, link["transport"].as_str().unwrap_or("").to_string()))
                })
                .collect();
            let every_node_linked = nodes
                .iter()
                .all(|node| links.iter().any(|(id, _)| Some(*id) == node["id"].as_u64()));
            if every_node_linked {
                assert!(
                    links.iter().all(|(_, used)| used == transport),
                    "links not all over {transport}: {links:?}"
                );
                return;
            }
            assert!(
                Instant::now() < deadline,
                "not every node reports a link: {links:?}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn mount(&self, node: u32) -> PathBuf {
        self.dir.path().join(format!("n{node}")).join("mnt")
    }

    pub fn pm_file(&self, node: u32) -> PathBuf {
        self.dir.path().join(format!("n{node}")).join("pm")
    }

    pub fn info(&self) -> serde_json::Value {
        let text =
            std::fs::read_to_string(self.dir.path().join("cluster.json")).expect("cluster.json");
        serde_json::from_str(&text).expect("cluster.json parses")
    }

    pub fn dispatcher_addr(&self) -> String {
        self.info()["dispatcher"]["addr"]
            .as_str()
            .expect("dispatcher addr")
            .to_string()
    }

    pub fn hotpot(&self, args: &[&str]) -> String {
        run_ok(Command::new(hotpot_bin()).args(args))
    }

    pub fn secret_file(&self) -> PathBuf {
        self.dir.path().join("secret")
    }

    /// `hotpot create` of a dataset under node `node`'s mount; returns its path.
    pub fn create(&self, node: u32, name: &str, size: &str, mode: &str, replicas: u32) -> PathBuf {
        self.create_chunked(node, name, size, mode, replicas, "4MiB")
    }

    /// `create` with a chunk size (the unit of ownership).
    pub fn create_chunked(
        &self,
        node: u32,
        name: &str,
        size: &str,
        mode: &str,
        replicas: u32,
        chunk: &str,
    ) -> PathBuf {
        let path = self.mount(node).join(name);
        run_ok(
            Command::new(hotpot_bin())
                .args([
                    "create",
                    "--size",
                    size,
                    "--mode",
                    mode,
                    "--replicas",
                    &replicas.to_string(),
                ])
                .args(["--chunk-size", chunk])
                .arg(&path),
        );
        path
    }

    pub fn stat_json(&self, path: &Path) -> serde_json::Value {
        let text = run_ok(
            Command::new(hotpot_bin())
                .args(["stat", "--json"])
                .arg(path),
        );
        serde_json::from_str(&text).expect("stat JSON")
    }

    /// The owner of each chunk of the dataset at `path`, from `hotpot stat`.
    pub fn chunk_owners(&self, path: &Path) -> Vec<u64> {
        owners_in(&self.stat_json(path))
    }

    pub fn status_json(&self) -> serde_json::Value {
        let text = run_ok(
            Command::new(hotpot_bin())
                .args(["status", "--json", "--dir"])
                .arg(self.dir.path()),
        );
        serde_json::from_str(&text).expect("status JSON")
    }

    /// Poll `hotpot status --json` until `ready` holds for it, and return it; fails after
    /// `within`, saying `what` did not happen, with the last status.
    pub fn wait_for_status(
        &self,
        within: Duration,
        what: &str,
        ready: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + within;
        loop {
            let status = self.status_json();
            if ready(&status) {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: not within {within:?}: {status}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Wait until every live node counts every live node as live (each learns of a node
    /// that joined at its next heartbeat, and replicates only to nodes it counts as live).
    pub fn wait_views_settled(&self) {
        let what = "nodes' views of who is live settle";
        self.wait_for_status(Duration::from_secs(20), what, |status| {
            let nodes = status["nodes"].as_array().expect("nodes");
            let live: Vec<&serde_json::Value> = nodes
                .iter()
                .filter(|node| node["live"] == true)
                .map(|node| &node["id"])
                .collect();
            nodes
                .iter()
                .filter(|node| node["live"] == true)
                .all(|node| {
                    let sees = node["usage"]["sees_live"].as_array();
                    sees.is_some_and(|sees| live.iter().all(|id| sees.contains(id)))
                })
        });
    }

    /// Wait until node `owner` counts node `node` as down.
    pub fn wait_counted_down(&self, owner: u32, node: u32) {
        let what = format!("the owner, node {owner}, counts node {node} as down");
        self.wait_for_status(Duration::from_secs(20), &what, |status| {
            node_in(status, owner)["usage"]["sees_live"]
                .as_array()
                .is_some_and(|live| !live.iter().any(|id| *id == node))
        });
    }

    /// SIGKILL node `node` and delete its PM file: the node is lost with its data.
    pub fn kill_and_wipe(&self, node: u32) {
        run_ok(
            Command::new(hotpot_bin())
                .args([
                    "cluster",
                    "kill",
                    "--wipe",
                    "--node",
                    &node.to_string(),
                    "--dir",
                ])
                .arg(self.dir.path()),
        );
    }

    pub fn kill(&self, node: u32) {
        run_ok(
            Command::new(hotpot_bin())
                .args(["cluster", "kill", "--node", &node.to_string(), "--dir"])
                .arg(self.dir.path()),
        );
    }

    pub fn start(&self, node: u32) {
        if let Err(why) = self.try_start(node) {
            panic!("{why}");
        }
    }

    /// `start`, returning what went wrong instead of panicking.
    pub fn try_start(&self, node: u32) -> Result<(), String> {
        self.try_start_with_env(node, &[])
    }

    /// `try_start` with more environment for this start only (e.g. `HOTPOT_FAULT`).
    pub fn try_start_with_env(&self, node: u32, env: &[(&str, &str)]) -> Result<(), String> {
        let output = run(Command::new(hotpot_bin())
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .envs(env.iter().copied())
            .args([
                "cluster",
                "start-node",
                "--node",
                &node.to_string(),
                "--dir",
            ])
            .arg(self.dir.path()));
        if output.status.success() {
            Ok(())
        } else {
            Err(format!(
                "restarting node {node} failed: {}",
                String::from_utf8_lossy(&output.stderr)
            ))
        }
    }

    pub fn kill_dispatcher(&self) {
        run_ok(
            Command::new(hotpot_bin())
                .args(["cluster", "kill-dispatcher", "--dir"])
                .arg(self.dir.path()),
        );
    }

    pub fn start_dispatcher(&self) {
        run_ok(
            Command::new(hotpot_bin())
                .args(["cluster", "start-dispatcher", "--dir"])
                .arg(self.dir.path()),
        );
    }

    /// Make node `node` crash (SIGKILL itself) the next time it reaches `point`.
    pub fn arm_fault(&self, node: u32, point: &str) {
        run_ok(
            Command::new(hotpot_bin())
                .args([
                    "cluster",
                    "arm-fault",
                    "--node",
                    &node.to_string(),
                    "--point",
                    point,
                    "--dir",
                ])
                .arg(self.dir.path()),
        );
    }

    /// Node `node`'s process id, as cluster.json records it.
    pub fn pid(&self, node: u32) -> u64 {
        let info = self.info();
        info["nodes"]
            .as_array()
            .expect("nodes")
            .iter()
            .find(|entry| entry["id"] == node)
            .and_then(|entry| entry["pid"].as_u64())
            .expect("node pid")
    }

    /// Stop node `node` (SIGSTOP): alive, holding its copies, but silent (no heartbeat, no
    /// answer) until the guard is dropped. Nothing may touch its mount meanwhile.
    pub fn pause(&self, node: u32) -> Paused {
        let pid = libc::pid_t::try_from(self.pid(node)).expect("a pid");
        // SAFETY: kill only sends a signal to a process this cluster started.
        let sent = unsafe { libc::kill(pid, libc::SIGSTOP) };
        assert_eq!(
            sent,
            0,
            "SIGSTOP to node {node}: {}",
            std::io::Error::last_os_error()
        );
        Paused { pid }
    }

    /// Whether node `node`'s process (as cluster.json records it) still has a thread that
    /// has not exited: a killed process holds its files (the PM file's lock) until its last
    /// thread is gone, even when its main thread is already a zombie.
    pub fn is_running(&self, node: u32) -> bool {
        let pid = self.pid(node);
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            return false;
        };
        tasks.flatten().any(|task| {
            let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
            // The state follows the parenthesised command name.
            let state = stat
                .rsplit(')')
                .next()
                .and_then(|rest| rest.split_whitespace().next());
            !matches!(state, None | Some("Z") | Some("X"))
        })
    }

    /// File `name` opened for reading and writing through node `node`'s mount.
    pub fn open_rw(&self, node: u32, name: &str) -> std::fs::File {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(self.mount(node).join(name))
            .unwrap_or_else(|error| panic!("open {name} on node {node}: {error}"))
    }

    /// The first page of file `name`, read through node `node`'s mount.
    pub fn first_page(&self, node: u32, name: &str) -> Vec<u8> {
        let bytes = std::fs::read(self.mount(node).join(name))
            .unwrap_or_else(|error| panic!("read {name} on node {node}: {error}"));
        bytes[..4096].to_vec()
    }

    /// Wait until node `node` has died at crash point `point` (armed with `arm_fault` or
    /// `HOTPOT_FAULT`); fails if it is still running after `within` or died elsewhere.
    pub fn wait_crashed_at(&self, node: u32, point: &str, within: Duration) {
        let deadline = Instant::now() + within;
        while self.is_running(node) {
            assert!(
                Instant::now() < deadline,
                "node {node} never reached {point} within {within:?}: {}\nstatus: {}",
                self.node_log(node),
                self.status_json()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(
            self.node_log(node)
                .contains(&format!("crashing at {point}")),
            "node {node} died elsewhere than {point}: {}",
            self.node_log(node)
        );
    }

    pub fn node_log(&self, node: u32) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("n{node}")).join("node.log"))
            .unwrap_or_default()
    }

    /// Every node's log, the dispatcher's and `cluster.json`, copied to `name` in the temp
    /// directory, which outlives the cluster (for a failing test to point at).
    pub fn keep_logs(&self, name: &str) -> PathBuf {
        let kept = std::env::temp_dir().join(name);
        let _ = std::fs::create_dir_all(&kept);
        for node in 1..=self.nodes {
            let _ = std::fs::write(kept.join(format!("n{node}.log")), self.node_log(node));
        }
        for file in ["dispatcher.log", "cluster.json"] {
            let _ = std::fs::copy(self.dir.path().join(file), kept.join(file));
        }
        kept
    }
}

/// Wait up to 20 s for `read` (node `node`'s view of a page) to give `new`. Until then it may
/// only give `old`: anything else is bytes no commit wrote and fails at once. Still `old` at
/// the deadline fails with `stale` and the log of node `log_of`.
pub fn wait_until_reads(
    cluster: &Cluster,
    (node, log_of): (u32, u32),
    read: impl Fn() -> Vec<u8>,
    (old, new): (&[u8], &[u8]),
    stale: &str,
) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let page = read();
        if page == new {
            return;
        }
        assert_eq!(page, old, "node {node} reads bytes no commit wrote");
        assert!(
            Instant::now() < deadline,
            "node {node} {stale}, 20 s on
node {log_of}'s log: {}",
            cluster.node_log(log_of)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Node `id`'s entry in a `hotpot status --json`.
pub fn node_in(status: &serde_json::Value, id: u32) -> &serde_json::Value {
    status["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .find(|entry| entry["id"] == id)
        .unwrap_or_else(|| panic!("node {id} is not in the status: {status}"))
}

/// A node stopped by `Cluster::pause`; continued (SIGCONT) on drop, even when a test fails.
pub struct Paused {
    pid: libc::pid_t,
}

impl Drop for Paused {
    fn drop(&mut self) {
        // SAFETY: kill only sends a signal to the process `pause` stopped.
        unsafe { libc::kill(self.pid, libc::SIGCONT) };
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // No binary, no cluster started (and building it again would panic while unwinding).
        let Some(bin) = HOTPOT_BIN.get() else {
            return;
        };
        let output = Command::new(bin)
            .args(["cluster", "down", "--dir"])
            .arg(self.dir.path())
            .output();
        if let Ok(output) = output {
            if !output.status.success() {
                eprintln!(
                    "cluster down failed: {}",
                    String::from_utf8_lossy(&output.stderr)
                );
            }
        }
    }
}

/// A shared read-write mapping of a whole file; unmapped on drop.
pub struct Mapping {
    pub ptr: *mut u8,
    pub len: usize,
}

impl Mapping {
    pub fn new(file: &std::fs::File, len: usize) -> Mapping {
        Mapping::with_protection(file, len, libc::PROT_READ | libc::PROT_WRITE)
    }

    pub fn new_read_only(file: &std::fs::File, len: usize) -> Mapping {
        Mapping::with_protection(file, len, libc::PROT_READ)
    }

    fn with_protection(file: &std::fs::File, len: usize, protection: i32) -> Mapping {
        use std::os::fd::AsRawFd;
        // SAFETY: mapping a file we hold open, with its length.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                protection,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        assert_ne!(
            ptr,
            libc::MAP_FAILED,
            "mmap: {}",
            std::io::Error::last_os_error()
        );
        Mapping {
            ptr: ptr as *mut u8,
            len,
        }
    }

    /// The mapped bytes. For a read-only mapping only read them.
    pub fn bytes(&mut self) -> &mut [u8] {
        // SAFETY: the mapping is valid for len bytes while self lives.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }

    /// A copy of page `page` as the mapping shows it (through the kernel's page cache).
    pub fn page(&self, page: usize) -> Vec<u8> {
        assert!((page + 1) * 4096 <= self.len, "page {page} is mapped");
        // SAFETY: the mapping is valid for len bytes while self lives; only read.
        unsafe { std::slice::from_raw_parts(self.ptr.add(page * 4096), 4096).to_vec() }
    }

    /// msync(MS_SYNC) of the whole mapping: hotpot's commit point.
    pub fn msync(&self) -> std::io::Result<()> {
        // SAFETY: syncing our own mapping.
        let rc = unsafe { libc::msync(self.ptr as *mut libc::c_void, self.len, libc::MS_SYNC) };
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping what new() mapped.
        unsafe {
            libc::munmap(self.ptr as *mut libc::c_void, self.len);
        }
    }
}

/// Deterministic page contents: `stamp` and `page` recoverable from the bytes.
pub fn page_pattern(stamp: u64, page: u64) -> Vec<u8> {
    let mut bytes = vec![0u8; 4096];
    for (index, word) in bytes.chunks_mut(8).enumerate() {
        let value = stamp.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (page << 20) ^ index as u64;
        word.copy_from_slice(&value.to_le_bytes());
    }
    bytes
}
