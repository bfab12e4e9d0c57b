//! fio (Debian package) on the mount: mmap engine, random reads and writes, crc32c verify,
//! an msync every 8 writes, 256 MiB.

use std::process::Command;

use hotpot_tests::*;

#[test]
fn fio_mmap_random_read_write_verifies_without_error() {
    if !fuse_available() {
        return;
    }
    require_program("fio", "apt-get install fio");
    let cluster = Cluster::up(1, "1GiB");
    let file = cluster.mount(1).join("fio.dat");
    let output = run_ok(
        Command::new("fio")
            .args([
                "--name=hotpot-mmap",
                "--ioengine=mmap",
                "--rw=randrw",
                "--rwmixread=50",
                "--bs=4k",
                "--size=256M",
                "--verify=crc32c",
                "--verify_fatal=1",
                "--do_verify=1",
                "--fsync=8",
                // fio would leave its verify state in the working directory (the repo's
                // `tests/`): nothing here resumes a verify.
                "--verify_state_save=0",
                "--output-format=json",
            ])
            .arg(format!("--filename={}", file.display())),
    );
    let start = output.find('{').expect("fio printed JSON");
    let report: serde_json::Value =
        serde_json::from_str(&output[start..]).expect("fio JSON parses");
    let job = &report["jobs"][0];
    assert_eq!(job["error"], 0, "fio reported an error: {job}");
    let written = job["write"]["io_bytes"].as_u64().unwrap_or(0);
    let read = job["read"]["io_bytes"].as_u64().unwrap_or(0);
    assert!(written > 64 << 20, "fio wrote only {written} bytes");
    println!(
        "fio: {} MiB written, {} MiB read and verified, no error",
        written >> 20,
        read >> 20
    );
}
