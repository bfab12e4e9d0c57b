//! An opened RDMA device: its context, one protection domain shared by every queue pair (so
//! memory exposed once can be read over any of them), the port's address (LID, GID) and the
//! memory this process exposes to one-sided access.

use std::ffi::CStr;
use std::sync::{Arc, Mutex};

use rdma_sys::*;

use crate::NetError;

/// The port every queue pair uses (rxe and siw devices have one).
pub(crate) const PORT: u8 = 1;

/// An RDMA device, open for the life of the process.
pub struct Device {
    name: String,
    pub(crate) context: *mut ibv_context,
    pub(crate) pd: *mut ibv_pd,
    pub(crate) gid_index: u8,
    pub(crate) gid: [u8; 16],
    pub(crate) lid: u16,
    pub(crate) mtu: ibv_mtu::Type,
    exposed: Mutex<Option<Exposed>>,
}

struct Exposed {
    mr: *mut ibv_mr,
    bytes: u64,
}

// SAFETY: libibverbs objects may be used from any thread; the raw pointers are only freed in
// Drop, when no queue pair (which holds an Arc<Device>) is left.
unsafe impl Send for Device {}
unsafe impl Sync for Device {}

impl Device {
    /// Open device `name` (as `ibv_devices` lists it). The GID is `gid_index` if given,
    /// else the port's first IPv4-mapped GID (RoCEv2 over an IPv4 address), else index 0.
    pub fn open(name: &str, gid_index: Option<u8>) -> Result<Arc<Device>, NetError> {
        let mut count = 0;
        // SAFETY: the list is freed below; device pointers stay valid after ibv_open_device.
        let list = unsafe { ibv_get_device_list(&mut count) };
        if list.is_null() {
            return Err(NetError::Device(format!(
                "cannot list RDMA devices: {} (is the rdma stack loaded? `rdma link` shows devices)",
                std::io::Error::last_os_error()
            )));
        }
        let mut names = Vec::new();
        let mut context = std::ptr::null_mut();
        for index in 0..count.max(0) as usize {
            // SAFETY: index < count entries of the list.
            let device = unsafe { *list.add(index) };
            // SAFETY: ibv_get_device_name returns a NUL-terminated string owned by the list.
            let found = unsafe { CStr::from_ptr(ibv_get_device_name(device)) }
                .to_string_lossy()
                .into_owned();
            if found == name {
                // SAFETY: a device of the list.
                context = unsafe { ibv_open_device(device) };
            }
            names.push(found);
        }
        // SAFETY: the list came from ibv_get_device_list.
        unsafe { ibv_free_device_list(list) };
        if context.is_null() {
            return Err(NetError::Device(if names.contains(&name.to_string()) {
                format!(
                    "cannot open RDMA device {name}: {}",
                    std::io::Error::last_os_error()
                )
            } else {
                format!("no RDMA device named {name} (devices here: {names:?})")
            }));
        }
        let close = |message: String| {
            // SAFETY: opened above, nothing else uses it yet.
            unsafe { ibv_close_device(context) };
            NetError::Device(message)
        };
        // SAFETY: zeroed is a valid ibv_port_attr; the context is open.
        let mut port: ibv_port_attr = unsafe { std::mem::zeroed() };
        if unsafe { ___ibv_query_port(context, PORT, &mut port) } != 0 {
            return Err(close(format!("cannot query port {PORT} of {name}")));
        }
        if port.state != ibv_port_state::IBV_PORT_ACTIVE {
            return Err(close(format!(
                "port {PORT} of {name} is not active (state {})",
                port.state
            )));
        }
        let gid_at = |index: i32| -> Option<[u8; 16]> {
            // SAFETY: zeroed is a valid ibv_gid; the context is open.
            let mut gid: ibv_gid = unsafe { std::mem::zeroed() };
            let found = unsafe { ibv_query_gid(context, PORT, index, &mut gid) } == 0;
            // SAFETY: every bit pattern is a valid [u8; 16].
            found.then_some(unsafe { gid.raw })
        };
        let table = port.gid_tbl_len.clamp(0, 256);
        let gid_index = match gid_index {
            Some(index) => index,
            None => (0..table)
                .find(|index| gid_at(*index).is_some_and(|gid| is_ipv4_mapped(&gid)))
                .unwrap_or(0) as u8,
        };
        let gid = match gid_at(gid_index as i32) {
            Some(gid) => gid,
            None => return Err(close(format!("{name} has no GID at index {gid_index}"))),
        };
        // SAFETY: the context is open.
        let pd = unsafe { ibv_alloc_pd(context) };
        if pd.is_null() {
            return Err(close(format!(
                "cannot allocate a protection domain on {name}"
            )));
        }
        tracing::info!(
            device = name,
            gid_index,
            lid = port.lid,
            mtu = port.active_mtu,
            "RDMA device open"
        );
        Ok(Arc::new(Device {
            name: name.to_string(),
            context,
            pd,
            gid_index,
            gid,
            lid: port.lid,
            mtu: port.active_mtu,
            exposed: Mutex::new(None),
        }))
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Expose `bytes` bytes at `base` to one-sided reads by every peer connected after this
    /// call (replacing what was exposed before).
    ///
    /// # Safety
    /// The memory must stay mapped for the life of the process: peers read it without this
    /// process's involvement.
    pub unsafe fn expose(&self, base: *mut u8, bytes: usize) -> Result<(), NetError> {
        let access =
            ibv_access_flags::IBV_ACCESS_LOCAL_WRITE.0 | ibv_access_flags::IBV_ACCESS_REMOTE_READ.0;
        // SAFETY: the caller keeps the memory mapped.
        let mr = unsafe { ibv_reg_mr(self.pd, base.cast(), bytes, access as i32) };
        if mr.is_null() {
            return Err(NetError::Device(format!(
                "cannot register {bytes} bytes for one-sided reads on {}: {}",
                self.name,
                std::io::Error::last_os_error()
            )));
        }
        let previous = self.exposed.lock().expect("exposed lock").replace(Exposed {
            mr,
            bytes: bytes as u64,
        });
        if let Some(previous) = previous {
            // SAFETY: registered by an earlier call; connections made before keep a stale
            // rkey whose reads then fail, which they treat as "no one-sided reads".
            unsafe { ibv_dereg_mr(previous.mr) };
        }
        Ok(())
    }

    /// (address, bytes, rkey) of the exposed memory, if any.
    pub(crate) fn exposed(&self) -> Option<(u64, u64, u32)> {
        self.exposed
            .lock()
            .expect("exposed lock")
            .as_ref()
            // SAFETY: the MR stays registered while it is the exposed one.
            .map(|exposed| unsafe {
                ((*exposed.mr).addr as u64, exposed.bytes, (*exposed.mr).rkey)
            })
    }
}

fn is_ipv4_mapped(gid: &[u8; 16]) -> bool {
    gid[..10].iter().all(|byte| *byte == 0) && gid[10] == 0xff && gid[11] == 0xff
}

impl Drop for Device {
    fn drop(&mut self) {
        // SAFETY: no queue pair is left (each holds an Arc); freed in reverse order.
        unsafe {
            if let Some(exposed) = self.exposed.get_mut().expect("exposed lock").take() {
                ibv_dereg_mr(exposed.mr);
            }
            ibv_dealloc_pd(self.pd);
            ibv_close_device(self.context);
        }
    }
}
