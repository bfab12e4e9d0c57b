//! Frame encoding: `[u32 LE length][u64 LE request id][postcard body]`, length covering id
//! and body. Reading refuses a frame over the bound before allocating for it.

use std::io::{Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::{NetError, MAX_FRAME_BYTES};

pub const HEADER_BYTES: usize = 12;
/// The id of a connection's first frame when it asks to move to verbs (never a call's id:
/// clients count up from 1).
pub const UPGRADE_ID: u64 = u64::MAX;

static BYTES_SENT: AtomicU64 = AtomicU64::new(0);
static BYTES_RECEIVED: AtomicU64 = AtomicU64::new(0);

/// Frame bytes this process has sent and received over every connection, any transport
/// (received includes what it read one-sided from peers' memory).
pub fn wire_bytes() -> (u64, u64) {
    (
        BYTES_SENT.load(Ordering::Relaxed),
        BYTES_RECEIVED.load(Ordering::Relaxed),
    )
}

pub(crate) fn count_sent(bytes: usize) {
    BYTES_SENT.fetch_add(bytes as u64, Ordering::Relaxed);
}

pub(crate) fn count_received(bytes: usize) {
    BYTES_RECEIVED.fetch_add(bytes as u64, Ordering::Relaxed);
}

/// Cuts a byte stream that arrives in pieces (verbs messages) into frames.
#[cfg(any(feature = "verbs", test))]
#[derive(Default)]
pub(crate) struct Reassembler {
    buffer: Vec<u8>,
}

#[cfg(any(feature = "verbs", test))]
impl Reassembler {
    /// Take the next piece; returns the frames it completed, or an error for a frame over
    /// the bound or below the header size (the connection must close).
    pub(crate) fn push(&mut self, piece: &[u8]) -> Result<Vec<(u64, Vec<u8>)>, FrameError> {
        self.buffer.extend_from_slice(piece);
        let mut frames = Vec::new();
        let mut start = 0;
        while self.buffer.len() - start >= 4 {
            let length =
                u32::from_le_bytes(self.buffer[start..start + 4].try_into().expect("4 bytes"))
                    as usize;
            if length + 4 > MAX_FRAME_BYTES {
                return Err(FrameError::TooLarge(length + 4));
            }
            if length < 8 {
                return Err(FrameError::Malformed(format!(
                    "frame length {length} below header size"
                )));
            }
            if self.buffer.len() - start < 4 + length {
                break;
            }
            let id = u64::from_le_bytes(
                self.buffer[start + 4..start + 12]
                    .try_into()
                    .expect("8 bytes"),
            );
            frames.push((id, self.buffer[start + 12..start + 4 + length].to_vec()));
            count_received(4 + length);
            start += 4 + length;
        }
        self.buffer.drain(..start);
        Ok(frames)
    }
}

pub fn encode<T: serde::Serialize>(id: u64, message: &T) -> Result<Vec<u8>, NetError> {
    let buffer = vec![0u8; HEADER_BYTES];
    let buffer =
        postcard::to_extend(message, buffer).map_err(|e| NetError::Encode(e.to_string()))?;
    let mut buffer = buffer;
    let body = buffer.len() - 4;
    if buffer.len() > MAX_FRAME_BYTES {
        return Err(NetError::FrameTooLarge {
            bytes: buffer.len(),
        });
    }
    buffer[0..4].copy_from_slice(&(body as u32).to_le_bytes());
    buffer[4..12].copy_from_slice(&id.to_le_bytes());
    Ok(buffer)
}

pub fn write_frame(stream: &mut impl Write, frame: &[u8]) -> std::io::Result<()> {
    stream.write_all(frame)
}

/// Read one frame: `Ok(None)` on a clean end of stream.
pub fn read_frame(stream: &mut impl Read) -> Result<Option<(u64, Vec<u8>)>, FrameError> {
    let mut header = [0u8; HEADER_BYTES];
    match stream.read_exact(&mut header[..4]) {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(error) => return Err(FrameError::Io(error)),
    }
    let length = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes")) as usize;
    if length + 4 > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge(length + 4));
    }
    if length < 8 {
        return Err(FrameError::Malformed(format!(
            "frame length {length} below header size"
        )));
    }
    stream
        .read_exact(&mut header[4..])
        .map_err(FrameError::Io)?;
    let id = u64::from_le_bytes(header[4..12].try_into().expect("8 bytes"));
    let mut body = vec![0u8; length - 8];
    stream.read_exact(&mut body).map_err(FrameError::Io)?;
    Ok(Some((id, body)))
}

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("{0}")]
    Io(std::io::Error),
    #[error("frame of {0} bytes exceeds the bound of {MAX_FRAME_BYTES} bytes")]
    TooLarge(usize),
    #[error("malformed frame: {0}")]
    Malformed(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_oversize_is_refused_before_allocation() {
        let frame = encode(42, &("hello".to_string(), 7u32)).unwrap();
        let (id, body) = read_frame(&mut &frame[..]).unwrap().unwrap();
        assert_eq!(id, 42);
        let decoded: (String, u32) = postcard::from_bytes(&body).unwrap();
        assert_eq!(decoded, ("hello".to_string(), 7));
        let mut huge = (u32::MAX - 10).to_le_bytes().to_vec();
        huge.extend_from_slice(&[0u8; 8]);
        assert!(matches!(
            read_frame(&mut &huge[..]),
            Err(FrameError::TooLarge(_))
        ));
        assert!(read_frame(&mut &[][..]).unwrap().is_none());
    }

    #[test]
    fn the_reassembler_cuts_frames_out_of_any_split() {
        let mut stream = Vec::new();
        let mut sent = Vec::new();
        for id in 1..40u64 {
            let body = vec![id as u8; (id as usize * 997) % 9000];
            stream.extend_from_slice(&encode(id, &body).unwrap());
            sent.push((id, body));
        }
        for piece in [1, 7, 4096, 4608, stream.len()] {
            let mut reassembler = Reassembler::default();
            let mut got = Vec::new();
            for chunk in stream.chunks(piece) {
                got.extend(reassembler.push(chunk).unwrap());
            }
            let decoded: Vec<(u64, Vec<u8>)> = got
                .into_iter()
                .map(|(id, body)| (id, postcard::from_bytes(&body).unwrap()))
                .collect();
            assert_eq!(decoded, sent, "pieces of {piece} bytes");
        }
        let mut bad = Reassembler::default();
        assert!(matches!(
            bad.push(&(MAX_FRAME_BYTES as u32).to_le_bytes()),
            Err(FrameError::TooLarge(_))
        ));
        let mut short = Reassembler::default();
        assert!(matches!(
            short.push(&3u32.to_le_bytes()),
            Err(FrameError::Malformed(_))
        ));
    }
}
