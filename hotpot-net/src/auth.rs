//! Cluster secret: every connection proves it before a single frame is decoded.
//! Server: nonce_s →; client: HMAC(secret, "hotpot-v1" ‖ nonce_s) ‖ nonce_c →;
//! server: HMAC(secret, "hotpot-v1-server" ‖ nonce_c) →. Either side closes on a mismatch.

use std::io::{Read, Write};
use std::path::Path;

use hmac::{Hmac, Mac};
use sha2::Sha256;

const NONCE_BYTES: usize = 32;
const MAC_BYTES: usize = 32;
const CLIENT_LABEL: &[u8] = b"hotpot-v1";
const SERVER_LABEL: &[u8] = b"hotpot-v1-server";

/// The shared cluster secret. `Secret::none()` is an empty key: it still runs the handshake,
/// so a peer with a real secret refuses it cleanly, but it proves nothing.
#[derive(Clone)]
pub struct Secret(Vec<u8>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("Secret(..)")
    }
}

impl Secret {
    pub fn none() -> Secret {
        Secret(Vec::new())
    }

    pub fn from_bytes(bytes: &[u8]) -> Secret {
        Secret(bytes.to_vec())
    }

    /// Read a secret file: its bytes, trailing whitespace removed; at least 16 bytes.
    pub fn load(path: &Path) -> Result<Secret, String> {
        let bytes = std::fs::read(path)
            .map_err(|error| format!("cannot read secret file {}: {error}", path.display()))?;
        let trimmed = bytes.trim_ascii_end();
        if trimmed.len() < 16 {
            return Err(format!(
                "secret file {} holds {} bytes; at least 16 are needed",
                path.display(),
                trimmed.len()
            ));
        }
        Ok(Secret(trimmed.to_vec()))
    }

    /// A new random secret as 64 hex characters.
    pub fn generate_hex() -> String {
        let bytes: [u8; 32] = rand::random();
        bytes.iter().map(|byte| format!("{byte:02x}")).collect()
    }

    fn mac(&self, label: &[u8], nonce: &[u8]) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(label);
        mac.update(nonce);
        mac
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("peer does not know the cluster secret")]
    WrongSecret,
    #[error("handshake failed: {0}")]
    Io(#[from] std::io::Error),
}

/// Server side; the stream should have a read timeout so a silent peer cannot hold a thread.
pub fn server_handshake(
    stream: &mut (impl Read + Write),
    secret: &Secret,
) -> Result<(), AuthError> {
    let nonce: [u8; NONCE_BYTES] = rand::random();
    stream.write_all(&nonce)?;
    stream.flush()?;
    let mut answer = [0u8; MAC_BYTES + NONCE_BYTES];
    stream.read_exact(&mut answer)?;
    secret
        .mac(CLIENT_LABEL, &nonce)
        .verify_slice(&answer[..MAC_BYTES])
        .map_err(|_| AuthError::WrongSecret)?;
    let proof = secret
        .mac(SERVER_LABEL, &answer[MAC_BYTES..])
        .finalize()
        .into_bytes();
    stream.write_all(&proof)?;
    stream.flush()?;
    Ok(())
}

pub fn client_handshake(
    stream: &mut (impl Read + Write),
    secret: &Secret,
) -> Result<(), AuthError> {
    let mut nonce = [0u8; NONCE_BYTES];
    stream.read_exact(&mut nonce)?;
    let ours: [u8; NONCE_BYTES] = rand::random();
    let mut answer = Vec::with_capacity(MAC_BYTES + NONCE_BYTES);
    answer.extend_from_slice(&secret.mac(CLIENT_LABEL, &nonce).finalize().into_bytes());
    answer.extend_from_slice(&ours);
    stream.write_all(&answer)?;
    stream.flush()?;
    let mut proof = [0u8; MAC_BYTES];
    match stream.read_exact(&mut proof) {
        Ok(()) => {}
        // The server closes the connection when our proof is wrong.
        Err(error) if error.kind() == std::io::ErrorKind::UnexpectedEof => {
            return Err(AuthError::WrongSecret)
        }
        Err(error) if error.kind() == std::io::ErrorKind::ConnectionReset => {
            return Err(AuthError::WrongSecret)
        }
        Err(error) => return Err(error.into()),
    }
    secret
        .mac(SERVER_LABEL, &ours)
        .verify_slice(&proof)
        .map_err(|_| AuthError::WrongSecret)
}
