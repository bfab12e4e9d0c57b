//! The persistent-memory pool: frames, the slots that name them, and the redo log that
//! makes a set of slot changes atomic. Must survive power loss at any persist point: new
//! frame bytes and the redo record are persisted before the 8-byte phase switch that decides
//! a commit, and recovery replays decided records, keeps followers' prepared records and
//! leaders' outcomes of commits across owners (docs/design.md, "Recovery"), discards the rest.

use std::collections::HashMap;

use crate::pm::layout::{
    self, decode_redo, encode_redo, redo_record_bytes, CopyState, Geometry, RedoEntry, RedoPhase,
    SlotRecord, Superblock, TxRole, TxTag, PAGE_BYTES, REDO_AT_PHASE, REDO_AT_WAITING,
    REDO_BLOCK_BYTES, SLOT_BYTES,
};
use crate::pm::region::Region;
use crate::pm::PmError;

/// Identity of a page in the cluster: dataset id and page index within it.
pub type PageKey = (u64, u64);

/// A change a commit makes to the persisted page copies of this node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotChange {
    /// This node's copy of `page` becomes `frame` (already written by the caller) at `version`.
    Put {
        page: PageKey,
        version: u64,
        frame: u32,
        state: CopyState,
    },
    /// This node no longer holds `page`.
    Drop { page: PageKey },
}

/// A page copy as the pool knows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PersistedPage {
    pub slot: u32,
    pub record: SlotRecord,
}

/// Counts for `status`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PoolUsage {
    pub frames_total: u64,
    pub frames_used: u64,
    pub pages_persisted: u64,
}

/// A commit whose frames and Prepared record are durable, waiting for `decide` or `abort`.
#[derive(Debug)]
pub struct Prepared {
    txid: u64,
    tag: TxTag,
    first_block: u32,
    entries: Vec<RedoEntry>,
    keys: Vec<PageKey>,
}

impl Prepared {
    pub fn tag(&self) -> &TxTag {
        &self.tag
    }

    /// The pages, versions and frames the record would make current (a recovered follower
    /// record is rebuilt from these).
    pub fn puts(&self) -> Vec<(PageKey, u64, u32)> {
        self.entries
            .iter()
            .filter_map(|entry| entry.record)
            .map(|record| ((record.dataset, record.page), record.version, record.frame))
            .collect()
    }
}

/// A leader's kept outcome: where its record is and which followers have not confirmed.
#[derive(Clone, Copy, Debug)]
struct Outcome {
    first_block: u32,
    waiting: u64,
}

/// What recovery did at open.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    pub records_replayed: u32,
    pub records_discarded: u32,
    pub pages: u64,
    /// Follower records of multi-owner commits kept for resolution with their leader.
    pub records_pending: u32,
    /// Outcomes of multi-owner commits this node led, kept until every follower confirms.
    pub outcomes_kept: u32,
    /// The file was new: this open formatted it.
    pub formatted: bool,
}

pub struct Pool {
    region: Box<dyn Region>,
    geometry: Geometry,
    superblock: Superblock,
    frame_refs: Vec<u32>,
    free_frames: Vec<u32>,
    free_slots: Vec<u32>,
    redo_used: Vec<bool>,
    pages: HashMap<PageKey, PersistedPage>,
    /// Slots held for pages of prepared commits that have no slot yet: (slot, holders).
    reserved: HashMap<PageKey, (u32, u32)>,
    next_txid: u64,
    /// Decided multi-owner commits this node led, by cluster tx.
    outcomes: HashMap<(u32, u64), Outcome>,
    /// Follower records found at recovery, until the caller takes them.
    recovered: Vec<Prepared>,
}

