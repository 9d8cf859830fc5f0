//! Matrix encrypted attachments (client-server spec, "Sending encrypted attachments", version 2):
//! AES-256-CTR under a fresh random key, with the SHA-256 of the ciphertext to check it against.
//!
//! The media repository hands a file to anyone who has its media ID, so everything handoff uploads
//! is encrypted this way; the key travels only in the event that shows the file.

use std::fmt;

use aes::Aes256;
use ctr::Ctr128BE;
use ctr::cipher::{KeyIvInit, StreamCipher};
use ruma::OwnedMxcUri;
use ruma::events::room::{
    EncryptedFile, EncryptedFileHashAlgorithm, EncryptedFileHashes, EncryptedFileInfo, V2EncryptedFileInfo,
};
use sha2::{Digest, Sha256};
use zeroize::Zeroize;

/// The counter is the whole 128-bit block, big-endian. With the low 64 bits of the IV zero (as v2
/// requires of senders) it never carries into the random half, so this agrees with WebCrypto's
/// 64-bit counter that Element uses.
type Aes256Ctr = Ctr128BE<Aes256>;

/// What opens one encrypted attachment: the key, the IV and the ciphertext's hash. It becomes the
/// event's `file` object with [`AttachmentKey::into_file`] once the ciphertext has a URL.
pub struct AttachmentKey {
    key: [u8; 32],
    iv: [u8; 16],
    sha256: [u8; 32],
}

impl AttachmentKey {
    /// The `file` object of an `m.file` (or `m.image`, …) event whose ciphertext is at `url`.
    pub fn into_file(self, url: OwnedMxcUri) -> EncryptedFile {
        EncryptedFile::new(
            url,
            V2EncryptedFileInfo::encode(self.key, self.iv).into(),
            EncryptedFileHashes::with_sha256(self.sha256),
        )
    }
}

impl fmt::Debug for AttachmentKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AttachmentKey").field("key", &"<redacted>").finish_non_exhaustive()
    }
}

impl Drop for AttachmentKey {
    fn drop(&mut self) {
        self.key.zeroize();
    }
}

/// Why an encrypted attachment could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum AttachmentError {
    #[error("the file is encrypted with attachment version {0:?}, and handoff reads only \"v2\"")]
    UnsupportedVersion(String),
    #[error("the file has no SHA-256 hash to check it against")]
    NoSha256,
    #[error("the file does not match its SHA-256 hash: it was changed or damaged")]
    HashMismatch,
}

/// Encrypts `plain` under a fresh key; returns the ciphertext (to upload) and its key.
pub fn encrypt(plain: &[u8]) -> (Vec<u8>, AttachmentKey) {
    let key: [u8; 32] = rand::random();
    let mut iv = [0u8; 16];
    // The low 64 bits (the counter) stay zero, so no client's counter can overflow into the nonce.
    iv[..8].copy_from_slice(&rand::random::<[u8; 8]>());
    let mut cipher = plain.to_vec();
    Aes256Ctr::new(&key.into(), &iv.into()).apply_keystream(&mut cipher);
    let sha256 = Sha256::digest(&cipher).into();
    (cipher, AttachmentKey { key, iv, sha256 })
}

