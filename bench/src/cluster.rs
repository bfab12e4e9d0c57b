//! A 1-node hotpot cluster for the benchmark, stopped when dropped.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};

pub struct LocalCluster {
    hotpot: PathBuf,
    dir: tempfile::TempDir,
}

impl LocalCluster {
    pub fn up(hotpot: &Path) -> anyhow::Result<LocalCluster> {
        let dir = tempfile::Builder::new()
            .prefix("hotpot-bench-cluster-")
            .tempdir()?;
        let output = Command::new(hotpot)
            .args([
                "cluster",
                "up",
                "--nodes",
                "1",
                "--pm-size",
                "1GiB",
                "--dir",
            ])
            .arg(dir.path())
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

    pub fn mount(&self) -> PathBuf {
        self.dir.path().join("n1").join("mnt")
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
