//! `hotpot cluster up|down|kill|start-node`: a local cluster of real processes (a dispatcher
//! and N nodes on 127.0.0.1, node i mounted at DIR/n<i>/mnt), described by DIR/cluster.json.
//! `down` works after crashes: it stops what still runs and unmounts what is still mounted.
//! Only processes this cluster started are signalled (pid and command line are checked).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

use crate::process::Process;
use crate::{mounts, ports};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DispatcherEntry {
    pub addr: String,
    pub pid: u32,
    pub data: PathBuf,
    pub log: PathBuf,
    /// Its command line, for `cluster start-dispatcher`.
    #[serde(default)]
    pub args: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeEntry {
    pub id: u32,
    pub addr: String,
    pub pid: u32,
    pub mount: PathBuf,
    pub pm: PathBuf,
    pub pm_size: u64,
    pub log: PathBuf,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClusterFile {
    pub dir: PathBuf,
    pub replicas: u8,
    pub dispatcher: DispatcherEntry,
    pub nodes: Vec<NodeEntry>,
    /// Arguments every node gets (its transport), at `up` and at every restart.
    #[serde(default)]
    pub node_args: Vec<String>,
}

#[derive(clap::Args, Debug)]
pub struct UpArgs {
    /// Number of nodes (1 to 16).
    #[arg(long, default_value_t = 3)]
    pub nodes: u32,
    /// Directory for everything of this cluster (PM files, mounts, logs, cluster.json).
    #[arg(long)]
    pub dir: PathBuf,
    /// Default replication degree of new datasets (clamped to the number of nodes).
    #[arg(long, default_value_t = 2)]
    pub replicas: u8,
    /// Default mode of new datasets: mrsw or mrmw.
    #[arg(long, default_value = "mrmw")]
    pub mode: hotpot_core::proto::types::Mode,
    /// PM file size of each node, e.g. 512MiB.
    #[arg(long, default_value = "512MiB", value_parser = crate::size::parse_size)]
    pub pm_size: u64,
    /// The dispatcher replaces a node silent this long as an owner (0: never).
    #[arg(long, default_value_t = 10_000)]
    pub promote_after_ms: u64,
    /// Each node's identical-page merger: pages hashed per second at most (0: off).
    #[arg(long, default_value_t = crate::node::merger::DEFAULT_PAGES_PER_S)]
    pub merge_pages_per_s: u64,
    /// Every node runs its protocol as the node machine (`hotpot node --machine`).
    #[arg(long)]
    pub machine: bool,
    /// How nodes talk to each other (every node the same).
    #[command(flatten)]
    pub transport: crate::node::transport::TransportArgs,
}

fn cluster_path(dir: &Path) -> PathBuf {
    dir.join("cluster.json")
}

pub fn load(dir: &Path) -> anyhow::Result<ClusterFile> {
    let path = cluster_path(dir);
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "no cluster at {} (missing {})",
            dir.display(),
            path.display()
        )
    })?;
    serde_json::from_str(&text)
        .with_context(|| format!("{} is not a hotpot cluster file", path.display()))
}

fn save(cluster: &ClusterFile) -> anyhow::Result<()> {
    let path = cluster_path(&cluster.dir);
    let temp = cluster.dir.join("cluster.json.tmp");
    std::fs::write(&temp, serde_json::to_string_pretty(cluster)?)?;
    std::fs::rename(&temp, &path)?;
    Ok(())
}

fn spawn_logged(args: &[String], log: &Path) -> anyhow::Result<u32> {
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe().context("finding the hotpot binary")?;
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening log {}", log.display()))?;
    let child = Command::new(exe)
        .args(args)
        .stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
        )
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting hotpot {}", args.join(" ")))?;
    Ok(child.id())
}

fn secret_path(dir: &Path) -> PathBuf {
    dir.join("secret")
}

/// A new random cluster secret, readable by its owner only; an existing one is kept.
fn ensure_secret(dir: &Path) -> anyhow::Result<PathBuf> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = secret_path(dir);
    if !path.exists() {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("writing {}", path.display()))?;
        writeln!(file, "{}", hotpot_net::Secret::generate_hex())?;
    }
    Ok(path)
}