/// Checks `cipher` against the SHA-256 in `file`, then decrypts it.
pub fn decrypt(cipher: &[u8], file: &EncryptedFile) -> Result<Vec<u8>, AttachmentError> {
    // ruma already refuses a v2 key that is not an `oct` A256CTR JWK with encrypt and decrypt.
    let EncryptedFileInfo::V2(info) = &file.info else {
        return Err(AttachmentError::UnsupportedVersion(file.info.version().to_owned()));
    };
    let expected = file.hashes.get(&EncryptedFileHashAlgorithm::Sha256).ok_or(AttachmentError::NoSha256)?;
    // The hash is public (it is in the event): no need for a constant-time comparison.
    if Sha256::digest(cipher).as_slice() != expected.as_bytes() {
        return Err(AttachmentError::HashMismatch);
    }
    let mut plain = cipher.to_vec();
    Aes256Ctr::new(info.k.as_inner().into(), info.iv.as_inner().into()).apply_keystream(&mut plain);
    Ok(plain)
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;
    use base64::engine::general_purpose::{STANDARD_NO_PAD, URL_SAFE_NO_PAD};
    use serde_json::{Value, json};

    fn url() -> OwnedMxcUri {
        "mxc://example.org/abcdef".into()
    }

    /// The `file` object as it arrives in an event.
    fn parse(file: Value) -> EncryptedFile {
        serde_json::from_value(file).expect("a valid `file` object")
    }

    #[test]
    fn round_trip() {
        for plain in [&b""[..], b"x", b"Hello, World", &[0xa5; 100_000]] {
            let (cipher, key) = encrypt(plain);
            assert_eq!(cipher.len(), plain.len());
            if plain.len() > 16 {
                assert_ne!(&cipher[..], plain);
            }
            let file = key.into_file(url());
            // Through JSON, as the receiver sees it.
            let file = parse(serde_json::to_value(&file).unwrap());
            assert_eq!(decrypt(&cipher, &file).unwrap(), plain);
        }
    }

    #[test]
    fn every_file_has_its_own_key_and_iv_with_a_zero_counter() {
        let (c1, k1) = encrypt(b"same bytes");
        let (c2, k2) = encrypt(b"same bytes");
        assert_ne!(c1, c2);
        assert_ne!(k1.key, k2.key);
        assert_ne!(k1.iv, k2.iv);
        assert_eq!(k1.iv[8..], [0; 8]);
    }

    #[test]
    fn tampered_ciphertext_or_wrong_hash_is_refused() {
        let (mut cipher, key) = encrypt(b"the history of a room");
        let file = key.into_file(url());
        cipher[3] ^= 1;
        assert!(matches!(decrypt(&cipher, &file), Err(AttachmentError::HashMismatch)));
        cipher[3] ^= 1;
        assert!(matches!(decrypt(&cipher[..10], &file), Err(AttachmentError::HashMismatch)));

        let mut json = serde_json::to_value(&file).unwrap();
        json["hashes"]["sha256"] = json!(STANDARD_NO_PAD.encode(Sha256::digest(b"something else")));
        let err = decrypt(&cipher, &parse(json.clone())).unwrap_err();
        assert_eq!(err.to_string(), "the file does not match its SHA-256 hash: it was changed or damaged");

        json["hashes"] = json!({"sha512": json["hashes"]["sha256"]});
        assert!(matches!(decrypt(&cipher, &parse(json)), Err(AttachmentError::NoSha256)));
    }

    #[test]
    fn unknown_versions_and_algorithms_are_refused() {
        let (cipher, key) = encrypt(b"keys");
        let mut json = serde_json::to_value(key.into_file(url())).unwrap();
        json["v"] = json!("v1");
        let err = decrypt(&cipher, &parse(json.clone())).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the file is encrypted with attachment version \"v1\", and handoff reads only \"v2\""
        );
        // Another algorithm under v2 does not even parse: such an event is never taken for a file.
        json["v"] = json!("v2");
        json["key"]["alg"] = json!("A128CTR");
        assert!(serde_json::from_value::<EncryptedFile>(json).is_err());
    }

    /// The `file` object is the spec's: an `oct` A256CTR JWK with unpadded url-safe `k`, unpadded
    /// standard base64 `iv` and hash, and `"v": "v2"`; nothing else.
    #[test]
    fn the_file_object_is_the_spec_one() {
        let (cipher, key) = encrypt(b"bundle");
        let (k, iv) = (key.key, key.iv);
        let json = serde_json::to_value(key.into_file(url())).unwrap();
        let expected = json!({
            "url": "mxc://example.org/abcdef",
            "key": {
                "kty": "oct",
                "key_ops": json["key"]["key_ops"].clone(),
                "alg": "A256CTR",
                "k": URL_SAFE_NO_PAD.encode(k),
                "ext": true,
            },
            "iv": STANDARD_NO_PAD.encode(iv),
            "hashes": {"sha256": STANDARD_NO_PAD.encode(Sha256::digest(&cipher))},
            "v": "v2",
        });
        assert_eq!(json, expected);
        let mut ops: Vec<&str> =
            json["key"]["key_ops"].as_array().unwrap().iter().map(|o| o.as_str().unwrap()).collect();
        ops.sort();
        assert_eq!(ops, ["decrypt", "encrypt"]);
        assert_eq!(json["key"]["k"].as_str().unwrap().len(), 43, "32 bytes, unpadded");
        assert_eq!(json["iv"].as_str().unwrap().len(), 22, "16 bytes, unpadded");
    }

    /// Vectors from matrix-org/browser-encrypt-attachment (what Element's decryptor is tested with),
    /// given a "v2" tag: one block, so the counter width does not matter.
    #[test]
    fn decrypts_the_element_test_vectors() {
        let vectors = [
            (
                "",
                "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
                "AAAAAAAAAAAAAAAAAAAAAA",
                "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU",
                "",
            ),
            (
                "nZxRAVw962fwUQ5/",
                "__________________________________________8",
                "/////////////////////w",
                "geLWS2ptBew5aPLJRTK+QnI3Krdl3UaxN8qfahHWhfc",
                "SGVsbG8sIFdvcmxk",
            ),
        ];
        for (cipher, k, iv, sha256, plain) in vectors {
            let file = parse(json!({
                "url": "mxc://example.org/abcdef",
                "key": {"alg": "A256CTR", "k": k, "key_ops": ["encrypt", "decrypt"], "kty": "oct", "ext": true},
                "iv": iv,
                "hashes": {"sha256": sha256},
                "v": "v2",
            }));
            let cipher = STANDARD_NO_PAD.decode(cipher).unwrap();
            assert_eq!(decrypt(&cipher, &file).unwrap(), STANDARD_NO_PAD.decode(plain).unwrap());
        }
    }

    #[test]
    fn the_key_is_never_in_debug_output() {
        let (_, key) = encrypt(b"secret");
        let k = URL_SAFE_NO_PAD.encode(key.key);
        let shown = format!("{key:?}");
        assert!(!shown.contains(&k) && !shown.contains(&format!("{:?}", key.key)), "{shown}");
        let file = key.into_file(url());
        let shown = format!("{file:?}");
        assert!(!shown.contains(&k), "{shown}");
    }
}
