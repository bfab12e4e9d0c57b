//! The measurements: a read fault per page of a file whose pages are not in the page cache,
//! and msync(MS_SYNC) after dirtying 1 or 64 random pages of a mapping.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::Instant;

use hdrhistogram::Histogram;
use rand::Rng;

/// Fault-around maps up to 16 cached pages per fault; touching every 16th page makes every
/// touch a fault of its own.
pub const FAULT_STRIDE_PAGES: u64 = 16;

pub struct Percentiles {
    pub p50: f64,
    pub p99: f64,
}

impl Percentiles {
    pub fn of(histogram: &Histogram<u64>) -> Percentiles {
        Percentiles {
            p50: histogram.value_at_quantile(0.50) as f64 / 1000.0,
            p99: histogram.value_at_quantile(0.99) as f64 / 1000.0,
        }
    }
    pub fn show(&self) -> String {
        format!("{:.1} / {:.1}", self.p50, self.p99)
    }
}

pub struct Results {
    pub fault: Percentiles,
    pub msync_1: Percentiles,
    pub msync_64: Percentiles,
}

pub struct Map {
    ptr: *mut u8,
    len: usize,
}

impl Map {
    pub fn new(file: &File, len: usize) -> anyhow::Result<Map> {
        Map::with_protection(file, len, libc::PROT_READ | libc::PROT_WRITE)
    }

    /// A mapping for reading only (the file may be open read-only).
    pub fn read_only(file: &File, len: usize) -> anyhow::Result<Map> {
        Map::with_protection(file, len, libc::PROT_READ)
    }

    fn with_protection(file: &File, len: usize, protection: i32) -> anyhow::Result<Map> {
        // SAFETY: mapping an open file with its length.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                protection,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            anyhow::bail!("mmap: {}", std::io::Error::last_os_error());
        }
        Ok(Map {
            ptr: ptr as *mut u8,
            len,
        })
    }
    /// The first mapped byte.
    pub fn ptr(&self) -> *mut u8 {
        self.ptr
    }

    pub fn msync(&self) -> anyhow::Result<()> {
        // SAFETY: our own mapping.
        if unsafe { libc::msync(self.ptr as *mut libc::c_void, self.len, libc::MS_SYNC) } != 0 {
            anyhow::bail!("msync: {}", std::io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Drop for Map {
    fn drop(&mut self) {
        // SAFETY: unmapping what new() mapped.
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.len) };
    }
}

/// Read-fault latency of `pages` (each a separate fault) of `file`, after dropping them
/// from the page cache.
pub fn fault_latency(file: &File, len: usize, pages: &[u64]) -> anyhow::Result<Percentiles> {
    // SAFETY: fadvise on an open fd.
    unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, len as i64, libc::POSIX_FADV_DONTNEED) };
    let map = Map::read_only(file, len)?;
    let mut histogram = Histogram::<u64>::new(3)?;
    let mut sum = 0u64;
    for page in pages {
        let start = Instant::now();
        // SAFETY: inside the mapping; a volatile read so the touch is not optimised out.
        sum += unsafe { std::ptr::read_volatile(map.ptr.add(*page as usize * 4096)) } as u64;
        histogram.record(start.elapsed().as_nanos() as u64)?;
    }
    anyhow::ensure!(sum > 0, "pages read back as zeros");
    Ok(Percentiles::of(&histogram))
}

/// msync(MS_SYNC) latency after writing `area_bytes` into each of `dirty` random pages out
/// of `pages`, `rounds` times.
pub fn msync_latency(
    map: &Map,
    pages: &[u64],
    dirty: usize,
    area_bytes: usize,
    rounds: u32,
) -> anyhow::Result<Percentiles> {
    let mut rng = rand::rng();
    let mut histogram = Histogram::<u64>::new(3)?;
    for round in 0..rounds {
        for _ in 0..dirty {
            let page = pages[rng.random_range(0..pages.len())] as usize;
            // SAFETY: inside the mapping (area_bytes ≤ 4088).
            unsafe { std::ptr::write_bytes(map.ptr.add(page * 4096 + 8), round as u8, area_bytes) };
        }
        let start = Instant::now();
        map.msync()?;
        histogram.record(start.elapsed().as_nanos() as u64)?;
    }
    Ok(Percentiles::of(&histogram))
}

/// Fill `pages` of the mapping with non-zero bytes and commit them.
pub fn fill(map: &Map, pages: &[u64]) -> anyhow::Result<()> {
    for page in pages {
        // SAFETY: inside the mapping.
        unsafe { *map.ptr.add(*page as usize * 4096) = *page as u8 | 1 };
    }
    map.msync()
}

pub fn measure(dir: &Path, pages: u64, rounds: u32) -> anyhow::Result<Results> {
    let path = dir.join("bench.dat");
    let len = (pages * 4096) as usize;
    let file = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)?;
    file.set_len(len as u64)?;
    let all: Vec<u64> = (0..pages).collect();
    fill(&Map::new(&file, len)?, &all)?;
    let strided: Vec<u64> = (0..pages).step_by(FAULT_STRIDE_PAGES as usize).collect();
    let fault = fault_latency(&file, len, &strided)?;
    let map = Map::new(&file, len)?;
    let msync_1 = msync_latency(&map, &all, 1, 1, rounds)?;
    let msync_64 = msync_latency(&map, &all, 64, 1, rounds)?;
    drop(map);
    std::fs::remove_file(&path)?;
    Ok(Results {
        fault,
        msync_1,
        msync_64,
    })
}