impl Pool {
    /// Open the pool in `region`. An all-zero superblock (a new file) is formatted for
    /// `node_id`/`cluster_id`; anything else must be a valid pool of the same node and cluster.
    pub fn open(
        region: Box<dyn Region>,
        node_id: u32,
        cluster_id: u64,
    ) -> Result<(Pool, RecoveryReport), PmError> {
        let geometry = Geometry::for_pool_bytes(region.len() as u64)?;
        let existing = Self::read_superblock(region.as_ref())?;
        let formatted = existing.is_none();
        let superblock = if let Some(superblock) = existing {
            if superblock.node_id != node_id {
                return Err(PmError::WrongOwner {
                    what: format!(
                        "it belongs to node {}, not node {node_id}",
                        superblock.node_id
                    ),
                });
            }
            if superblock.cluster_id != cluster_id {
                return Err(PmError::WrongOwner {
                    what: format!(
                        "it belongs to cluster {:016x}, not {cluster_id:016x}",
                        superblock.cluster_id
                    ),
                });
            }
            superblock
        } else {
            Self::format(region.as_ref(), &geometry, node_id, cluster_id)?
        };
        let mut pool = Pool {
            frame_refs: vec![0; geometry.frame_count as usize],
            free_frames: Vec::new(),
            free_slots: Vec::new(),
            redo_used: vec![false; geometry.redo_blocks as usize],
            pages: HashMap::new(),
            reserved: HashMap::new(),
            next_txid: 1,
            outcomes: HashMap::new(),
            recovered: Vec::new(),
            region,
            geometry,
            superblock,
        };
        let mut report = pool.recover()?;
        report.formatted = formatted;
        Ok((pool, report))
    }

    /// The superblock of the pool in `region`: `None` for a new (all-zero) file, an error for
    /// anything that is not a valid hotpot pool. Reads only.
    pub fn read_superblock(region: &dyn Region) -> Result<Option<Superblock>, PmError> {
        let pool_bytes = region.len() as u64;
        Geometry::for_pool_bytes(pool_bytes)?;
        // SAFETY: the region is at least MIN_POOL_BYTES long (checked above).
        let head = unsafe { std::slice::from_raw_parts(region.base(), 64) };
        if head.iter().all(|byte| *byte == 0) {
            return Ok(None);
        }
        Superblock::decode(head, pool_bytes).map(Some)
    }

