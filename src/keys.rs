//! The Element E2E room-key export format (`-----BEGIN MEGOLM SESSION DATA-----`).
//!
//! handoff never decrypts a key export: the server only checks that a file is one (armour, base64,
//! version byte, length) and carries it, opaque, to the new account.
//!
//! Layout of the base64 body: version (1 byte, = 1) | salt (16) | IV (16) | PBKDF2 rounds (4, BE) |
//! ciphertext (≥ 0) | HMAC-SHA256 (32). So a valid body is at least 69 bytes.

use base64::Engine;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::{DecodePaddingMode, general_purpose};
use serde::{Deserialize, Serialize};

pub const HEADER: &str = "-----BEGIN MEGOLM SESSION DATA-----";
pub const TRAILER: &str = "-----END MEGOLM SESSION DATA-----";
const MIN_LEN: usize = 1 + 16 + 16 + 4 + 32;

/// Why a file is not an Element key export.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyExportError {
    #[error("this is not an Element key export: the `{HEADER}` header line was not found")]
    NoHeader,
    #[error("the key export is cut short: the `{TRAILER}` trailer line was not found")]
    NoTrailer,
    #[error("the key export is damaged: its body is not valid base64 ({0})")]
    BadBase64(String),
    #[error("the key export is too short ({0} bytes; a valid one has at least {MIN_LEN})")]
    TooShort(usize),
    #[error("unsupported key export version {0} (only version 1 exists)")]
    Version(u8),
    #[error("the key export says it used 0 PBKDF2 rounds, which no client writes")]
    NoRounds,
}

/// A validated, still-encrypted key export, as attached to a bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyExport {
    /// The armoured text, exactly as the user's client wrote it.
    pub armored: String,
    /// PBKDF2 rounds the client used (shown to the user; not secret).
    pub rounds: u32,
    /// Size of the encrypted payload in bytes.
    pub encrypted_len: usize,
    /// Encrypted with the bundle's own passphrase (made by `handoff export --recovery-key`), not
    /// with one of its own.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub bundle_passphrase: bool,
}

/// Accepts padded and unpadded base64 alike (Element pads, matrix-rust-sdk doesn't).
const LENIENT: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_decode_padding_mode(DecodePaddingMode::Indifferent)
        .with_decode_allow_trailing_bits(true),
);

/// Checks that `text` is an Element key export without decrypting it.
pub fn validate(text: &str) -> Result<KeyExport, KeyExportError> {
    let mut lines = lines_with_offsets(text);
    // Byte offsets of the header and trailer lines the scan matched, so the armour kept is exactly
    // what was validated: a search of `text` can find either marker elsewhere (even the trailer
    // before the header, which made slicing panic).
    let Some((start, _)) = lines.by_ref().find(|(_, l)| *l == HEADER) else {
        return Err(KeyExportError::NoHeader);
    };
    let mut body = String::new();
    let mut end = None;
    for (offset, line) in lines {
        if line == TRAILER {
            end = Some(offset + TRAILER.len());
            break;
        }
        body.push_str(line);
    }
    let Some(end) = end else {
        return Err(KeyExportError::NoTrailer);
    };
    let body: String = body.chars().filter(|c| !c.is_whitespace()).collect();
    let bytes = LENIENT.decode(&body).map_err(|e| KeyExportError::BadBase64(e.to_string()))?;
    if bytes.len() < MIN_LEN {
        return Err(KeyExportError::TooShort(bytes.len()));
    }
    if bytes[0] != 1 {
        return Err(KeyExportError::Version(bytes[0]));
    }
    let rounds = u32::from_be_bytes(bytes[33..37].try_into().expect("4 bytes"));
    if rounds == 0 {
        return Err(KeyExportError::NoRounds);
    }
    Ok(KeyExport {
        armored: format!("{}\n", &text[start..end]),
        rounds,
        encrypted_len: bytes.len() - MIN_LEN,
        bundle_passphrase: false,
    })
}

/// The trimmed lines of `text` (split as `str::lines` splits), each with the byte offset in `text`
/// where its trimmed content starts.
fn lines_with_offsets(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.split_inclusive('\n').scan(0, |offset, raw| {
        let line_start = *offset;
        *offset += raw.len();
        // The line ending is whitespace too, so trimming also drops it.
        let leading = raw.len() - raw.trim_start().len();
        Some((line_start + leading, raw.trim()))
    })
}

