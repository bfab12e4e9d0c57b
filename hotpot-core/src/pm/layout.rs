//! The byte layout of a PM pool: superblock, page slots, redo records. Fixed-width,
//! little-endian, each structure checksummed (CRC-32). Decoders never trust the bytes:
//! every field is checked and a bad one is an error, never a panic.

use crate::pm::PmError;

pub const PAGE_BYTES: usize = 4096;
pub const MAGIC: [u8; 8] = *b"HOTPOTPM";
pub const LAYOUT_VERSION: u32 = 2;
pub const SUPERBLOCK_BYTES: usize = PAGE_BYTES;
pub const SLOT_BYTES: usize = 64;
pub const REDO_BLOCK_BYTES: usize = PAGE_BYTES;
pub const REDO_HEADER_BYTES: usize = 64;
pub const REDO_ENTRY_BYTES: usize = 40;
pub const REDO_MAGIC: u32 = u32::from_le_bytes(*b"REDO");
/// Slots per frame: room for pages that share a frame (merging, pinned versions).
pub const SLOTS_PER_FRAME: u64 = 2;

fn le_u32(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}
fn le_u64(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}
fn put_u32(bytes: &mut [u8], at: usize, value: u32) {
    bytes[at..at + 4].copy_from_slice(&value.to_le_bytes());
}
fn put_u64(bytes: &mut [u8], at: usize, value: u64) {
    bytes[at..at + 8].copy_from_slice(&value.to_le_bytes());
}

pub fn crc(bytes: &[u8]) -> u32 {
    crc32fast::hash(bytes)
}

/// Where each area of the pool starts; derived from the pool size alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub pool_bytes: u64,
    pub frame_count: u32,
    pub slot_count: u32,
    pub redo_blocks: u32,
    pub slots_offset: u64,
    pub redo_offset: u64,
    pub frames_offset: u64,
}

impl Geometry {
    /// Smallest pool we accept: room for 64 frames.
    pub const MIN_POOL_BYTES: u64 = 1 << 20;

    pub fn for_pool_bytes(pool_bytes: u64) -> Result<Geometry, PmError> {
        if pool_bytes < Self::MIN_POOL_BYTES {
            return Err(PmError::Corrupt {
                what: format!(
                    "pool of {pool_bytes} bytes is too small (minimum {} bytes)",
                    Self::MIN_POOL_BYTES
                ),
            });
        }
        // Per frame: the frame, its slots, and one redo entry (a commit of every frame fits).
        let per_frame =
            PAGE_BYTES as u64 + SLOTS_PER_FRAME * SLOT_BYTES as u64 + REDO_ENTRY_BYTES as u64;
        let fixed = SUPERBLOCK_BYTES as u64 + 4 * REDO_BLOCK_BYTES as u64 + 2 * PAGE_BYTES as u64;
        let frame_count = ((pool_bytes - fixed) / per_frame).min(u32::MAX as u64 / 2) as u32;
        let slot_count = (frame_count as u64 * SLOTS_PER_FRAME) as u32;
        let slots_offset = SUPERBLOCK_BYTES as u64;
        let slots_bytes =
            (slot_count as u64 * SLOT_BYTES as u64).next_multiple_of(PAGE_BYTES as u64);
        let redo_offset = slots_offset + slots_bytes;
        let redo_blocks = ((frame_count as u64 * REDO_ENTRY_BYTES as u64)
            .div_ceil(REDO_BLOCK_BYTES as u64)
            + 4) as u32;
        let frames_offset = redo_offset + redo_blocks as u64 * REDO_BLOCK_BYTES as u64;
        let geometry = Geometry {
            pool_bytes,
            frame_count,
            slot_count,
            redo_blocks,
            slots_offset,
            redo_offset,
            frames_offset,
        };
        assert!(geometry.frames_offset + frame_count as u64 * PAGE_BYTES as u64 <= pool_bytes);
        Ok(geometry)
    }

    pub fn slot_at(&self, slot: u32) -> usize {
        assert!(slot < self.slot_count, "slot index out of range");
        (self.slots_offset + slot as u64 * SLOT_BYTES as u64) as usize
    }
    pub fn frame_at(&self, frame: u32) -> usize {
        assert!(frame < self.frame_count, "frame index out of range");
        (self.frames_offset + frame as u64 * PAGE_BYTES as u64) as usize
    }
    pub fn redo_block_at(&self, block: u32) -> usize {
        assert!(block < self.redo_blocks, "redo block out of range");
        (self.redo_offset + block as u64 * REDO_BLOCK_BYTES as u64) as usize
    }
}

