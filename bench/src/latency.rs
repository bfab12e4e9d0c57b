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
const FAULT_STRIDE_PAGES: u64 = 16;

pub struct Percentiles {
    pub p50: f64,
    pub p99: f64,
}

impl Percentiles {
    fn of(histogram: &Histogram<u64>) -> Percentiles {
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

struct Map {
    ptr: *mut u8,
    len: usize,
}

impl Map {
    fn new(file: &File, len: usize) -> anyhow::Result<Map> {
        // SAFETY: mapping an open file with its length.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
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
    fn msync(&self) -> anyhow::Result<()> {
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
    // Fill every page and commit, so faults read real committed pages.
    {
        let map = Map::new(&file, len)?;
        for page in 0..pages as usize {
            // SAFETY: inside the mapping.
            unsafe { *map.ptr.add(page * 4096) = page as u8 | 1 };
        }
        map.msync()?;
    }
    // Drop the cached pages so the next touches fault to the file system.
    // SAFETY: fadvise on an open fd.
    unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, len as i64, libc::POSIX_FADV_DONTNEED) };
    let mut fault = Histogram::<u64>::new(3)?;
    {
        let map = Map::new(&file, len)?;
        let mut sum = 0u64;
        for page in (0..pages).step_by(FAULT_STRIDE_PAGES as usize) {
            let start = Instant::now();
            // SAFETY: inside the mapping; a volatile read so the touch is not optimised out.
            sum += unsafe { std::ptr::read_volatile(map.ptr.add(page as usize * 4096)) } as u64;
            fault.record(start.elapsed().as_nanos() as u64)?;
        }
        assert!(sum > 0, "pages read back as zeros");
    }
    let map = Map::new(&file, len)?;
    let mut rng = rand::rng();
    let mut msync_case = |dirty: usize| -> anyhow::Result<Histogram<u64>> {
        let mut histogram = Histogram::<u64>::new(3)?;
        for round in 0..rounds {
            for _ in 0..dirty {
                let page = rng.random_range(0..pages) as usize;
                // SAFETY: inside the mapping.
                unsafe { *map.ptr.add(page * 4096 + 8) = round as u8 };
            }
            let start = Instant::now();
            map.msync()?;
            histogram.record(start.elapsed().as_nanos() as u64)?;
        }
        Ok(histogram)
    };
    let msync_1 = msync_case(1)?;
    let msync_64 = msync_case(64)?;
    drop(map);
    std::fs::remove_file(&path)?;
    Ok(Results {
        fault: Percentiles::of(&fault),
        msync_1: Percentiles::of(&msync_1),
        msync_64: Percentiles::of(&msync_64),
    })
}