fn node_args(cluster: &ClusterFile, node: &NodeEntry) -> Vec<String> {
    vec![
        "node".into(),
        "--secret".into(),
        secret_path(&cluster.dir).display().to_string(),
        "--id".into(),
        node.id.to_string(),
        "--dispatcher".into(),
        cluster.dispatcher.addr.clone(),
        "--listen".into(),
        node.addr.clone(),
        "--pm".into(),
        node.pm.display().to_string(),
        "--pm-size".into(),
        node.pm_size.to_string(),
        "--mount".into(),
        node.mount.display().to_string(),
    ]
    .into_iter()
    .chain(cluster.node_args.iter().cloned())
    .collect()
}

fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// Whether `pid` is a live process of this cluster. A killed process keeps its files, ports
/// and mappings until its last thread has exited, even once its main thread is a zombie, so
/// it counts as alive while any thread is not.
fn ours(pid: u32, dir: &Path) -> bool {
    if pid == 0 {
        return false;
    }
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    let running = tasks.flatten().any(|task| {
        // Reads under /proc can fail or come back empty while a thread exits or the process
        // is in exec; such a thread counts as running.
        let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
        !stat
            .rsplit(')')
            .next()
            .map(str::trim_start)
            .is_some_and(|state| state.starts_with('Z') || state.starts_with('X'))
    });
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    running
        && (cmdline.is_empty()
            || String::from_utf8_lossy(&cmdline).contains(&*dir.display().to_string()))
}

/// Process `pid` if it is a live process of this cluster, held so that a reused pid is never
/// signalled.
fn our_process(pid: u32, dir: &Path) -> Option<Process> {
    let process = Process::open(pid)?;
    ours(pid, dir).then_some(process)
}

fn wait_for_mount(node: &NodeEntry, dir: &Path, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if mounts::is_hotpot_mount(&node.mount) && std::fs::metadata(&node.mount).is_ok() {
            return Ok(());
        }
        if !ours(node.pid, dir) {
            bail!(
                "node {} exited before its mount answered; last lines of {}:\n{}",
                node.id,
                node.log.display(),
                log_tail(&node.log)
            );
        }
        if Instant::now() > deadline {
            bail!(
                "node {} mount {} did not answer within {timeout:?}; last lines of {}:\n{}",
                node.id,
                node.mount.display(),
                node.log.display(),
                log_tail(&node.log)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait_for_port(addr: &str, pid: u32, dir: &Path, log: &Path) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(addr).is_ok() {
            return Ok(());
        }
        if !ours(pid, dir) {
            bail!(
                "process exited; last lines of {}:\n{}",
                log.display(),
                log_tail(log)
            );
        }
        std::thread::sleep(Duration::from_millis(30));
    }
    bail!(
        "{addr} not answering after 20 s; last lines of {}:\n{}",
        log.display(),
        log_tail(log)
    )
}

pub fn up(args: UpArgs) -> anyhow::Result<()> {
    if !(1..=16).contains(&args.nodes) {
        bail!("--nodes {}: expected 1 to 16", args.nodes);
    }
    if args.replicas == 0 {
        bail!("--replicas must be at least 1");
    }
    let replicas = if u32::from(args.replicas) > args.nodes {
        eprintln!(
            "warning: --replicas {} clamped to {} (the number of nodes)",
            args.replicas, args.nodes
        );
        args.nodes as u8
    } else {
        args.replicas
    };
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("creating {}", args.dir.display()))?;
    let dir = args.dir.canonicalize()?;
    if cluster_path(&dir).exists() {
        let existing = load(&dir)?;
        if ours(existing.dispatcher.pid, &dir) || existing.nodes.iter().any(|n| ours(n.pid, &dir)) {
            bail!(
                "a cluster is already running in {} (run `hotpot cluster down --dir {}` first)",
                dir.display(),
                dir.display()
            );
        }
    }
    let mut every_node = args.transport.node_args()?;
    every_node.extend([
        "--merge-pages-per-s".to_string(),
        args.merge_pages_per_s.to_string(),
    ]);
    if args.machine {
        every_node.push("--machine".into());
    }
    let data = dir.join("dispatcher");
    let log = dir.join("dispatcher.log");
    let mut ports = BTreeSet::new();
    let port = ports::pick(&ports)?;
    ports.insert(port);
    let addr = format!("127.0.0.1:{port}");
    let secret = ensure_secret(&dir)?;
    let dispatcher_args: Vec<String> = vec![
        "dispatcher".into(),
        "--secret".into(),
        secret.display().to_string(),
        "--listen".into(),
        addr.clone(),
        "--data".into(),
        data.display().to_string(),
        "--default-replicas".into(),
        replicas.to_string(),
        "--default-mode".into(),
        args.mode.to_string(),
        "--promote-after-ms".into(),
        args.promote_after_ms.to_string(),
    ];
    let pid = spawn_logged(&dispatcher_args, &log)?;
    let mut cluster = ClusterFile {
        dir: dir.clone(),
        replicas,
        dispatcher: DispatcherEntry {
            addr: addr.clone(),
            pid,
            data,
            log: log.clone(),
            args: dispatcher_args.clone(),
        },
        nodes: Vec::new(),
        node_args: every_node,
    };
    save(&cluster)?;
    wait_for_port(&addr, pid, &dir, &log).context("dispatcher did not start")?;
    for id in 1..=args.nodes {
        let node_dir = dir.join(format!("n{id}"));
        let mount = node_dir.join("mnt");
        std::fs::create_dir_all(&mount)?;
        let port = ports::pick(&ports)?;
        ports.insert(port);
        let mut node = NodeEntry {
            id,
            addr: format!("127.0.0.1:{port}"),
            pid: 0,
            mount,
            pm: node_dir.join("pm"),
            pm_size: args.pm_size,
            log: node_dir.join("node.log"),
        };
        mounts::unmount_if_mounted(&node.mount);
        node.pid = spawn_logged(&node_args(&cluster, &node), &node.log)?;
        cluster.nodes.push(node);
        save(&cluster)?;
    }
    for node in &cluster.nodes {
        wait_for_mount(node, &dir, Duration::from_secs(30))?;
    }
    println!("cluster up in {}: dispatcher {addr}", dir.display());
    for node in &cluster.nodes {
        println!(
            "  node {} at {} mounted on {}",
            node.id,
            node.addr,
            node.mount.display()
        );
    }
    Ok(())
}

