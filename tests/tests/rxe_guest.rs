//! The verbs transport for real: builds the verbs test binaries on this host, boots one
//! soft-RoCE guest (`../shared/tools/rxe-vm/run-in-rxe-vm.sh`; this kernel has no RDMA
//! stack) and runs them all in it: the transport tests of `hotpot-net` on rxe0, then the
//! cluster tests and the one-sided commit-storm test with every node on `--transport verbs`.
//! Their output goes straight to this process's stdout/stderr (not captured), so the guest's
//! pass/fail counts show in the CI log.
//!
//! Needs the rxe-vm script (`HOTPOT_RXE_VM` names it, else it is looked for beside the
//! workspace) and root (the script boots QEMU and sets itself up with apt on first use).
//! `HOTPOT_SKIP_VERBS=1` opts out.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use hotpot_tests::hotpot_bin;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace")
        .to_path_buf()
}

fn rxe_vm() -> PathBuf {
    if let Some(script) = std::env::var_os("HOTPOT_RXE_VM") {
        return PathBuf::from(script);
    }
    let beside = workspace().join("../shared/tools/rxe-vm/run-in-rxe-vm.sh");
    assert!(
        beside.exists(),
        "the soft-RoCE guest script is missing: set HOTPOT_RXE_VM to run-in-rxe-vm.sh \
         (looked for {}), or HOTPOT_SKIP_VERBS=1 to skip the verbs tests explicitly",
        beside.display()
    );
    beside
}

/// Build test binaries with `cargo test --no-run ARGS`; their paths, by target name.
fn test_binaries(args: &[&str]) -> Vec<(String, PathBuf)> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let output = Command::new(cargo)
        .args(["test", "--no-run", "--message-format=json", "--quiet"])
        .args(args)
        .current_dir(workspace())
        .stderr(Stdio::inherit())
        .output()
        .expect("run cargo test --no-run");
    assert!(output.status.success(), "building {args:?} failed");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|message| message["reason"] == "compiler-artifact")
        .filter_map(|message| {
            let path = message["executable"].as_str()?;
            Some((
                message["target"]["name"].as_str()?.to_string(),
                PathBuf::from(path),
            ))
        })
        .collect()
}

fn quoted(path: &Path) -> String {
    format!("'{}'", path.display())
}

#[test]
fn verbs_tests_pass_inside_a_soft_roce_guest() {
    if std::env::var_os("HOTPOT_SKIP_VERBS").is_some() {
        eprintln!("SKIPPED: HOTPOT_SKIP_VERBS is set");
        return;
    }
    let script = rxe_vm();
    let hotpot = hotpot_bin();
    let mut binaries =
        test_binaries(&["-p", "hotpot-net", "--features", "verbs", "--test", "verbs"]);
    binaries.extend(test_binaries(&[
        "-p",
        "hotpot-tests",
        "--test",
        "cluster",
        "--test",
        "one_sided",
    ]));
    let find = |name: &str| {
        binaries
            .iter()
            .find(|(target, _)| target == name)
            .map(|(_, path)| path.clone())
            .unwrap_or_else(|| panic!("no test binary {name} in {binaries:?}"))
    };
    // One boot for everything; each binary prints its own "test result" line.
    let guest = format!(
        "set -e\n\
         echo '== hotpot-net verbs transport on '$RXEVM_RXE_DEV\n\
         {net} --test-threads 1\n\
         export HOTPOT_TEST_TRANSPORT=verbs HOTPOT_TEST_BIN={hotpot}\n\
         echo '== cluster tests, every node on --transport verbs'\n\
         {cluster} --test-threads 1\n\
         echo '== one-sided fetches under a commit storm'\n\
         {one_sided} --test-threads 1 --nocapture\n",
        net = quoted(&find("verbs")),
        hotpot = quoted(&hotpot),
        cluster = quoted(&find("cluster")),
        one_sided = quoted(&find("one_sided")),
    );
    let started = Instant::now();
    let status = Command::new(&script)
        .args(["--timeout", "1500", "bash", "-c", &guest])
        .current_dir(workspace())
        .stdin(Stdio::null())
        .status()
        .unwrap_or_else(|error| panic!("cannot run {}: {error}", script.display()));
    println!(
        "rxe guest run: {status} after {:.0} s",
        started.elapsed().as_secs_f64()
    );
    assert!(
        status.success(),
        "the verbs tests failed inside the rxe guest ({status}; 124: timeout, 125: guest died); \
         their output is above"
    );
}