/// Standard base64, for tests and tools that build exports.
pub fn encode_body(bytes: &[u8]) -> String {
    general_purpose::STANDARD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Element's test vectors (matrix-react-sdk MegolmExportEncryption-test.js).
    const VECTOR_1: &str = "-----BEGIN MEGOLM SESSION DATA-----\nAXNhbHRzYWx0c2FsdHNhbHSIiIiIiIiIiIiIiIiIiIiIAAAACmIRUW2OjZ3L2l6j9h0lHlV3M2dx\ncissyYBxjsfsAndErh065A8=\n-----END MEGOLM SESSION DATA-----";
    const VECTOR_2: &str = "-----BEGIN MEGOLM SESSION DATA-----\nAW1vcmVzYWx0bW9yZXNhbHT//////////wAAAAAAAAAAAAAD6KyBpe1Niv5M5NPm4ZATsJo5nghk\nKYu63a0YQ5DRhUWEKk7CcMkrKnAUiZny\n-----END MEGOLM SESSION DATA-----";
    const VECTOR_4: &str = "-----BEGIN MEGOLM SESSION DATA-----\nAf//////////////////////////////////////////AAAD6IAZJy7IQ7Y0idqSw/bmpngEEVVh\ngsH+8ptgqxw6ZVWQnohr8JsuwH9SwGtiebZuBu5smPCO+RFVWH2cQYslZijXv/BEH/txvhUrrtCd\nbWnSXS9oymiqwUIGs08sXI33ZA==\n-----END MEGOLM SESSION DATA-----";

    #[test]
    fn element_vectors_are_accepted() {
        assert_eq!(validate(VECTOR_1).unwrap().rounds, 10);
        assert_eq!(validate(VECTOR_2).unwrap().rounds, 1000);
        let v4 = validate(VECTOR_4).unwrap();
        assert_eq!(v4.rounds, 1000);
        assert_eq!(v4.armored, format!("{VECTOR_4}\n"));
    }

    #[test]
    fn crlf_surrounding_text_and_unpadded_base64_are_accepted() {
        let crlf = format!("my keys\r\n{}\r\nbye", VECTOR_2.replace('\n', "\r\n"));
        assert!(validate(&crlf).is_ok());
        let unpadded = VECTOR_1.replace("A8=", "A8");
        assert!(validate(&unpadded).is_ok());
    }

    #[test]
    fn trailer_before_header_is_not_a_crash() {
        // The file: slicing from the header to the first trailer in the text panicked.
        let text = format!("{TRAILER}\n{VECTOR_1}\n");
        assert_eq!(validate(&text).unwrap().armored, format!("{VECTOR_1}\n"));
        // The same with nothing valid after the header: an error, not a panic.
        assert_eq!(validate(&format!("{TRAILER}\n{HEADER}\n")), Err(KeyExportError::NoTrailer));
    }

    #[test]
    fn armour_is_the_lines_that_were_validated() {
        // Markers quoted inside other lines are not the armour; the kept text starts and ends at the
        // lines the scan matched.
        let quoted = format!("Paste between {HEADER} and {TRAILER}:\n{VECTOR_4}\nthanks");
        assert_eq!(validate(&quoted).unwrap().armored, format!("{VECTOR_4}\n"));
        // Indented markers (multi-byte whitespace too) are matched trimmed and kept without the indent.
        let indented =
            VECTOR_2.replace(HEADER, &format!("\u{2003} {HEADER} ")).replace(TRAILER, &format!("\t{TRAILER}  "));
        let armored = validate(&indented).unwrap().armored;
        assert!(armored.starts_with(HEADER) && armored.ends_with(&format!("{TRAILER}\n")), "{armored:?}");
    }

    #[test]
    fn element_negative_cases_get_their_own_errors() {
        assert_eq!(validate("-----"), Err(KeyExportError::NoHeader));
        assert_eq!(validate(&format!("{HEADER}\n-----")), Err(KeyExportError::NoTrailer));
        let cut = VECTOR_1.replace("cissyYBxjsfsAndErh065A8=", "cissyYBxjsfsAn");
        assert!(matches!(validate(&cut), Err(KeyExportError::TooShort(_))), "{:?}", validate(&cut));
        let bad = VECTOR_1.replace("AXNh", "AX!h");
        assert!(matches!(validate(&bad), Err(KeyExportError::BadBase64(_))));
        let v2 = VECTOR_1.replacen("AXNh", "AnNh", 1);
        assert_eq!(validate(&v2), Err(KeyExportError::Version(2)));
    }
}
