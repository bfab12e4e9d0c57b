//! MRMW: a whole-page write() to a page this node never read (the kernel does not read a
//! page it overwrites whole) must commit every byte written, zeros included.

use std::os::unix::fs::FileExt;

use hotpot_tests::*;

#[test]
fn zeros_written_over_a_page_never_read_here_reach_every_node() {
    if !fuse_available() {
        return;
    }
    let cluster = Cluster::up(4, "256MiB");
    cluster.create(1, "unread", "16KiB", "mrmw", 2);
    // Every node counts every other live first: a writer the owner still counts down is
    // left out of its own commit's holders and reads its old copy until re-replication
    // (noted in docs/design.md; not what this test is about).
    cluster.wait_views_settled();
    let first = cluster.open_rw(1, "unread");
    first.write_all_at(&[0xffu8; 4 * 4096], 0).unwrap();
    first.sync_all().unwrap();
    for writer in 2..=4u32 {
        let page = u64::from(writer - 2);
        let file = cluster.open_rw(writer, "unread");
        file.write_all_at(&[0u8; 4096], page * 4096).unwrap();
        file.sync_all().unwrap();
    }
    for reader in 1..=4u32 {
        let file = std::fs::File::open(cluster.mount(reader).join("unread")).unwrap();
        let mut page = vec![0u8; 4096];
        for index in 0..3u64 {
            file.read_exact_at(&mut page, index * 4096).unwrap();
            let kept = page.iter().filter(|byte| **byte != 0).count();
            assert_eq!(
                kept,
                0,
                "node {reader} page {index}: {kept} bytes kept their old value over node {}'s zeros",
                index + 2
            );
        }
    }
}
