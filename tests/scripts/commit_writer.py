"""Stamped commits through a shared mapping, for the recovery tests.

usage: commit_writer.py FILE SIZE PLAN
PLAN is a JSON list of [commit_id, [page, ...]]. For each commit the first 16 bytes of each
of its pages become (commit_id, page) as two little-endian u64s, then msync(MS_SYNC) of the
whole mapping. Prints "try ID" before writing a commit's stamps, "ack ID" when msync
returned 0, "fail ID ERROR" and stops at the first failure (the node may be gone: its
mapping is not touched again). A "try" without an answer means the writer died while
writing the stamps (SIGBUS: a page it could not bring in), so that commit was never whole.
"""
import json
import mmap
import os
import struct
import sys


def main():
    path, size, plan = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
    fd = os.open(path, os.O_RDWR)
    mapping = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    for commit, pages in plan:
        print(f"try {commit}", flush=True)
        try:
            for page in pages:
                at = page * 4096
                mapping[at:at + 16] = struct.pack("<QQ", commit, page)
            mapping.flush()
        except Exception as error:  # EIO, ENOTCONN: the commit failed
            print(f"fail {commit} {error}", flush=True)
            os._exit(0)
        print(f"ack {commit}", flush=True)
    mapping.close()
    os.close(fd)


if __name__ == "__main__":
    main()