/// Block 0 of the pool.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Superblock {
    pub pool_bytes: u64,
    pub node_id: u32,
    pub cluster_id: u64,
    pub created_unix_s: u64,
}

impl Superblock {
    // Offsets inside the superblock.
    const AT_VERSION: usize = 8;
    const AT_PAGE_BYTES: usize = 12;
    const AT_POOL_BYTES: usize = 16;
    const AT_NODE_ID: usize = 24;
    const AT_CLUSTER_ID: usize = 32;
    const AT_CREATED: usize = 40;
    const AT_CRC: usize = 48;

    pub fn encode(&self) -> [u8; 64] {
        let mut bytes = [0u8; 64];
        bytes[0..8].copy_from_slice(&MAGIC);
        put_u32(&mut bytes, Self::AT_VERSION, LAYOUT_VERSION);
        put_u32(&mut bytes, Self::AT_PAGE_BYTES, PAGE_BYTES as u32);
        put_u64(&mut bytes, Self::AT_POOL_BYTES, self.pool_bytes);
        put_u32(&mut bytes, Self::AT_NODE_ID, self.node_id);
        put_u64(&mut bytes, Self::AT_CLUSTER_ID, self.cluster_id);
        put_u64(&mut bytes, Self::AT_CREATED, self.created_unix_s);
        let sum = crc(&bytes[..Self::AT_CRC]);
        put_u32(&mut bytes, Self::AT_CRC, sum);
        bytes
    }

    pub fn decode(bytes: &[u8], file_bytes: u64) -> Result<Superblock, PmError> {
        if bytes.len() < 64 {
            return Err(PmError::Corrupt {
                what: format!("superblock of {} bytes, expected 64", bytes.len()),
            });
        }
        if bytes[0..8] != MAGIC {
            return Err(PmError::Foreign);
        }
        let stored = le_u32(bytes, Self::AT_CRC);
        if crc(&bytes[..Self::AT_CRC]) != stored {
            return Err(PmError::Corrupt {
                what: "superblock checksum mismatch".into(),
            });
        }
        let version = le_u32(bytes, Self::AT_VERSION);
        if version != LAYOUT_VERSION {
            return Err(PmError::Corrupt {
                what: format!(
                    "layout version {version}, this build reads version {LAYOUT_VERSION}"
                ),
            });
        }
        let page = le_u32(bytes, Self::AT_PAGE_BYTES);
        if page as usize != PAGE_BYTES {
            return Err(PmError::Corrupt {
                what: format!("page size {page}, expected {PAGE_BYTES}"),
            });
        }
        let pool_bytes = le_u64(bytes, Self::AT_POOL_BYTES);
        if pool_bytes != file_bytes {
            return Err(PmError::Corrupt {
                what: format!("superblock says {pool_bytes} bytes but the file has {file_bytes}"),
            });
        }
        Ok(Superblock {
            pool_bytes,
            node_id: le_u32(bytes, Self::AT_NODE_ID),
            cluster_id: le_u64(bytes, Self::AT_CLUSTER_ID),
            created_unix_s: le_u64(bytes, Self::AT_CREATED),
        })
    }
}

/// What a slot holds about one page copy. State codes are persisted; never renumber.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum CopyState {
    /// A clean copy of the latest version, readable locally.
    Committed,
    /// A clean copy held for reliability only.
    Redundant,
}

impl CopyState {
    fn code(self) -> u8 {
        match self {
            CopyState::Committed => 1,
            CopyState::Redundant => 2,
        }
    }
    fn from_code(code: u8) -> Option<CopyState> {
        match code {
            1 => Some(CopyState::Committed),
            2 => Some(CopyState::Redundant),
            _ => None,
        }
    }
}

/// One persisted page copy: which page, which version, where its bytes are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotRecord {
    pub dataset: u64,
    pub page: u64,
    pub version: u64,
    pub frame: u32,
    pub state: CopyState,
    pub data_crc: u32,
    pub txid: u64,
}

impl SlotRecord {
    const AT_CRC: usize = 56;

