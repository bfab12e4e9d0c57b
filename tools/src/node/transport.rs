//! Which transport a node uses to reach its peers: TCP (default) or RDMA verbs on a device
//! (`--transport verbs --rdma-dev rxe0`, a build with the `verbs` feature). Tools and the
//! dispatcher always speak TCP; a verbs node serves both.

use std::sync::Arc;

use anyhow::bail;
use hotpot_net::{Secret, ServerConfig, Tcp, Transport};

#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TransportKind {
    #[default]
    Tcp,
    Verbs,
}

#[derive(clap::Args, Debug, Clone, Default)]
pub struct TransportArgs {
    /// How this node talks to other nodes: tcp, or verbs (RDMA; needs --rdma-dev).
    #[arg(long, value_enum, default_value_t = TransportKind::Tcp)]
    pub transport: TransportKind,
    /// RDMA device for --transport verbs, as `ibv_devices` lists it (e.g. rxe0).
    #[arg(long)]
    pub rdma_dev: Option<String>,
    /// GID index on the device (default: its first IPv4-mapped GID, for RoCEv2).
    #[arg(long)]
    pub rdma_gid_index: Option<u8>,
    /// Do not let peers read this node's PM one-sided: they fetch its pages two-sided
    /// (for comparing the two paths).
    #[arg(long)]
    pub rdma_no_one_sided: bool,
}

impl TransportArgs {
    /// Refuse combinations that cannot work, before anything starts.
    pub fn check(&self) -> anyhow::Result<()> {
        match (self.transport, &self.rdma_dev) {
            (TransportKind::Tcp, Some(_)) => bail!("--rdma-dev needs --transport verbs"),
            (TransportKind::Tcp, None) if self.rdma_no_one_sided => {
                bail!("--rdma-no-one-sided needs --transport verbs")
            }
            (TransportKind::Verbs, None) => {
                bail!("--transport verbs needs --rdma-dev (see `ibv_devices` or `rdma link`)")
            }
            (TransportKind::Verbs, Some(_)) if !cfg!(feature = "verbs") => bail!(
                "this hotpot was built without RDMA: rebuild with `cargo build --release \
                 -p hotpot-tools --features verbs` (needs libibverbs-dev librdmacm-dev libclang-dev)"
            ),
            _ => Ok(()),
        }
    }

    /// The same choice as `hotpot node` arguments.
    pub fn node_args(&self) -> anyhow::Result<Vec<String>> {
        self.check()?;
        let mut args = Vec::new();
        if let Some(device) = &self.rdma_dev {
            args.extend([
                "--transport".to_string(),
                "verbs".into(),
                "--rdma-dev".into(),
                device.clone(),
            ]);
        }
        if let Some(index) = self.rdma_gid_index {
            args.extend(["--rdma-gid-index".to_string(), index.to_string()]);
        }
        if self.rdma_no_one_sided {
            args.push("--rdma-no-one-sided".into());
        }
        Ok(args)
    }
}

/// The transport for peer clients and the server's configuration, set up from the args.
pub struct NodeTransport {
    pub peers: Arc<dyn Transport>,
    #[cfg(feature = "verbs")]
    one_sided: bool,
    #[cfg(feature = "verbs")]
    pub device: Option<Arc<hotpot_net::verbs::Device>>,
}

impl NodeTransport {
    pub fn open(args: &TransportArgs) -> anyhow::Result<NodeTransport> {
        args.check()?;
        #[cfg(feature = "verbs")]
        if let Some(name) = &args.rdma_dev {
            let device = hotpot_net::verbs::Device::open(name, args.rdma_gid_index)?;
            return Ok(NodeTransport {
                peers: Arc::new(hotpot_net::verbs::Verbs::new(device.clone())),
                one_sided: !args.rdma_no_one_sided,
                device: Some(device),
            });
        }
        Ok(NodeTransport {
            peers: Arc::new(Tcp),
            #[cfg(feature = "verbs")]
            one_sided: false,
            #[cfg(feature = "verbs")]
            device: None,
        })
    }

    /// Let peers read `memory` (this node's PM, which lives as long as the process) with
    /// one-sided RDMA READs; nothing to do over TCP.
    pub fn expose(&self, memory: (*mut u8, usize)) -> anyhow::Result<()> {
        #[cfg(feature = "verbs")]
        if let Some(device) = self.device.as_ref().filter(|_| self.one_sided) {
            // SAFETY: the PM mapping stays mapped until the process exits.
            unsafe { device.expose(memory.0, memory.1) }?;
        }
        let _ = memory;
        Ok(())
    }

    pub fn server_config(&self, secret: Secret, workers: usize) -> ServerConfig {
        #[cfg_attr(not(feature = "verbs"), allow(unused_mut))]
        let mut config = ServerConfig::tcp(secret, workers);
        #[cfg(feature = "verbs")]
        {
            config.verbs = self.device.clone();
        }
        config
    }
}
