//! The byte region a PM pool lives in, and how a range of it is made durable.
//! Owns: mapping the pool file, `persist(range)` (clwb/clflushopt + sfence, or msync), and a
//! test backend that keeps a separate durable image so a simulated power loss drops every
//! write that was not persisted.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Mutex;

use crate::pm::PmError;

/// Cache-line size used for flushing.
pub const CACHE_LINE_BYTES: usize = 64;

/// How `persist` makes bytes durable for a mapped file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Durability {
    /// Memory or DAX file: flush cache lines (clwb, else clflushopt, else clflush) then sfence.
    CacheFlush,
    /// Ordinary file on a disk: msync(MS_SYNC) of the covering pages.
    Msync,
}

impl std::str::FromStr for Durability {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "cache-flush" | "memory" | "dax" => Ok(Durability::CacheFlush),
            "msync" | "file" => Ok(Durability::Msync),
            other => Err(format!(
                "unknown durability '{other}': expected 'cache-flush' (memory/DAX) or 'msync' (file on disk)"
            )),
        }
    }
}

/// A byte region with a persist barrier. All pool access goes through this trait so the
/// crash-simulating backend sees every write and every persist.
pub trait Region: Send + Sync {
    /// Start of the region. Valid for `len()` bytes for the region's lifetime.
    fn base(&self) -> *mut u8;
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Start writing `[offset, offset+len)` back; durable only after the next `fence`.
    fn flush(&self, offset: usize, len: usize);
    /// Every range flushed before this call is durable when it returns.
    fn fence(&self);
    /// Make `[offset, offset+len)` durable. Returns only when it is.
    fn persist(&self, offset: usize, len: usize) {
        self.flush(offset, len);
        self.fence();
    }
}

/// A pool file mapped MAP_SHARED, locked so that a second process cannot open it.
pub struct MappedRegion {
    base: *mut u8,
    len: usize,
    durability: Durability,
    flush: FlushKind,
    _file: File,
}

// SAFETY: the mapping is plain memory shared by the threads of this process; callers
// serialise conflicting writes (the pool is behind a lock), and persist only reads it.
unsafe impl Send for MappedRegion {}
unsafe impl Sync for MappedRegion {}

impl MappedRegion {
    /// Map `path` (which must already have its final size) and take an exclusive lock on it.
    pub fn open(path: &Path, durability: Durability) -> Result<MappedRegion, PmError> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|source| PmError::Io {
                what: format!("open PM file {}", path.display()),
                source,
            })?;
        // SAFETY: flock on a valid fd.
        let locked = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if locked != 0 {
            return Err(PmError::InUse {
                path: path.display().to_string(),
            });
        }
        let len = file
            .metadata()
            .map_err(|source| PmError::Io {
                what: format!("stat PM file {}", path.display()),
                source,
            })?
            .len() as usize;
        if len == 0 {
            return Err(PmError::Corrupt {
                what: format!("PM file {} is empty", path.display()),
            });
        }
        // SAFETY: mapping a regular file we opened read-write; length from its metadata.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(PmError::Io {
                what: format!("mmap PM file {}", path.display()),
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(MappedRegion {
            base: base as *mut u8,
            len,
            durability,
            flush: FlushKind::detect(),
            _file: file,
        })
    }
}

impl Drop for MappedRegion {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what open() mapped.
        unsafe {
            libc::munmap(self.base as *mut libc::c_void, self.len);
        }
    }
}