    pub fn encode(&self) -> [u8; SLOT_BYTES] {
        let mut bytes = [0u8; SLOT_BYTES];
        put_u64(&mut bytes, 0, self.dataset);
        put_u64(&mut bytes, 8, self.page);
        put_u64(&mut bytes, 16, self.version);
        put_u32(&mut bytes, 24, self.frame);
        bytes[28] = self.state.code();
        put_u32(&mut bytes, 32, self.data_crc);
        put_u64(&mut bytes, 40, self.txid);
        let sum = crc(&bytes[..Self::AT_CRC]);
        put_u32(&mut bytes, Self::AT_CRC, sum);
        bytes
    }

    /// `Ok(None)` for a free slot (all zero), an error for a damaged one.
    pub fn decode(bytes: &[u8], frame_count: u32) -> Result<Option<SlotRecord>, PmError> {
        if bytes.len() < SLOT_BYTES {
            return Err(PmError::Corrupt {
                what: format!("slot of {} bytes, expected {SLOT_BYTES}", bytes.len()),
            });
        }
        if bytes.iter().all(|byte| *byte == 0) {
            return Ok(None);
        }
        if crc(&bytes[..Self::AT_CRC]) != le_u32(bytes, Self::AT_CRC) {
            return Err(PmError::Corrupt {
                what: "slot checksum mismatch".into(),
            });
        }
        let state = CopyState::from_code(bytes[28]).ok_or_else(|| PmError::Corrupt {
            what: format!("slot state code {}", bytes[28]),
        })?;
        let frame = le_u32(bytes, 24);
        if frame >= frame_count {
            return Err(PmError::Corrupt {
                what: format!("slot points at frame {frame}, pool has {frame_count}"),
            });
        }
        let dataset = le_u64(bytes, 0);
        if dataset == 0 {
            return Err(PmError::Corrupt {
                what: "slot with dataset 0".into(),
            });
        }
        Ok(Some(SlotRecord {
            dataset,
            page: le_u64(bytes, 8),
            version: le_u64(bytes, 16),
            frame,
            state,
            data_crc: le_u32(bytes, 32),
            txid: le_u64(bytes, 40),
        }))
    }
}

/// One step of a redo record: put `record` in `slot`, or free the slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RedoEntry {
    pub slot: u32,
    pub record: Option<SlotRecord>,
}

impl RedoEntry {
    pub fn encode_into(&self, bytes: &mut [u8]) {
        bytes[..REDO_ENTRY_BYTES].fill(0);
        put_u32(bytes, 0, self.slot);
        if let Some(record) = self.record {
            put_u32(bytes, 4, record.frame);
            put_u64(bytes, 8, record.dataset);
            put_u64(bytes, 16, record.page);
            put_u64(bytes, 24, record.version);
            put_u32(bytes, 32, record.data_crc);
            bytes[36] = record.state.code();
        }
    }

    pub fn decode(bytes: &[u8], txid: u64, geometry: &Geometry) -> Result<RedoEntry, PmError> {
        let slot = le_u32(bytes, 0);
        if slot >= geometry.slot_count {
            return Err(PmError::Corrupt {
                what: format!(
                    "redo entry names slot {slot}, pool has {}",
                    geometry.slot_count
                ),
            });
        }
        if bytes[36] == 0 {
            return Ok(RedoEntry { slot, record: None });
        }
        let state = CopyState::from_code(bytes[36]).ok_or_else(|| PmError::Corrupt {
            what: format!("redo entry state code {}", bytes[36]),
        })?;
        let frame = le_u32(bytes, 4);
        if frame >= geometry.frame_count {
            return Err(PmError::Corrupt {
                what: format!(
                    "redo entry names frame {frame}, pool has {}",
                    geometry.frame_count
                ),
            });
        }
        Ok(RedoEntry {
            slot,
            record: Some(SlotRecord {
                dataset: le_u64(bytes, 8),
                page: le_u64(bytes, 16),
                version: le_u64(bytes, 24),
                frame,
                state,
                data_crc: le_u32(bytes, 32),
                txid,
            }),
        })
    }
}

/// Persisted phase of a redo record: the 8-byte word at offset 8 of its header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RedoPhase {
    Free = 0,
    /// Written and persisted, not decided: discarded at recovery, unless it is a follower's
    /// part of a multi-owner commit (kept, and resolved with the commit's leader).
    Prepared = 1,
    /// Decided: recovery applies it.
    Decided = 2,
    /// A leader's decided and applied multi-owner commit, kept (not replayed) so followers
    /// can learn the outcome until each has said it decided too.
    Outcome = 3,
}

