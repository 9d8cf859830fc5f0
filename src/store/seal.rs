//! Sealing: XChaCha20-Poly1305 under one key, a fresh random nonce before each sealed value. The
//! store seals its secret-bearing rows with its key file; the device side seals the record of an
//! import with a key from its session.

use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};

/// The nonce's length, before each sealed value.
pub const NONCE: usize = 24;

#[derive(Clone)]
pub struct Sealer(XChaCha20Poly1305);

impl Sealer {
    pub fn new(key: &[u8; 32]) -> Sealer {
        Sealer(XChaCha20Poly1305::new(key.into()))
    }

    /// `plain`, sealed and bound to `aad` (which opening must give again).
    pub fn seal(&self, aad: &[u8], plain: &[u8]) -> Vec<u8> {
        let nonce = XChaCha20Poly1305::generate_nonce(&mut OsRng);
        let mut out = nonce.to_vec();
        out.extend(self.0.encrypt(&nonce, Payload { msg: plain, aad }).expect("encryption in memory"));
        out
    }

    /// What [`Sealer::seal`] sealed; `None` for anything else (cut short, changed, another key
    /// or `aad`).
    pub fn open(&self, aad: &[u8], sealed: &[u8]) -> Option<Vec<u8>> {
        if sealed.len() < NONCE {
            return None;
        }
        let (nonce, ct) = sealed.split_at(NONCE);
        self.0.decrypt(XNonce::from_slice(nonce), Payload { msg: ct, aad }).ok()
    }
}
