//! A local hotpot cluster for the benchmarks, stopped when dropped.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};

pub struct LocalCluster {
    hotpot: PathBuf,
    dir: tempfile::TempDir,
}

impl LocalCluster {
    pub fn up(hotpot: &Path, nodes: u32) -> anyhow::Result<LocalCluster> {
        LocalCluster::up_with_pm(hotpot, nodes, "1GiB")
    }

    /// `up` with PM files of `pm_size` (e.g. "2GiB").
    pub fn up_with_pm(hotpot: &Path, nodes: u32, pm_size: &str) -> anyhow::Result<LocalCluster> {
        LocalCluster::up_with_args(hotpot, nodes, pm_size, &[])
    }

    /// `up_with_pm` with more `hotpot cluster up` arguments (e.g. the transport).
    pub fn up_with_args(
        hotpot: &Path,
        nodes: u32,
        pm_size: &str,
        more: &[String],
    ) -> anyhow::Result<LocalCluster> {
        let dir = tempfile::Builder::new()
            .prefix("hotpot-bench-cluster-")
            .tempdir()?;
        let output = Command::new(hotpot)
            .args([
                "cluster",
                "up",
                "--nodes",
                &nodes.to_string(),
                "--pm-size",
                pm_size,
                "--dir",
            ])
            .arg(dir.path())
            .args(more)
            .output()
            .with_context(|| format!("running {}", hotpot.display()))?;
        if !output.status.success() {
            bail!(
                "cluster up failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(LocalCluster {
            hotpot: hotpot.to_path_buf(),
            dir,
        })
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn mount(&self, node: u32) -> PathBuf {
        self.dir.path().join(format!("n{node}")).join("mnt")
    }

    /// `hotpot <args>`, failing with its stderr.
    pub fn hotpot(&self, args: &[&str]) -> anyhow::Result<String> {
        let output = Command::new(&self.hotpot).args(args).output()?;
        if !output.status.success() {
            bail!(
                "hotpot {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).to_string())
    }

    /// Create a dataset on node 1's mount; returns the chunk owners.
    pub fn create(
        &self,
        name: &str,
        size: &str,
        mode: &str,
        replicas: u8,
    ) -> anyhow::Result<Vec<u64>> {
        let path = self.mount(1).join(name);
        let path = path.to_string_lossy();
        self.hotpot(&[
            "create",
            &path,
            "--size",
            size,
            "--mode",
            mode,
            "--replicas",
            &replicas.to_string(),
        ])?;
        let stat: serde_json::Value =
            serde_json::from_str(&self.hotpot(&["stat", "--json", &path])?)?;
        Ok(stat["chunk_owners"]
            .as_array()
            .map(|owners| owners.iter().filter_map(|owner| owner.as_u64()).collect())
            .unwrap_or_default())
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        let _ = Command::new(&self.hotpot)
            .args(["cluster", "down", "--dir"])
            .arg(self.dir.path())
            .output();
    }
}