/// A redo record's part in a cluster commit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TxRole {
    /// A commit of this node alone, or a replica's copy: nothing to resolve after a crash.
    #[default]
    Local = 0,
    /// A follower owner's prepared pages of a multi-owner commit: resolved with the leader.
    Follower = 1,
    /// The leader owner's pages: deciding them decides the whole multi-owner commit.
    Leader = 2,
}

/// The cluster identity of a redo record (bytes 32..64 of its header).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TxTag {
    pub role: TxRole,
    /// The commit's cluster-wide name: the committing node and its sequence number.
    pub tx: (u32, u64),
    pub leader: u32,
    /// Bit `id - 1` for every owner in the commit (node ids 1..=64).
    pub participants: u64,
}

impl TxTag {
    /// The node ids of a participant bitmap.
    pub fn ids(bitmap: u64) -> Vec<u32> {
        (0..64)
            .filter(|bit| bitmap & (1u64 << bit) != 0)
            .map(|bit| bit + 1)
            .collect()
    }

    /// The bitmap for `nodes`; `None` if one is outside 1..=64.
    pub fn bitmap(nodes: &[u32]) -> Option<u64> {
        nodes.iter().try_fold(0u64, |bits, node| {
            (1..=64).contains(node).then(|| bits | 1u64 << (node - 1))
        })
    }
}

pub const REDO_AT_PHASE: usize = 8;
/// The leader's bitmap of followers that have not confirmed (outside the checksum: it is
/// rewritten, one aligned 8-byte store, as they confirm).
pub const REDO_AT_WAITING: usize = 56;

pub fn redo_record_bytes(entries: usize) -> usize {
    REDO_HEADER_BYTES + entries * REDO_ENTRY_BYTES
}

/// Encode a record (header and entries) with phase Prepared.
pub fn encode_redo(txid: u64, tag: &TxTag, entries: &[RedoEntry], bytes: &mut [u8]) {
    let blocks = redo_record_bytes(entries.len()).div_ceil(REDO_BLOCK_BYTES) as u32;
    put_u32(bytes, 0, REDO_MAGIC);
    put_u32(bytes, 4, blocks);
    put_u64(bytes, REDO_AT_PHASE, RedoPhase::Prepared as u64);
    put_u64(bytes, 16, txid);
    put_u32(bytes, 24, entries.len() as u32);
    bytes[32..REDO_HEADER_BYTES].fill(0);
    bytes[32] = tag.role as u8;
    put_u32(bytes, 36, tag.tx.0);
    put_u64(bytes, 40, tag.tx.1);
    put_u32(bytes, 48, tag.leader);
    put_u64(bytes, 56, tag.participants);
    for (index, entry) in entries.iter().enumerate() {
        let at = REDO_HEADER_BYTES + index * REDO_ENTRY_BYTES;
        entry.encode_into(&mut bytes[at..at + REDO_ENTRY_BYTES]);
    }
    let sum = redo_crc(bytes, entries.len());
    put_u32(bytes, 28, sum);
}

fn redo_crc(bytes: &[u8], entries: usize) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&bytes[0..8]);
    hasher.update(&bytes[16..28]);
    hasher.update(&bytes[32..REDO_AT_WAITING]);
    hasher.update(&bytes[REDO_HEADER_BYTES..redo_record_bytes(entries)]);
    hasher.finalize()
}

/// A redo record found at recovery.
#[derive(Debug)]
pub struct RedoRecord {
    pub blocks: u32,
    pub phase: RedoPhase,
    pub txid: u64,
    pub tag: TxTag,
    pub entries: Vec<RedoEntry>,
}

