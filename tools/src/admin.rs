//! `hotpot create`, `status`, `stat`: read and change the live cluster through the
//! dispatcher (found from the mount a path is in, or given) and the nodes.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use hotpot_core::proto::messages::{DispatcherReply, DispatcherRequest, NodeReply, NodeRequest};
use hotpot_core::proto::types::*;
use hotpot_net::{multicall, Client, Secret};

use crate::{cluster, mounts};

const TIMEOUT: Duration = Duration::from_secs(10);

/// Where to find the dispatcher when no path names a mount.
#[derive(clap::Args, Debug)]
pub struct Target {
    /// Dispatcher address, host:port.
    #[arg(long, conflicts_with = "dir")]
    pub dispatcher: Option<String>,
    /// Cluster directory made by `hotpot cluster up`.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Cluster secret file (default: the `secret` of the cluster directory, if found).
    #[arg(long)]
    pub secret: Option<PathBuf>,
}

impl Target {
    /// The dispatcher to ask and the secret to prove.
    fn client(&self) -> anyhow::Result<Client> {
        if let Some(addr) = &self.dispatcher {
            return Ok(Client::new(
                addr.clone(),
                secret_near(self.secret.as_deref(), None)?,
            ));
        }
        if let Some(dir) = &self.dir {
            let addr = cluster::load(dir)?.dispatcher.addr;
            return Ok(Client::new(
                addr,
                secret_near(self.secret.as_deref(), Some(dir))?,
            ));
        }
        match mounts::hotpot_mounts().first() {
            Some(mount) => Ok(Client::new(
                mount.dispatcher.clone(),
                secret_near(self.secret.as_deref(), Some(&mount.mount_point))?,
            )),
            None => bail!("no hotpot mount here: give --dispatcher HOST:PORT or --dir CLUSTER_DIR"),
        }
    }
}

/// The secret to use: `explicit`, else the `secret` file of the first directory at or above
/// `near` that holds a `cluster.json` (a cluster made by `hotpot cluster up`), else none.
pub fn secret_near(explicit: Option<&Path>, near: Option<&Path>) -> anyhow::Result<Secret> {
    if let Some(path) = explicit {
        return Secret::load(path).map_err(|error| anyhow::anyhow!(error));
    }
    for dir in near.into_iter().flat_map(Path::ancestors) {
        if dir.join("cluster.json").is_file() && dir.join("secret").is_file() {
            return Secret::load(&dir.join("secret")).map_err(|error| anyhow::anyhow!(error));
        }
    }
    Ok(Secret::none())
}

fn ask(client: &Client, request: DispatcherRequest) -> anyhow::Result<DispatcherReply> {
    match client
        .call(&request, TIMEOUT)
        .with_context(|| format!("asking the dispatcher at {}", client.addr()))?
    {
        DispatcherReply::Failed(error) => Err(anyhow::anyhow!(error)),
        reply => Ok(reply),
    }
}

fn attr_of(reply: DispatcherReply) -> anyhow::Result<Attr> {
    match reply {
        DispatcherReply::Attr(attr) => Ok(attr),
        other => bail!("dispatcher sent {other:?} where attributes were due"),
    }
}

#[derive(clap::Args, Debug)]
pub struct CreateArgs {
    /// Path of the new file, inside a hotpot mount.
    pub path: PathBuf,
    /// Size, e.g. 256MiB.
    #[arg(long, value_parser = crate::size::parse_size)]
    pub size: u64,
    /// mrsw (single writer, single-phase commit) or mrmw (multiple writers, three-phase).
    #[arg(long, default_value = "mrmw")]
    pub mode: Mode,
    /// Replication degree: copies of every committed page (clamped to live nodes).
    #[arg(long, default_value_t = DEFAULT_REPLICAS)]
    pub replicas: u8,
    /// Chunk size (unit of ownership), a multiple of 4KiB.
    #[arg(long, default_value = "4MiB", value_parser = crate::size::parse_size)]
    pub chunk_size: u64,
    /// File mode bits.
    #[arg(long, default_value = "644", value_parser = parse_octal)]
    pub perm: u32,
    /// Cluster secret file (default: the `secret` of the cluster directory, if found).
    #[arg(long)]
    pub secret: Option<PathBuf>,
}

fn parse_octal(text: &str) -> Result<u32, String> {
    u32::from_str_radix(text, 8)
        .ok()
        .filter(|mode| *mode <= 0o7777)
        .ok_or_else(|| format!("'{text}' is not an octal mode such as 644"))
}