pub fn down(dir: &Path) -> anyhow::Result<()> {
    let dir = dir
        .canonicalize()
        .with_context(|| format!("no cluster at {}", dir.display()))?;
    let cluster = load(&dir)?;
    let nodes: Vec<(&NodeEntry, Option<Process>)> = cluster
        .nodes
        .iter()
        .map(|node| (node, our_process(node.pid, &dir)))
        .collect();
    for process in nodes.iter().filter_map(|(_, process)| process.as_ref()) {
        process.signal(libc::SIGTERM);
    }
    for (node, process) in &nodes {
        if let Some(process) = process {
            if !process.wait_ended(Duration::from_secs(10)) {
                eprintln!("node {} did not stop on SIGTERM; sending SIGKILL", node.id);
                process.signal(libc::SIGKILL);
                if !process.wait_ended(Duration::from_secs(5)) {
                    eprintln!(
                        "node {} (pid {}) survived SIGKILL for 5 s",
                        node.id, node.pid
                    );
                }
            }
        }
        mounts::unmount_if_mounted(&node.mount);
    }
    if let Some(process) = our_process(cluster.dispatcher.pid, &dir) {
        process.signal(libc::SIGTERM);
        if !process.wait_ended(Duration::from_secs(10)) {
            process.signal(libc::SIGKILL);
            process.wait_ended(Duration::from_secs(5));
        }
    }
    println!("cluster in {} is down", dir.display());
    Ok(())
}

fn node_entry(cluster: &ClusterFile, id: u32) -> anyhow::Result<NodeEntry> {
    cluster
        .nodes
        .iter()
        .find(|node| node.id == id)
        .cloned()
        .ok_or_else(|| {
            anyhow::anyhow!(
                "no node {id} in this cluster (nodes are 1 to {})",
                cluster.nodes.len()
            )
        })
}