/// Decode the record starting at the front of `bytes` (which runs to the end of the redo
/// area). `Ok(None)`: no live record starts here.
pub fn decode_redo(bytes: &[u8], geometry: &Geometry) -> Result<Option<RedoRecord>, PmError> {
    if bytes.len() < REDO_HEADER_BYTES || le_u32(bytes, 0) != REDO_MAGIC {
        return Ok(None);
    }
    let phase = match le_u64(bytes, REDO_AT_PHASE) {
        0 => return Ok(None),
        1 => RedoPhase::Prepared,
        2 => RedoPhase::Decided,
        3 => RedoPhase::Outcome,
        other => {
            return Err(PmError::Corrupt {
                what: format!("redo record phase word {other}"),
            })
        }
    };
    let blocks = le_u32(bytes, 4);
    let entries = le_u32(bytes, 24) as usize;
    let needed = redo_record_bytes(entries);
    if blocks == 0 || needed > bytes.len() || needed.div_ceil(REDO_BLOCK_BYTES) != blocks as usize {
        if phase == RedoPhase::Prepared {
            // A prepared record is discarded anyway; a torn header is only noise.
            return Ok(Some(RedoRecord {
                blocks: 1,
                phase,
                txid: 0,
                tag: TxTag::default(),
                entries: Vec::new(),
            }));
        }
        return Err(PmError::Corrupt {
            what: format!("decided redo record with {entries} entries in {blocks} blocks"),
        });
    }
    if redo_crc(bytes, entries) != le_u32(bytes, 28) {
        if phase == RedoPhase::Prepared {
            return Ok(Some(RedoRecord {
                blocks,
                phase,
                txid: 0,
                tag: TxTag::default(),
                entries: Vec::new(),
            }));
        }
        return Err(PmError::Corrupt {
            what: "decided redo record checksum mismatch".into(),
        });
    }
    let role = match bytes[32] {
        0 => TxRole::Local,
        1 => TxRole::Follower,
        2 => TxRole::Leader,
        other => {
            return Err(PmError::Corrupt {
                what: format!("redo record role {other}"),
            })
        }
    };
    let tag = TxTag {
        role,
        tx: (le_u32(bytes, 36), le_u64(bytes, 40)),
        leader: le_u32(bytes, 48),
        participants: le_u64(bytes, 56),
    };
    let txid = le_u64(bytes, 16);
    let decoded = (0..entries)
        .map(|index| {
            let at = REDO_HEADER_BYTES + index * REDO_ENTRY_BYTES;
            RedoEntry::decode(&bytes[at..at + REDO_ENTRY_BYTES], txid, geometry)
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Some(RedoRecord {
        blocks,
        phase,
        txid,
        tag,
        entries: decoded,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn geometry_areas_do_not_overlap() {
        for size in [1u64 << 20, 3 << 20, 64 << 20, 1 << 30] {
            let g = Geometry::for_pool_bytes(size).unwrap();
            assert!(g.slots_offset >= SUPERBLOCK_BYTES as u64);
            assert!(g.redo_offset >= g.slots_offset + g.slot_count as u64 * SLOT_BYTES as u64);
            assert!(g.frames_offset >= g.redo_offset + g.redo_blocks as u64 * 4096);
            assert!(g.frame_count > 0);
            assert!(
                g.redo_blocks as usize * REDO_BLOCK_BYTES
                    >= redo_record_bytes(g.frame_count as usize)
            );
        }
    }

    #[test]
    fn superblock_round_trips_and_rejects_damage() {
        let sb = Superblock {
            pool_bytes: 1 << 20,
            node_id: 3,
            cluster_id: 77,
            created_unix_s: 1,
        };
        let mut bytes = sb.encode();
        assert_eq!(Superblock::decode(&bytes, 1 << 20).unwrap(), sb);
        bytes[25] ^= 1;
        assert!(matches!(
            Superblock::decode(&bytes, 1 << 20),
            Err(PmError::Corrupt { .. })
        ));
        assert!(matches!(
            Superblock::decode(&[7u8; 64], 1 << 20),
            Err(PmError::Foreign)
        ));
    }

    proptest! {
        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 8192)) {
            let g = Geometry::for_pool_bytes(1 << 20).unwrap();
            let _ = Superblock::decode(&bytes, 1 << 20);
            let _ = SlotRecord::decode(&bytes[..SLOT_BYTES], g.frame_count);
            let _ = decode_redo(&bytes, &g);
        }

        #[test]
        fn slot_round_trips(dataset in 1u64.., page: u64, version: u64, frame in 0u32..100, crc32: u32) {
            let record = SlotRecord { dataset, page, version, frame, state: CopyState::Redundant, data_crc: crc32, txid: 9 };
            prop_assert_eq!(SlotRecord::decode(&record.encode(), 100).unwrap(), Some(record));
        }
    }
}