fn split_parent(inside: &str) -> anyhow::Result<(String, String)> {
    let path = Path::new(inside);
    let name = path
        .file_name()
        .and_then(|name| name.to_str())
        .ok_or_else(|| anyhow::anyhow!("'{inside}' names no file"))?;
    let parent = path
        .parent()
        .map(|p| p.to_string_lossy().to_string())
        .unwrap_or_default();
    Ok((parent, name.to_string()))
}

pub fn create(args: CreateArgs) -> anyhow::Result<()> {
    if args.replicas == 0 {
        bail!("--replicas must be at least 1");
    }
    let chunk_pages = crate::dispatcher::chunk_pages(args.chunk_size)?;
    let (mount, inside) = mounts::locate(&args.path)?;
    let (parent_path, name) = split_parent(&inside)?;
    let client = Client::new(
        mount.dispatcher.clone(),
        secret_near(args.secret.as_deref(), Some(&mount.mount_point))?,
    );
    let parent = attr_of(ask(
        &client,
        DispatcherRequest::Resolve {
            path: parent_path.clone(),
        },
    )?)
    .with_context(|| format!("parent directory '{parent_path}'"))?;
    let status = match ask(&client, DispatcherRequest::Status)? {
        DispatcherReply::Status { nodes, .. } => nodes,
        other => bail!("dispatcher sent {other:?} for status"),
    };
    let live = status.iter().filter(|node| node.live).count();
    let replicas = if usize::from(args.replicas) > live {
        eprintln!(
            "warning: --replicas {} clamped to {live} live nodes",
            args.replicas
        );
        live.max(1) as u8
    } else {
        args.replicas
    };
    // SAFETY: getuid/getgid cannot fail.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let attr = attr_of(ask(
        &client,
        DispatcherRequest::Create {
            parent: parent.ino,
            name,
            mode: args.perm,
            uid,
            gid,
            size: args.size,
            params: Some(DatasetParams {
                mode: args.mode,
                replicas,
                chunk_pages,
            }),
            exclusive: true,
        },
    )?)
    .with_context(|| format!("creating {}", args.path.display()))?;
    let dataset = attr.dataset.expect("a created file has a dataset");
    println!(
        "created {}: dataset {}, {} bytes, mode {}, replicas {}, chunk {} KiB, owners {:?}",
        args.path.display(),
        dataset.id,
        attr.size,
        dataset.params.mode,
        dataset.params.replicas,
        dataset.params.chunk_pages * 4,
        dataset.owners
    );
    Ok(())
}