/// SIGKILL node `id`; with `wipe` also delete its PM file (the node is lost with its data).
pub fn kill(dir: &Path, id: u32, wipe: bool) -> anyhow::Result<()> {
    let dir = dir
        .canonicalize()
        .with_context(|| format!("no cluster at {}", dir.display()))?;
    let cluster = load(&dir)?;
    let node = node_entry(&cluster, id)?;
    let Some(process) = our_process(node.pid, &dir) else {
        bail!("node {id} (pid {}) is not running", node.pid);
    };
    process.signal(libc::SIGKILL);
    if !process.wait_ended(Duration::from_secs(10)) {
        bail!("node {id} (pid {}) survived SIGKILL for 10 s", node.pid);
    }
    if wipe {
        std::fs::remove_file(&node.pm)
            .with_context(|| format!("deleting PM file {}", node.pm.display()))?;
        println!(
            "node {id} killed (pid {}), PM file {} deleted",
            node.pid,
            node.pm.display()
        );
    } else {
        println!("node {id} killed (pid {})", node.pid);
    }
    Ok(())
}

pub fn start_node(dir: &Path, id: u32) -> anyhow::Result<()> {
    let dir = dir
        .canonicalize()
        .with_context(|| format!("no cluster at {}", dir.display()))?;
    let mut cluster = load(&dir)?;
    let mut node = node_entry(&cluster, id)?;
    if ours(node.pid, &dir) {
        bail!("node {id} is already running (pid {})", node.pid);
    }
    // A killed node leaves a dead FUSE mount behind.
    mounts::unmount_if_mounted(&node.mount);
    node.pid = spawn_logged(&node_args(&cluster, &node), &node.log)?;
    for entry in cluster.nodes.iter_mut() {
        if entry.id == id {
            entry.pid = node.pid;
        }
    }
    save(&cluster)?;
    wait_for_mount(&node, &dir, Duration::from_secs(30))?;
    println!(
        "node {id} started (pid {}), mounted on {}",
        node.pid,
        node.mount.display()
    );
    Ok(())
}

pub fn arm_fault(dir: &Path, id: u32, point: &str) -> anyhow::Result<()> {
    let cluster = load(dir)?;
    let node = node_entry(&cluster, id)?;
    let secret =
        hotpot_net::Secret::load(&secret_path(dir)).map_err(|error| anyhow::anyhow!(error))?;
    let client = hotpot_net::Client::new(node.addr.clone(), secret);
    let request = hotpot_core::proto::messages::NodeRequest::ArmFault {
        point: point.to_string(),
    };
    match client
        .call::<_, hotpot_core::proto::messages::NodeReply>(&request, Duration::from_secs(5))?
    {
        hotpot_core::proto::messages::NodeReply::Done => {
            println!("node {id} crashes at {point} when it next reaches it");
            Ok(())
        }
        other => bail!("node {id} answered {other:?}"),
    }
}

/// SIGKILL the dispatcher (a crash); its state directory is kept.
pub fn kill_dispatcher(dir: &Path) -> anyhow::Result<()> {
    let dir = dir
        .canonicalize()
        .with_context(|| format!("no cluster at {}", dir.display()))?;
    let cluster = load(&dir)?;
    let pid = cluster.dispatcher.pid;
    let Some(process) = our_process(pid, &dir) else {
        bail!("the dispatcher (pid {pid}) is not running");
    };
    process.signal(libc::SIGKILL);
    if !process.wait_ended(Duration::from_secs(10)) {
        bail!("the dispatcher (pid {pid}) survived SIGKILL for 10 s");
    }
    println!("dispatcher killed (pid {pid})");
    Ok(())
}

/// Restart the dispatcher on its state directory and address; returns when it listens.
pub fn start_dispatcher(dir: &Path) -> anyhow::Result<()> {
    let dir = dir
        .canonicalize()
        .with_context(|| format!("no cluster at {}", dir.display()))?;
    let mut cluster = load(&dir)?;
    if ours(cluster.dispatcher.pid, &dir) {
        bail!(
            "the dispatcher is already running (pid {})",
            cluster.dispatcher.pid
        );
    }
    if cluster.dispatcher.args.is_empty() {
        bail!("this cluster was started by an older hotpot that did not record the dispatcher's command line");
    }
    let entry = cluster.dispatcher.clone();
    let pid = spawn_logged(&entry.args, &entry.log)?;
    cluster.dispatcher.pid = pid;
    save(&cluster)?;
    wait_for_port(&entry.addr, pid, &dir, &entry.log).context("dispatcher did not start")?;
    println!("dispatcher started (pid {pid}) on {}", entry.addr);
    Ok(())
}