    fn format(
        region: &dyn Region,
        geometry: &Geometry,
        node_id: u32,
        cluster_id: u64,
    ) -> Result<Superblock, PmError> {
        // A fresh pool: every byte of the metadata areas must be zero, or this is not a new
        // file and we refuse to touch it.
        let meta_bytes = geometry.frames_offset as usize;
        // SAFETY: frames_offset is inside the region (Geometry asserts it).
        let meta = unsafe { std::slice::from_raw_parts(region.base(), meta_bytes) };
        if meta.iter().any(|byte| *byte != 0) {
            return Err(PmError::Foreign);
        }
        let superblock = Superblock {
            pool_bytes: geometry.pool_bytes,
            node_id,
            cluster_id,
            created_unix_s: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|elapsed| elapsed.as_secs())
                .unwrap_or(0),
        };
        let encoded = superblock.encode();
        // SAFETY: writing the first 64 bytes of the region.
        unsafe { std::ptr::copy_nonoverlapping(encoded.as_ptr(), region.base(), encoded.len()) };
        region.persist(0, encoded.len());
        Ok(superblock)
    }

    fn bytes(&self, offset: usize, len: usize) -> &[u8] {
        assert!(offset + len <= self.region.len());
        // SAFETY: in range (asserted); the region lives as long as self.
        unsafe { std::slice::from_raw_parts(self.region.base().add(offset), len) }
    }

    #[allow(clippy::mut_from_ref)]
    fn bytes_mut(&mut self, offset: usize, len: usize) -> &mut [u8] {
        assert!(offset + len <= self.region.len());
        // SAFETY: in range (asserted); &mut self serialises writers.
        unsafe { std::slice::from_raw_parts_mut(self.region.base().add(offset), len) }
    }

    fn recover(&mut self) -> Result<RecoveryReport, PmError> {
        let mut report = RecoveryReport::default();
        let redo_area = self.geometry.redo_blocks as usize * REDO_BLOCK_BYTES;
        let mut kept = Vec::new();
        let mut block = 0u32;
        while block < self.geometry.redo_blocks {
            let at = self.geometry.redo_block_at(block);
            let rest = redo_area - block as usize * REDO_BLOCK_BYTES;
            let Some(record) = decode_redo(self.bytes(at, rest), &self.geometry)? else {
                block += 1;
                continue;
            };
            self.next_txid = self.next_txid.max(record.txid + 1);
            let blocks = block as usize..block as usize + record.blocks as usize;
            match (record.phase, record.tag.role) {
                (RedoPhase::Decided, role) => {
                    for entry in &record.entries {
                        self.write_slot(entry.slot, entry.record.as_ref());
                    }
                    self.region.fence();
                    report.records_replayed += 1;
                    if role == TxRole::Leader {
                        self.store_phase(at, RedoPhase::Outcome);
                        self.redo_used[blocks].fill(true);
                        self.keep_outcome(block, &record.tag, at);
                        report.outcomes_kept += 1;
                    } else {
                        self.free_redo_record(block);
                    }
                }
                (RedoPhase::Outcome, _) => {
                    self.redo_used[blocks].fill(true);
                    self.keep_outcome(block, &record.tag, at);
                    report.outcomes_kept += 1;
                }
                // A follower record whose frames do not match it was torn: power failed
                // before the fence that ends the prepare (cache lines of the record reached
                // PM, some of the data did not), so nobody was told it was prepared.
                (RedoPhase::Prepared, TxRole::Follower)
                    if record
                        .entries
                        .iter()
                        .filter_map(|entry| entry.record)
                        .any(|r| layout::crc(self.frame(r.frame)) != r.data_crc) =>
                {
                    report.records_discarded += 1;
                    self.free_redo_record(block);
                }
                (RedoPhase::Prepared, TxRole::Follower) => {
                    self.redo_used[blocks].fill(true);
                    kept.push(Prepared {
                        txid: record.txid,
                        tag: record.tag,
                        first_block: block,
                        keys: record
                            .entries
                            .iter()
                            .filter_map(|entry| entry.record)
                            .map(|r| (r.dataset, r.page))
                            .collect(),
                        entries: record.entries,
                    });
                    report.records_pending += 1;
                }
                (RedoPhase::Prepared | RedoPhase::Free, _) => {
                    report.records_discarded += 1;
                    self.free_redo_record(block);
                }
            }
            block += record.blocks;
        }
        for slot in 0..self.geometry.slot_count {
            let at = self.geometry.slot_at(slot);
            let decoded = SlotRecord::decode(self.bytes(at, SLOT_BYTES), self.geometry.frame_count)
                .map_err(|error| PmError::Corrupt {
                    what: format!("slot {slot}: {error}"),
                })?;
            let Some(record) = decoded else {
                continue;
            };
            let frame_crc = layout::crc(self.frame(record.frame));
            if frame_crc != record.data_crc {
                return Err(PmError::Corrupt {
                    what: format!(
                        "page {}:{} in frame {}: data checksum {frame_crc:08x}, slot says {:08x}",
                        record.dataset, record.page, record.frame, record.data_crc
                    ),
                });
            }
            let key = (record.dataset, record.page);
            if let Some(previous) = self.pages.get(&key) {
                return Err(PmError::Corrupt {
                    what: format!(
                        "page {}:{} is in slots {} and {slot}",
                        record.dataset, record.page, previous.slot
                    ),
                });
            }
            self.frame_refs[record.frame as usize] += 1;
            self.next_txid = self.next_txid.max(record.txid + 1);
            self.pages.insert(key, PersistedPage { slot, record });
        }
        report.pages = self.pages.len() as u64;
        // A kept follower record holds its frames and the slots it will write.
        for prepared in &kept {
            for entry in &prepared.entries {
                let Some(record) = entry.record else { continue };
                let frame_crc = layout::crc(self.frame(record.frame));
                if frame_crc != record.data_crc {
                    return Err(PmError::Corrupt {
                        what: format!(
                            "prepared page {}:{} in frame {}: data checksum {frame_crc:08x}, record says {:08x}",
                            record.dataset, record.page, record.frame, record.data_crc
                        ),
                    });
                }
                self.frame_refs[record.frame as usize] += 1;
                let key = (record.dataset, record.page);
                let owned_slot = self.pages.get(&key).map(|page| page.slot);
                if owned_slot != Some(entry.slot) {
                    self.reserved.entry(key).or_insert((entry.slot, 0)).1 += 1;
                }
            }
        }
        let used_slots: std::collections::HashSet<u32> = self
            .pages
            .values()
            .map(|page| page.slot)
            .chain(self.reserved.values().map(|(slot, _)| *slot))
            .collect();
        self.free_slots = (0..self.geometry.slot_count)
            .rev()
            .filter(|slot| !used_slots.contains(slot))
            .collect();
        self.free_frames = (0..self.geometry.frame_count)
            .rev()
            .filter(|frame| self.frame_refs[*frame as usize] == 0)
            .collect();
        self.recovered = kept;
        Ok(report)
    }

    fn keep_outcome(&mut self, block: u32, tag: &TxTag, record_at: usize) {
        let waiting = u64::from_le_bytes(
            self.bytes(record_at + REDO_AT_WAITING, 8)
                .try_into()
                .expect("8 bytes"),
        );
        if waiting == 0 {
            self.free_redo_record(block);
            return;
        }
        self.outcomes.insert(
            tag.tx,
            Outcome {
                first_block: block,
                waiting,
            },
        );
    }

    /// Follower records of multi-owner commits found at recovery (taken once).
    pub fn take_recovered(&mut self) -> Vec<Prepared> {
        std::mem::take(&mut self.recovered)
    }

    /// Whether this node led cluster commit `tx` and decided it (its outcome is kept).
    pub fn outcome_decided(&self, tx: (u32, u64)) -> bool {
        self.outcomes.contains_key(&tx)
    }

    /// Follower `node` has decided `tx`; the outcome is freed once all have.
    pub fn confirm_outcome(&mut self, tx: (u32, u64), node: u32) {
        let Some(outcome) = self.outcomes.get_mut(&tx) else {
            return;
        };
        let Some(bit) = TxTag::bitmap(&[node]) else {
            return;
        };
        outcome.waiting &= !bit;
        let Outcome {
            first_block,
            waiting,
        } = *outcome;
        let at = self.geometry.redo_block_at(first_block) + REDO_AT_WAITING;
        self.bytes_mut(at, 8)
            .copy_from_slice(&waiting.to_le_bytes());
        self.region.persist(at, 8);
        if waiting == 0 {
            self.outcomes.remove(&tx);
            self.free_redo_record(first_block);
        }
    }

    /// Outcomes still waiting for followers: (tx, followers).
    /// In commit order, so every caller (and a replayed simulation) sees the same order.
    pub fn outcomes_waiting(&self) -> Vec<((u32, u64), u64)> {
        let mut waiting: Vec<_> = self
            .outcomes
            .iter()
            .map(|(tx, outcome)| (*tx, outcome.waiting))
            .collect();
        waiting.sort_unstable();
        waiting
    }

    pub fn superblock(&self) -> &Superblock {
        &self.superblock
    }

    pub fn usage(&self) -> PoolUsage {
        PoolUsage {
            frames_total: self.geometry.frame_count as u64,
            frames_used: (self.geometry.frame_count as usize - self.free_frames.len()) as u64,
            pages_persisted: self.pages.len() as u64,
        }
    }

    /// The persisted copy of `page` on this node, if any.
    pub fn page(&self, page: PageKey) -> Option<&PersistedPage> {
        self.pages.get(&page)
    }

    /// Where the persisted copy of `page` lies in the region: (its slot as stored, slot
    /// offset, frame offset).
    pub fn locate(
        &self,
        page: PageKey,
    ) -> Option<(PersistedPage, [u8; layout::SLOT_BYTES], usize, usize)> {
        let found = *self.pages.get(&page)?;
        let slot_at = self.geometry.slot_at(found.slot);
        let slot: [u8; layout::SLOT_BYTES] = self
            .bytes(slot_at, layout::SLOT_BYTES)
            .try_into()
            .expect("one slot");
        Some((
            found,
            slot,
            slot_at,
            self.geometry.frame_at(found.record.frame),
        ))
    }

    /// The whole region (for registering it with an RDMA device): start and length.
    pub fn memory(&self) -> (*mut u8, usize) {
        (self.region.base(), self.region.len())
    }

    /// Every persisted page of `dataset`, in page order.
    pub fn pages_of(&self, dataset: u64) -> Vec<PersistedPage> {
        let mut pages: Vec<PersistedPage> = self
            .pages
            .values()
            .filter(|page| page.record.dataset == dataset)
            .copied()
            .collect();
        pages.sort_by_key(|page| page.record.page);
        pages
    }

    /// Every page with a persisted copy here, in no particular order.
    pub fn page_keys(&self) -> Vec<PageKey> {
        self.pages.keys().copied().collect()
    }

    /// Dataset ids with at least one persisted page.
    pub fn datasets(&self) -> std::collections::BTreeSet<u64> {
        self.pages.keys().map(|(dataset, _)| *dataset).collect()
    }

    pub fn frame(&self, frame: u32) -> &[u8] {
        let at = self.geometry.frame_at(frame);
        self.bytes(at, PAGE_BYTES)
    }

    /// Writable bytes of a frame. Only for frames no slot names yet (staging): a frame a
    /// slot names is immutable until it is freed.
    pub fn frame_mut(&mut self, frame: u32) -> &mut [u8] {
        assert!(
            self.frame_refs[frame as usize] == 1,
            "frame is shared or free"
        );
        let at = self.geometry.frame_at(frame);
        self.bytes_mut(at, PAGE_BYTES)
    }

    /// Take a free frame with one reference (the caller's). Contents are unspecified.
    pub fn alloc_frame(&mut self) -> Result<u32, PmError> {
        let frame = self.free_frames.pop().ok_or(PmError::Full {
            frames: self.geometry.frame_count,
        })?;
        assert_eq!(self.frame_refs[frame as usize], 0);
        self.frame_refs[frame as usize] = 1;
        Ok(frame)
    }

    pub fn ref_frame(&mut self, frame: u32) {
        assert!(self.frame_refs[frame as usize] > 0, "ref of a free frame");
        self.frame_refs[frame as usize] += 1;
    }

    pub fn unref_frame(&mut self, frame: u32) {
        let refs = &mut self.frame_refs[frame as usize];
        assert!(*refs > 0, "unref of a free frame");
        *refs -= 1;
        if *refs == 0 {
            self.free_frames.push(frame);
        }
    }

    pub fn frames_free(&self) -> usize {
        self.free_frames.len()
    }

    /// Apply `changes` atomically: after a crash at any point either all or none hold.
    /// Each `Put` frame carries one reference from the caller, which the slot takes over.
    /// Returns the commit's transaction id (0 for an empty commit).
    pub fn commit(&mut self, changes: &[SlotChange], tag: TxTag) -> Result<u64, PmError> {
        if changes.is_empty() {
            return Ok(0);
        }
        let prepared = self.prepare(changes, tag)?;
        Ok(self.decide(prepared))
    }

    /// Steps 1 and 2 of a commit: the new frames and a Prepared redo record are durable,
    /// nothing is current yet. A crash now discards it (a follower's record is kept). The pages' slots are reserved, so a
    /// page is never given two slots while the record waits for `decide` or `abort`.
    /// `tag` names the record's part in a cluster commit (see `TxRole`).
    pub fn prepare(&mut self, changes: &[SlotChange], tag: TxTag) -> Result<Prepared, PmError> {
        let txid = self.next_txid;
        self.next_txid += 1;
        let mut entries = Vec::with_capacity(changes.len());
        let mut keys = Vec::with_capacity(changes.len());
        let mut reserved_here = Vec::new();
        let mut claimed = std::collections::HashSet::new();
        for change in changes {
            let key = match change {
                SlotChange::Put { page, .. } | SlotChange::Drop { page } => *page,
            };
            assert!(claimed.insert(key), "page {key:?} twice in one commit");
            match *change {
                SlotChange::Put {
                    page,
                    version,
                    frame,
                    state,
                } => {
                    assert!(
                        self.frame_refs[frame as usize] > 0,
                        "commit of a free frame"
                    );
                    let data_crc = layout::crc(self.frame(frame));
                    self.region.flush(self.geometry.frame_at(frame), PAGE_BYTES);
                    let existing = self
                        .pages
                        .get(&page)
                        .map(|found| found.slot)
                        .or_else(|| self.reserved.get(&page).map(|(slot, _)| *slot));
                    let slot = match existing {
                        Some(slot) => slot,
                        None => match self.free_slots.pop() {
                            Some(slot) => {
                                reserved_here.push((page, slot));
                                slot
                            }
                            None => {
                                self.free_slots
                                    .extend(reserved_here.iter().map(|(_, slot)| *slot));
                                return Err(PmError::Full {
                                    frames: self.geometry.frame_count,
                                });
                            }
                        },
                    };
                    entries.push(RedoEntry {
                        slot,
                        record: Some(SlotRecord {
                            dataset: page.0,
                            page: page.1,
                            version,
                            frame,
                            state,
                            data_crc,
                            txid,
                        }),
                    });
                    keys.push(page);
                }
                SlotChange::Drop { page } => {
                    if let Some(existing) = self.pages.get(&page) {
                        entries.push(RedoEntry {
                            slot: existing.slot,
                            record: None,
                        });
                        keys.push(page);
                    }
                }
            }
        }
        for (page, slot) in &reserved_here {
            self.reserved.entry(*page).or_insert((*slot, 0)).1 += 1;
        }
        for page in &keys {
            if let Some(reservation) = self.reserved.get_mut(page) {
                if !reserved_here.iter().any(|(reserved, _)| reserved == page) {
                    reservation.1 += 1;
                }
            }
        }
        let record_bytes = redo_record_bytes(entries.len());
        let blocks = record_bytes.div_ceil(REDO_BLOCK_BYTES);
        let Some(first_block) = self.alloc_redo(blocks) else {
            let prepared = Prepared {
                txid,
                tag,
                first_block: u32::MAX,
                entries,
                keys,
            };
            self.forget_reservations(&prepared);
            return Err(PmError::LogFull { blocks });
        };
        let at = self.geometry.redo_block_at(first_block);
        encode_redo(txid, &tag, &entries, self.bytes_mut(at, record_bytes));
        self.region.flush(at, record_bytes);
        self.region.fence();
        Ok(Prepared {
            txid,
            tag,
            first_block,
            entries,
            keys,
        })
    }

    /// Steps 3 to 5: the 8-byte decision, the slots, the record freed. The `Put` frames'
    /// references pass to the slots; the frames they replace lose one.
    pub fn decide(&mut self, prepared: Prepared) -> u64 {
        let at = self.geometry.redo_block_at(prepared.first_block);
        // 3. The decision: one aligned 8-byte store, persisted.
        self.store_phase(at, RedoPhase::Decided);
        // 4. Slots updated and persisted (one fence for all of them).
        for entry in &prepared.entries {
            self.write_slot(entry.slot, entry.record.as_ref());
        }
        self.region.fence();
        // 5. Record freed (a leader's kept as the outcome); in-memory index and references
        // follow the slots.
        if prepared.tag.role == TxRole::Leader && prepared.tag.participants != 0 {
            self.store_phase(at, RedoPhase::Outcome);
            self.outcomes.insert(
                prepared.tag.tx,
                Outcome {
                    first_block: prepared.first_block,
                    waiting: prepared.tag.participants,
                },
            );
        } else {
            self.free_redo_record(prepared.first_block);
        }
        for (entry, key) in prepared.entries.iter().zip(&prepared.keys) {
            let old = match entry.record {
                Some(record) => self.pages.insert(
                    *key,
                    PersistedPage {
                        slot: entry.slot,
                        record,
                    },
                ),
                None => {
                    self.free_slots.push(entry.slot);
                    self.pages.remove(key)
                }
            };
            if let Some(old) = old {
                self.unref_frame(old.record.frame);
            }
        }
        // After the index: a reserved slot now in use by its page must not be freed.
        self.forget_reservations(&prepared);
        prepared.txid
    }

    /// Discard a prepared commit: nothing of it becomes current. The caller keeps the
    /// references of its `Put` frames.
    pub fn abort(&mut self, prepared: Prepared) {
        self.free_redo_record(prepared.first_block);
        self.forget_reservations(&prepared);
    }

    /// Drop this commit's hold on reserved slots; a slot nobody holds and no page uses is
    /// free again.
    fn forget_reservations(&mut self, prepared: &Prepared) {
        for key in &prepared.keys {
            let Some(reservation) = self.reserved.get_mut(key) else {
                continue;
            };
            reservation.1 -= 1;
            if reservation.1 == 0 {
                let (slot, _) = self.reserved.remove(key).expect("reservation present");
                let in_use = self.pages.get(key).is_some_and(|page| page.slot == slot);
                if !in_use {
                    self.free_slots.push(slot);
                }
            }
        }
    }

    fn store_phase(&mut self, record_at: usize, phase: RedoPhase) {
        let word_at = record_at + REDO_AT_PHASE;
        assert_eq!(word_at % 8, 0, "phase word must be 8-byte aligned");
        // SAFETY: aligned, in range; an aligned 8-byte store is single-copy atomic on x86_64.
        unsafe {
            let word = self.region.base().add(word_at) as *const std::sync::atomic::AtomicU64;
            (*word).store(phase as u64, std::sync::atomic::Ordering::Release);
        }
        self.region.persist(word_at, 8);
    }

    fn write_slot(&mut self, slot: u32, record: Option<&SlotRecord>) {
        let at = self.geometry.slot_at(slot);
        let encoded = record.map(SlotRecord::encode).unwrap_or([0u8; SLOT_BYTES]);
        self.bytes_mut(at, SLOT_BYTES).copy_from_slice(&encoded);
        self.region.flush(at, SLOT_BYTES);
    }

    fn alloc_redo(&mut self, blocks: usize) -> Option<u32> {
        let mut run = 0usize;
        for index in 0..self.redo_used.len() {
            if self.redo_used[index] {
                run = 0;
                continue;
            }
            run += 1;
            if run == blocks {
                let first = index + 1 - blocks;
                self.redo_used[first..=index].fill(true);
                return Some(first as u32);
            }
        }
        None
    }

    fn free_redo_record(&mut self, first_block: u32) {
        let at = self.geometry.redo_block_at(first_block);
        let blocks = u32::from_le_bytes(self.bytes(at + 4, 4).try_into().expect("4 bytes"));
        self.store_phase(at, RedoPhase::Free);
        self.bytes_mut(at, 8).fill(0);
        self.region.persist(at, 8);
        let end = (first_block as usize + blocks.max(1) as usize).min(self.redo_used.len());
        self.redo_used[first_block as usize..end].fill(false);
    }
}