pub fn status(target: Target, json: bool) -> anyhow::Result<()> {
    let client = target.client()?;
    let (cluster_id, nodes, successors) = match ask(&client, DispatcherRequest::Status)? {
        DispatcherReply::Status {
            cluster_id,
            nodes,
            successors,
        } => (cluster_id, nodes, successors),
        other => bail!("dispatcher sent {other:?} for status"),
    };
    if json {
        let replaced: serde_json::Map<String, serde_json::Value> = successors
            .iter()
            .map(|(node, by)| (node.to_string(), serde_json::json!(by)))
            .collect();
        println!(
            "{}",
            serde_json::json!({
                "cluster_id": format!("{cluster_id:016x}"),
                "nodes": nodes,
                "owners_replaced": replaced,
            })
        );
        return Ok(());
    }
    println!("cluster {cluster_id:016x}, dispatcher {}", client.addr());
    let live: Vec<NodeId> = nodes.iter().filter(|n| n.live).map(|n| n.id).collect();
    println!(
        "{:>4}  {:<5}  {:<21}  {:>9}  {:>14}  {:>9}  {:<28}  {:<24}  {:<20}  {:<14}  mount",
        "node",
        "live",
        "address",
        "heartbeat",
        "PM used",
        "pages",
        "recovery",
        "links",
        "merged",
        "views"
    );
    for node in nodes {
        let beat = if node.last_heartbeat_ms_ago == u64::MAX {
            "never".to_string()
        } else {
            format!("{} ms", node.last_heartbeat_ms_ago)
        };
        let used_mib = (node.usage.pm_frames_used * 4096) as f64 / (1 << 20) as f64;
        let total_mib = (node.usage.pm_frames_total * 4096) >> 20;
        let recovery = &node.usage.recovery;
        let mut said = vec![if recovery.state.is_empty() {
            "-".to_string()
        } else {
            format!("{} ({} ms)", recovery.state, recovery.rejoin_ms)
        }];
        if recovery.commits_waiting > 0 {
            said.push(format!("{} waiting", recovery.commits_waiting));
        }
        if recovery.pages_below_copies > 0 {
            said.push(format!("{} under-copied", recovery.pages_below_copies));
        }
        if !recovery.unconfirmed_by.is_empty() {
            let by: Vec<String> = recovery
                .unconfirmed_by
                .iter()
                .map(|id| id.to_string())
                .collect();
            said.push(format!("copies unconfirmed by {}", by.join(",")));
        }
        if let Some(by) = successors.get(&node.id) {
            said.push(format!("its chunks owned by node {by}"));
        }
        // Live nodes it does not count as live yet (its next heartbeat tells it).
        let unseen: Vec<String> = live
            .iter()
            .filter(|id| !node.usage.sees_live.contains(id))
            .map(|id| id.to_string())
            .collect();
        if node.live && !unseen.is_empty() {
            said.push(format!("not yet seeing {}", unseen.join(",")));
        }
        // Each open connection to a peer: "2:verbs" ("+read": its PM is read one-sided).
        let links: Vec<String> = node
            .usage
            .links
            .iter()
            .map(|link| {
                let read = if link.one_sided { "+read" } else { "" };
                format!("{}:{}{read}", link.peer, link.transport)
            })
            .collect();
        // Identical pages sharing a frame: "12 frames, 3.0 MiB saved".
        let sharing = &node.usage.sharing;
        let merged = format!(
            "{} frames, {:.1} MiB saved",
            sharing.frames_shared,
            sharing.bytes_saved as f64 / (1 << 20) as f64
        );
        // Views pinned at this owner and the old page versions kept for them.
        let versions = &node.usage.versions;
        let views = format!("{} ({} kept)", versions.views_pinned, versions.frames_kept);
        println!(
            "{:>4}  {:<5}  {:<21}  {:>9}  {:>14}  {:>9}  {:<28}  {:<24}  {:<20}  {:<14}  {}",
            node.id,
            if node.live { "yes" } else { "no" },
            node.addr,
            beat,
            format!("{used_mib:.1}/{total_mib} MiB"),
            node.usage.pages_persisted,
            said.join(", "),
            if links.is_empty() {
                "-".to_string()
            } else {
                links.join(" ")
            },
            merged,
            views,
            node.mount
        );
    }
    Ok(())
}

/// How long `stat` waits for the latest version (the rest does not wait for it).
const LATEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

