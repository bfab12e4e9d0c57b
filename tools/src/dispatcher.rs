//! `hotpot dispatcher`: serves the namespace, the dataset → owner map and the node registry.
//! State is written to `<data>/state.json` (temp file, fsync, rename, fsync of the directory)
//! after every change and before the reply, so an acknowledged change survives a crash.

use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use hotpot_core::proto::dispatcher::DispatcherState;
use hotpot_core::proto::messages::{DispatcherReply, DispatcherRequest};
use hotpot_core::proto::types::{DatasetParams, FsError, Mode, DEFAULT_REPLICAS};
use hotpot_net::Server;

use crate::signals;

#[derive(clap::Args, Debug, Clone)]
pub struct DispatcherArgs {
    /// Address to serve on, host:port.
    #[arg(long, default_value = "127.0.0.1:7000")]
    pub listen: String,
    /// Directory for the dispatcher's persistent state (created if missing).
    #[arg(long)]
    pub data: PathBuf,
    /// Mode of datasets created by open(O_CREAT): mrsw or mrmw.
    #[arg(long, default_value = "mrmw")]
    pub default_mode: Mode,
    /// Replication degree of datasets created by open(O_CREAT).
    #[arg(long, default_value_t = DEFAULT_REPLICAS)]
    pub default_replicas: u8,
    /// Chunk size of datasets created by open(O_CREAT), e.g. 4MiB (a multiple of 4KiB).
    #[arg(long, default_value = "4MiB", value_parser = crate::size::parse_size)]
    pub default_chunk_size: u64,
    /// File holding the cluster secret (every connection proves it). Without it the
    /// dispatcher runs unauthenticated and says so.
    #[arg(long)]
    pub secret: Option<PathBuf>,
    /// Replace a node as the owner of its chunks after it has sent no heartbeat for this
    /// long: the next live node by id takes them over (0: never).
    #[arg(long, default_value_t = 10_000)]
    pub promote_after_ms: u64,
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_nanos() as u64)
        .unwrap_or(0)
}

pub fn chunk_pages(chunk_bytes: u64) -> anyhow::Result<u32> {
    if chunk_bytes == 0 || !chunk_bytes.is_multiple_of(4096) || chunk_bytes / 4096 > u32::MAX as u64
    {
        bail!("chunk size {chunk_bytes} bytes: expected a non-zero multiple of 4KiB");
    }
    Ok((chunk_bytes / 4096) as u32)
}

fn state_path(data: &Path) -> PathBuf {
    data.join("state.json")
}

fn load_or_create(args: &DispatcherArgs) -> anyhow::Result<DispatcherState> {
    std::fs::create_dir_all(&args.data)
        .with_context(|| format!("creating data directory {}", args.data.display()))?;
    let path = state_path(&args.data);
    if path.exists() {
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let state: DispatcherState = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a hotpot dispatcher state file", path.display()))?;
        tracing::info!(
            cluster = format!("{:016x}", state.cluster_id()),
            "dispatcher state recovered"
        );
        return Ok(state);
    }
    let params = DatasetParams {
        mode: args.default_mode,
        replicas: args.default_replicas,
        chunk_pages: chunk_pages(args.default_chunk_size)?,
    };
    if params.replicas == 0 {
        bail!("--default-replicas must be at least 1");
    }
    let cluster_id = rand::random::<u64>() | 1;
    let state = DispatcherState::new(cluster_id, params, now_ns());
    persist(&args.data, &state)?;
    Ok(state)
}

fn persist(data: &Path, state: &DispatcherState) -> anyhow::Result<()> {
    let path = state_path(data);
    let temp = data.join("state.json.tmp");
    let text = serde_json::to_vec(state)?;
    let mut file =
        std::fs::File::create(&temp).with_context(|| format!("writing {}", temp.display()))?;
    file.write_all(&text)?;
    file.sync_all()?;
    std::fs::rename(&temp, &path)?;
    std::fs::File::open(data)?.sync_all()?;
    Ok(())
}

pub fn run(args: DispatcherArgs) -> anyhow::Result<()> {
    let stop = signals::block_stop_signals()?;
    let mut state = load_or_create(&args)?;
    state.set_promote_after_ms(args.promote_after_ms);
    let listener = TcpListener::bind(&args.listen)
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let addr = listener.local_addr()?;
    let started = Instant::now();
    let shared = Arc::new(Mutex::new(state));
    let data = args.data.clone();
    let secret = crate::load_secret(args.secret.as_deref())?;
    Server::spawn(listener, secret, 8, move |request: DispatcherRequest| {
        let now_ms = started.elapsed().as_millis() as u64;
        let mut state = shared.lock().expect("dispatcher state lock");
        let (reply, changed) = state.handle(request, now_ms, now_ns());
        if changed {
            if let Err(error) = persist(&data, &state) {
                // Not acknowledged, so not kept: go back to the last persisted state.
                tracing::error!(%error, "cannot persist dispatcher state; change undone");
                match std::fs::read(state_path(&data)).map(|bytes| serde_json::from_slice(&bytes)) {
                    Ok(Ok(persisted)) => *state = persisted,
                    _ => tracing::error!("cannot reload the persisted state either"),
                }
                return DispatcherReply::Failed(FsError::Io(format!(
                    "dispatcher cannot persist: {error}"
                )));
            }
        }
        reply
    })?;
    tracing::info!(%addr, data = %args.data.display(), "dispatcher serving");
    println!("dispatcher serving on {addr}");
    let signal = signals::wait(&stop)?;
    tracing::info!(signal, "dispatcher stopping");
    Ok(())
}
