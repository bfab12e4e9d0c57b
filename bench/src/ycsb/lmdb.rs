//! LMDB in write-map mode (every commit is an msync of the map: the path database engines
//! take on hotpot), through `lmdb-master-sys`. One environment is shared by all threads; each
//! operation is its own transaction.

use std::ffi::{CStr, CString};
use std::path::Path;

use lmdb_master_sys as ffi;

pub struct Lmdb {
    env: *mut ffi::MDB_env,
    dbi: ffi::MDB_dbi,
}

// SAFETY: an LMDB environment and an opened dbi handle may be used from any thread; each
// transaction stays on the thread that began it (MDB_NOTLS for readers).
unsafe impl Send for Lmdb {}
unsafe impl Sync for Lmdb {}

fn check(rc: i32, what: &str) -> Result<(), String> {
    if rc == 0 {
        return Ok(());
    }
    // SAFETY: mdb_strerror returns a static C string for any code.
    let text = unsafe { CStr::from_ptr(ffi::mdb_strerror(rc)) };
    Err(format!("{what}: {}", text.to_string_lossy()))
}

fn val(bytes: &[u8]) -> ffi::MDB_val {
    ffi::MDB_val {
        mv_size: bytes.len(),
        mv_data: bytes.as_ptr() as *mut libc::c_void,
    }
}

/// A transaction that aborts unless committed.
struct Txn(*mut ffi::MDB_txn);

impl Txn {
    fn commit(mut self) -> Result<(), String> {
        let txn = std::mem::replace(&mut self.0, std::ptr::null_mut());
        // SAFETY: a live transaction, committed once.
        check(unsafe { ffi::mdb_txn_commit(txn) }, "commit")
    }
}

impl Drop for Txn {
    fn drop(&mut self) {
        if !self.0.is_null() {
            // SAFETY: a live transaction not yet finished.
            unsafe { ffi::mdb_txn_abort(self.0) };
        }
    }
}

impl Lmdb {
    /// Open (creating) the environment in `dir`. `read_only` also skips the lock file, for a
    /// reader on another node checking what was committed.
    pub fn open(dir: &Path, map_bytes: usize, read_only: bool) -> Result<Lmdb, String> {
        let path =
            CString::new(dir.as_os_str().as_encoded_bytes()).map_err(|_| "path has a NUL byte")?;
        let mut env = std::ptr::null_mut();
        // SAFETY: standard LMDB environment set-up; the handle is closed on every error path.
        unsafe {
            check(ffi::mdb_env_create(&mut env), "create environment")?;
            let flags = if read_only {
                ffi::MDB_RDONLY | ffi::MDB_NOLOCK
            } else {
                ffi::MDB_WRITEMAP | ffi::MDB_NOTLS
            };
            let opened = check(ffi::mdb_env_set_mapsize(env, map_bytes), "set map size")
                .and_then(|()| check(ffi::mdb_env_set_maxreaders(env, 256), "set readers"))
                .and_then(|()| {
                    check(
                        ffi::mdb_env_open(env, path.as_ptr(), flags, 0o644),
                        "open environment",
                    )
                });
            if let Err(error) = opened {
                ffi::mdb_env_close(env);
                return Err(format!("{}: {error}", dir.display()));
            }
            let mut lmdb = Lmdb { env, dbi: 0 };
            let txn = lmdb.begin(read_only)?;
            let create = if read_only { 0 } else { ffi::MDB_CREATE };
            check(
                ffi::mdb_dbi_open(txn.0, std::ptr::null(), create, &mut lmdb.dbi),
                "open database",
            )?;
            txn.commit()?;
            Ok(lmdb)
        }
    }

    fn begin(&self, read_only: bool) -> Result<Txn, String> {
        let mut txn = std::ptr::null_mut();
        let flags = if read_only { ffi::MDB_RDONLY } else { 0 };
        // SAFETY: the environment is open.
        check(
            unsafe { ffi::mdb_txn_begin(self.env, std::ptr::null_mut(), flags, &mut txn) },
            "begin",
        )?;
        Ok(Txn(txn))
    }