pub fn stat(path: &Path, secret: Option<&Path>, json: bool) -> anyhow::Result<()> {
    let (mount, inside) = mounts::locate(path)?;
    let secret = secret_near(secret, Some(&mount.mount_point))?;
    let client = Client::new(mount.dispatcher.clone(), secret.clone());
    let attr = attr_of(ask(&client, DispatcherRequest::Resolve { path: inside })?)
        .with_context(|| format!("{}", path.display()))?;
    let Some(dataset) = attr.dataset.clone() else {
        bail!(
            "{} is not a dataset (a directory or a symbolic link)",
            path.display()
        );
    };
    let (nodes, successors) = match ask(&client, DispatcherRequest::Status)? {
        DispatcherReply::Status {
            nodes, successors, ..
        } => (nodes, successors),
        other => bail!("dispatcher sent {other:?} for status"),
    };
    // Chunks of a replaced node are owned by its successor.
    let owner_of_chunk = |chunk: u64| {
        let owner = dataset.owner_of_chunk(chunk);
        successors.get(&owner).copied().unwrap_or(owner)
    };
    let live: Vec<&NodeInfo> = nodes.iter().filter(|node| node.live).collect();
    let clients: Vec<Arc<Client>> = live
        .iter()
        .map(|node| Arc::new(Client::new(node.addr.clone(), secret.clone())))
        .collect();
    let replies = multicall::<_, NodeReply>(
        &clients,
        &NodeRequest::PageCopies {
            dataset: dataset.id,
        },
        TIMEOUT,
    );
    let mut per_node = Vec::new();
    for (node, reply) in live.iter().zip(replies) {
        match reply {
            Ok(NodeReply::PageCopies(copies)) => per_node.push((node.id, copies)),
            Ok(NodeReply::Failed(error)) => eprintln!("warning: node {}: {error}", node.id),
            Ok(other) => eprintln!("warning: node {} answered {other:?}", node.id),
            Err(error) => eprintln!("warning: node {} unreachable: {error}", node.id),
        }
    }
    // The version is one line of the answer: a home or writer that is away (restarting,
    // replaced) leaves it unknown, and the rest is still shown.
    let version = clients.first().and_then(|client| {
        let request = NodeRequest::Latest {
            dataset: dataset.clone(),
        };
        match client.call::<_, NodeReply>(&request, LATEST_TIMEOUT) {
            Ok(NodeReply::Version(version)) => Some(version),
            Ok(NodeReply::Failed(error)) => {
                eprintln!("warning: the latest version is unknown: {error}");
                None
            }
            Ok(other) => {
                eprintln!("warning: a node answered a version request with {other:?}");
                None
            }
            Err(error) => {
                eprintln!("warning: the latest version is unknown: {error}");
                None
            }
        }
    });
    let pinned: std::collections::BTreeSet<u64> = multicall::<_, NodeReply>(
        &clients,
        &NodeRequest::PinnedVersions {
            dataset: dataset.id,
        },
        TIMEOUT,
    )
    .into_iter()
    .filter_map(|reply| match reply {
        Ok(NodeReply::Versions(versions)) => Some(versions),
        _ => None,
    })
    .flatten()
    .collect();
    let chunk_bytes = dataset.params.chunk_pages as u64 * 4096;
    let chunks = attr.size.div_ceil(chunk_bytes).max(1);
    let mut copies_per_page: std::collections::BTreeMap<u64, u32> = Default::default();
    for (_, copies) in &per_node {
        for copy in copies
            .iter()
            .filter(|copy| copy.state != "dirty" && copy.version > 0)
        {
            *copies_per_page.entry(copy.page).or_default() += 1;
        }
    }
    if json {
        let owners: Vec<NodeId> = (0..chunks).map(owner_of_chunk).collect();
        let nodes_json: Vec<_> = per_node
            .iter()
            .map(|(id, copies)| serde_json::json!({ "node": id, "pages": copies }))
            .collect();
        println!(
            "{}",
            serde_json::json!({
                "ino": attr.ino, "size": attr.size, "dataset": dataset.id,
                "mode": dataset.params.mode.to_string(), "replicas": dataset.params.replicas,
                "chunk_pages": dataset.params.chunk_pages, "chunk_owners": owners,
                "nodes": nodes_json,
                "min_copies": copies_per_page.values().min(), "pages_committed": copies_per_page.len(),
                "version": version, "versions_pinned": pinned,
            })
        );
        return Ok(());
    }
    println!("{}", path.display());
    println!(
        "  dataset {}  size {} bytes  mode {}  replicas {}  chunk {} KiB  ({} chunks)",
        dataset.id,
        attr.size,
        dataset.params.mode,
        dataset.params.replicas,
        dataset.params.chunk_pages * 4,
        chunks
    );
    match version {
        Some(version) => println!(
            "  version {version} (latest){}",
            if pinned.is_empty() {
                String::new()
            } else {
                let pinned: Vec<String> = pinned.iter().map(u64::to_string).collect();
                format!(", pinned by views: {}", pinned.join(" "))
            }
        ),
        None => println!("  version unknown (no live node could say)"),
    }
    let shown = chunks.min(16);
    let owners: Vec<String> = (0..shown)
        .map(|chunk| format!("{chunk}→{}", owner_of_chunk(chunk)))
        .collect();
    println!(
        "  chunk owners: {}{}",
        owners.join(" "),
        if chunks > shown { " …" } else { "" }
    );
    for (id, copies) in &per_node {
        let count = |state: &str| copies.iter().filter(|copy| copy.state == state).count();
        let newest = copies.iter().map(|copy| copy.version).max().unwrap_or(0);
        println!(
            "  node {id}: {} committed, {} redundant, {} dirty (newest version {newest})",
            count("committed"),
            count("redundant"),
            count("dirty")
        );
    }
    match (
        copies_per_page.values().min(),
        copies_per_page.values().max(),
    ) {
        (Some(min), Some(max)) => println!(
            "  {} committed pages, copies per page: min {min}, max {max}",
            copies_per_page.len()
        ),
        _ => println!("  no committed pages"),
    }
    Ok(())
}