impl Region for MappedRegion {
    fn base(&self) -> *mut u8 {
        self.base
    }
    fn len(&self) -> usize {
        self.len
    }
    fn fence(&self) {
        if self.durability == Durability::CacheFlush {
            self.flush.fence();
        }
    }
    fn flush(&self, offset: usize, len: usize) {
        assert!(offset + len <= self.len, "flush out of range");
        if len == 0 {
            return;
        }
        match self.durability {
            Durability::CacheFlush => self.flush.flush_lines(self.base, offset, len),
            // msync is synchronous: the range is durable when it returns.
            Durability::Msync => {
                let page = 4096;
                let start = offset / page * page;
                let end = (offset + len).div_ceil(page) * page;
                let end = end.min(self.len);
                // SAFETY: a page-aligned sub-range of our own mapping.
                let rc = unsafe {
                    libc::msync(
                        self.base.add(start) as *mut libc::c_void,
                        end - start,
                        libc::MS_SYNC,
                    )
                };
                assert_eq!(
                    rc,
                    0,
                    "msync of the PM file failed: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum FlushKind {
    Clwb,
    ClflushOpt,
    Clflush,
    /// Not x86_64: a sequentially consistent fence is all we can do without a DAX mapping.
    #[cfg(not(target_arch = "x86_64"))]
    Fence,
}

impl FlushKind {
    fn detect() -> FlushKind {
        #[cfg(target_arch = "x86_64")]
        {
            // CPUID leaf 7, sub-leaf 0, EBX: bit 23 CLFLUSHOPT, bit 24 CLWB.
            let features = std::arch::x86_64::__cpuid_count(7, 0).ebx;
            if features & (1 << 24) != 0 {
                return FlushKind::Clwb;
            }
            if features & (1 << 23) != 0 {
                return FlushKind::ClflushOpt;
            }
            FlushKind::Clflush
        }
        #[cfg(not(target_arch = "x86_64"))]
        FlushKind::Fence
    }

    fn flush_lines(self, base: *mut u8, offset: usize, len: usize) {
        let start = offset / CACHE_LINE_BYTES * CACHE_LINE_BYTES;
        let end = offset + len;
        let mut line = start;
        while line < end {
            // SAFETY: `line` is inside the mapping (asserted by the caller); the flush
            // instructions only write back cache lines and do not change memory contents.
            unsafe {
                let ptr = base.add(line);
                match self {
                    #[cfg(target_arch = "x86_64")]
                    FlushKind::Clwb => std::arch::asm!("clwb [{0}]", in(reg) ptr, options(nostack)),
                    #[cfg(target_arch = "x86_64")]
                    FlushKind::ClflushOpt => {
                        std::arch::asm!("clflushopt [{0}]", in(reg) ptr, options(nostack))
                    }
                    #[cfg(target_arch = "x86_64")]
                    FlushKind::Clflush => std::arch::x86_64::_mm_clflush(ptr),
                    #[cfg(not(target_arch = "x86_64"))]
                    FlushKind::Fence => {
                        let _ = ptr;
                    }
                }
            }
            line += CACHE_LINE_BYTES;
        }
    }

    fn fence(self) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: sfence has no memory-safety preconditions.
        unsafe {
            std::arch::x86_64::_mm_sfence()
        };
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    }
}

/// Test backend: a live image the pool writes to and a durable image that only `persist`
/// updates. `crash_image()` is what a machine would find after power loss. `stop_after`
/// freezes the durable image after N persists, so a test can cut power at any persist point.
pub struct SimRegion {
    live: Box<[u8]>,
    state: Mutex<SimDurable>,
}

struct SimDurable {
    durable: Vec<u8>,
    persists_done: u64,
    persists_allowed: Option<u64>,
    /// Cache lines flushed since the last fence: durable at the next one.
    pending: Vec<(usize, usize)>,
    /// The live image when power was cut: the program stops there, so nothing written
    /// after it can reach the durable image, not even by a cache eviction.
    live_at_cut: Option<Vec<u8>>,
}

// SAFETY: as for MappedRegion, writers are serialised by the pool's lock.
unsafe impl Send for SimRegion {}
unsafe impl Sync for SimRegion {}

impl SimRegion {
    /// A region whose live and durable images both start as `image`.
    pub fn from_image(image: Vec<u8>) -> SimRegion {
        SimRegion {
            live: image.clone().into_boxed_slice(),
            state: Mutex::new(SimDurable {
                durable: image,
                persists_done: 0,
                persists_allowed: None,
                pending: Vec::new(),
                live_at_cut: None,
            }),
        }
    }

    /// After `persists` more fences, nothing more becomes durable (power is cut).
    pub fn cut_power_after(&self, persists: u64) {
        let mut state = self.state.lock().expect("sim region lock");
        state.persists_allowed = Some(state.persists_done + persists);
    }

    /// Number of fences that reached the durable image.
    pub fn persists_done(&self) -> u64 {
        self.state.lock().expect("sim region lock").persists_done
    }

    /// `len` bytes of the live image at `offset`, as another node's RDMA READ sees them
    /// (the simulator's one-sided reads); `None` past the end.
    pub fn read_live(&self, offset: usize, len: usize) -> Option<Vec<u8>> {
        let end = offset.checked_add(len)?;
        self.live.get(offset..end).map(<[u8]>::to_vec)
    }

    /// The bytes a restart would find: only what was persisted.
    pub fn crash_image(&self) -> Vec<u8> {
        self.state.lock().expect("sim region lock").durable.clone()
    }

    /// The bytes a restart would find if the cache had also evicted some unpersisted lines
    /// on its own before power was cut: each differing cache line is taken from the live
    /// image with probability 1/2, decided by `seed`.
    pub fn crash_image_with_evictions(&self, seed: u64) -> Vec<u8> {
        let guard = self.state.lock().expect("sim region lock");
        let mut image = guard.durable.clone();
        let live: &[u8] = guard.live_at_cut.as_deref().unwrap_or(&self.live);
        let mut state = seed | 1;
        for line in (0..image.len()).step_by(CACHE_LINE_BYTES) {
            let end = (line + CACHE_LINE_BYTES).min(image.len());
            if image[line..end] == live[line..end] {
                continue;
            }
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            if state & 1 == 1 {
                image[line..end].copy_from_slice(&live[line..end]);
            }
        }
        image
    }
}

impl Region for SimRegion {
    fn base(&self) -> *mut u8 {
        self.live.as_ptr() as *mut u8
    }
    fn len(&self) -> usize {
        self.live.len()
    }
    fn flush(&self, offset: usize, len: usize) {
        assert!(offset + len <= self.live.len(), "flush out of range");
        // Flushes work at cache-line granularity, as on hardware.
        let start = offset / CACHE_LINE_BYTES * CACHE_LINE_BYTES;
        let end =
            ((offset + len).div_ceil(CACHE_LINE_BYTES) * CACHE_LINE_BYTES).min(self.live.len());
        self.state
            .lock()
            .expect("sim region lock")
            .pending
            .push((start, end));
    }
    fn fence(&self) {
        let mut state = self.state.lock().expect("sim region lock");
        if let Some(allowed) = state.persists_allowed {
            if state.persists_done >= allowed {
                if state.live_at_cut.is_none() {
                    state.live_at_cut = Some(self.live.to_vec());
                }
                return;
            }
        }
        state.persists_done += 1;
        let pending = std::mem::take(&mut state.pending);
        for (start, end) in pending {
            state.durable[start..end].copy_from_slice(&self.live[start..end]);
        }
    }
}

/// A region shared with whoever else holds it (the simulator keeps one to take crash images
/// of the PM a pool owns).
impl<R: Region + ?Sized> Region for std::sync::Arc<R> {
    fn base(&self) -> *mut u8 {
        (**self).base()
    }
    fn len(&self) -> usize {
        (**self).len()
    }
    fn flush(&self, offset: usize, len: usize) {
        (**self).flush(offset, len)
    }
    fn fence(&self) {
        (**self).fence()
    }
}

/// Create a pool file of `size` bytes at `path`; refuses to overwrite an existing file.
pub fn create_file(path: &Path, size: u64) -> Result<(), PmError> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|source| PmError::Io {
            what: format!("create PM file {}", path.display()),
            source,
        })?;
    file.set_len(size).map_err(|source| PmError::Io {
        what: format!("size PM file {} to {size} bytes", path.display()),
        source,
    })?;
    Ok(())
}