    pub fn put(&self, key: &[u8], value: &[u8]) -> Result<(), String> {
        let txn = self.begin(false)?;
        let (mut key, mut value) = (val(key), val(value));
        // SAFETY: a write transaction of this environment; LMDB copies the bytes.
        check(
            unsafe { ffi::mdb_put(txn.0, self.dbi, &mut key, &mut value, 0) },
            "put",
        )?;
        txn.commit()
    }

    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, String> {
        let txn = self.begin(true)?;
        let mut key = val(key);
        let mut found = val(&[]);
        // SAFETY: a read transaction; the value is copied out before the transaction ends.
        let rc = unsafe { ffi::mdb_get(txn.0, self.dbi, &mut key, &mut found) };
        if rc == ffi::MDB_NOTFOUND {
            return Ok(None);
        }
        check(rc, "get")?;
        // SAFETY: LMDB returned a valid slice for the life of the transaction.
        Ok(Some(
            unsafe { std::slice::from_raw_parts(found.mv_data as *const u8, found.mv_size) }
                .to_vec(),
        ))
    }

    /// Read, change and write back one record in one write transaction. `false` if absent.
    pub fn update(&self, key: &[u8], change: impl FnOnce(&mut Vec<u8>)) -> Result<bool, String> {
        let txn = self.begin(false)?;
        let mut lookup = val(key);
        let mut found = val(&[]);
        // SAFETY: as in `get`, inside a write transaction.
        let rc = unsafe { ffi::mdb_get(txn.0, self.dbi, &mut lookup, &mut found) };
        if rc == ffi::MDB_NOTFOUND {
            return Ok(false);
        }
        check(rc, "get for update")?;
        // SAFETY: valid until the put below; copied first.
        let mut record =
            unsafe { std::slice::from_raw_parts(found.mv_data as *const u8, found.mv_size) }
                .to_vec();
        change(&mut record);
        let (mut key, mut value) = (val(key), val(&record));
        // SAFETY: a write transaction of this environment.
        check(
            unsafe { ffi::mdb_put(txn.0, self.dbi, &mut key, &mut value, 0) },
            "put",
        )?;
        txn.commit()?;
        Ok(true)
    }

    /// Read up to `count` records from the first key ≥ `start`; returns how many were read.
    pub fn scan(&self, start: &[u8], count: usize) -> Result<usize, String> {
        let txn = self.begin(true)?;
        let mut cursor = std::ptr::null_mut();
        // SAFETY: a cursor of this read transaction, closed before it ends.
        unsafe {
            check(
                ffi::mdb_cursor_open(txn.0, self.dbi, &mut cursor),
                "open cursor",
            )?;
            let mut key = val(start);
            let mut value = val(&[]);
            let mut seen = 0;
            let mut op = ffi::MDB_SET_RANGE;
            while seen < count && ffi::mdb_cursor_get(cursor, &mut key, &mut value, op) == 0 {
                std::hint::black_box(std::slice::from_raw_parts(
                    value.mv_data as *const u8,
                    value.mv_size,
                ));
                seen += 1;
                op = ffi::MDB_NEXT;
            }
            ffi::mdb_cursor_close(cursor);
            Ok(seen)
        }
    }

    /// Number of records.
    pub fn len(&self) -> Result<u64, String> {
        let txn = self.begin(true)?;
        // SAFETY: MDB_stat is plain data filled by LMDB.
        let mut stat: ffi::MDB_stat = unsafe { std::mem::zeroed() };
        check(unsafe { ffi::mdb_stat(txn.0, self.dbi, &mut stat) }, "stat")?;
        Ok(stat.ms_entries as u64)
    }

    pub fn is_empty(&self) -> Result<bool, String> {
        self.len().map(|records| records == 0)
    }
}

impl Drop for Lmdb {
    fn drop(&mut self) {
        // SAFETY: every transaction has ended; closed once.
        unsafe { ffi::mdb_env_close(self.env) };
    }
}
