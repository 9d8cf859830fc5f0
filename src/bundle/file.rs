//! Bundle files: the bundle JSON encrypted with a passphrase in the age format, so a file can be
//! carried on any storage and opened anywhere (also with the `age` tool: `age -d FILE`).

use std::io::{Read, Write};

use age::secrecy::SecretString;

use super::{Bundle, BundleFormatError};

/// scrypt work factor (log2 N) for files sealed with a transfer code. A code carries 140 bits
/// from a CSPRNG, so the KDF needn't make up for a weak passphrase; 2^15 keeps sealing fast.
const CODE_WORK_FACTOR: u8 = 15;
/// The most work a file may ask for when opened: age's own default ceiling for user passphrases.
const MAX_WORK_FACTOR: u8 = 22;

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("wrong code or passphrase for this bundle file")]
    WrongPassphrase,
    #[error("this is not a handoff bundle file (not an age-encrypted file)")]
    NotAgeFile,
    #[error("the bundle file is damaged or cut short: {0}")]
    Damaged(String),
    #[error("this file is encrypted to a key, not a passphrase: handoff bundle files use a passphrase")]
    NotPassphrase,
    #[error("{0}")]
    Format(#[from] BundleFormatError),
}

/// Encrypts a bundle with `passphrase` (for bundles made by the bot: the transfer code as shown).
pub fn seal(bundle: &Bundle, passphrase: &str) -> Vec<u8> {
    seal_at(bundle, passphrase, Some(CODE_WORK_FACTOR))
}

/// Encrypts a bundle with a passphrase a person chose: with age's own work factor for those
/// (about a second), which a weak passphrase needs.
pub fn seal_with_passphrase(bundle: &Bundle, passphrase: &str) -> Vec<u8> {
    seal_at(bundle, passphrase, None)
}

fn seal_at(bundle: &Bundle, passphrase: &str, work_factor: Option<u8>) -> Vec<u8> {
    let mut recipient = age::scrypt::Recipient::new(SecretString::from(passphrase.to_owned()));
    if let Some(w) = work_factor {
        recipient.set_work_factor(w);
    }
    let encryptor = age::Encryptor::with_recipients(std::iter::once(&recipient as &dyn age::Recipient))
        .expect("one passphrase recipient is always valid");
    let mut out = Vec::new();
    let mut writer = encryptor.wrap_output(&mut out).expect("writing to memory");
    writer.write_all(&bundle.to_json()).expect("writing to memory");
    writer.finish().expect("writing to memory");
    out
}

/// Opens a bundle file with what a person typed: a transfer code in any case and spacing, or
/// else a passphrase as it is.
pub fn open_typed(bytes: &[u8], typed: &str) -> Result<Bundle, FileError> {
    match crate::code::TransferCode::parse(typed) {
        Ok(code) => open(bytes, &code.display()).or_else(|_| open(bytes, typed)),
        Err(_) => open(bytes, typed),
    }
}

/// Decrypts and reads a bundle file. Each way it can fail has its own error.
pub fn open(bytes: &[u8], passphrase: &str) -> Result<Bundle, FileError> {
    let decryptor = match age::Decryptor::new_buffered(bytes) {
        Ok(d) => d,
        Err(age::DecryptError::UnknownFormat) => return Err(FileError::NotAgeFile),
        Err(age::DecryptError::InvalidHeader) => {
            return Err(if bytes.starts_with(b"age-encryption.org/") {
                FileError::Damaged("its header is invalid".into())
            } else {
                FileError::NotAgeFile
            });
        }
        Err(e) => return Err(FileError::Damaged(e.to_string())),
    };
    if !decryptor.is_scrypt() {
        return Err(FileError::NotPassphrase);
    }
    let mut identity = age::scrypt::Identity::new(SecretString::from(passphrase.trim().to_owned()));
    identity.set_max_work_factor(MAX_WORK_FACTOR);
    let mut reader = match decryptor.decrypt(std::iter::once(&identity as &dyn age::Identity)) {
        Ok(r) => r,
        // The scrypt stanza doesn't unwrap: that is what a wrong passphrase looks like.
        Err(age::DecryptError::NoMatchingKeys)
        | Err(age::DecryptError::KeyDecryptionFailed)
        | Err(age::DecryptError::DecryptionFailed) => {
            return Err(FileError::WrongPassphrase);
        }
        // Said here, not by age: its own text for it overflows a shift on a large work factor
        // (found by the fuzzer).
        Err(age::DecryptError::ExcessiveWork { required, .. }) => {
            return Err(FileError::Damaged(format!(
                "the file asks for scrypt work factor {required}, more than the {MAX_WORK_FACTOR} accepted"
            )));
        }
        Err(e) => return Err(FileError::Damaged(e.to_string())),
    };
    let mut json = Vec::new();
    reader.read_to_end(&mut json).map_err(|e| FileError::Damaged(e.to_string()))?;
    Ok(Bundle::from_json(&json)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bundle::tests::sample;

    #[test]
    fn round_trip_and_each_failure_has_its_error() {
        let bundle = sample();
        let sealed = seal(&bundle, "ABCD-EFGH");
        assert!(sealed.starts_with(b"age-encryption.org/v1"));
        assert_eq!(open(&sealed, "ABCD-EFGH").unwrap().to_json(), bundle.to_json());
        assert!(matches!(open(&sealed, "WRONG"), Err(FileError::WrongPassphrase)), "{:?}", open(&sealed, "WRONG"));
        assert!(matches!(open(b"hello world", "x"), Err(FileError::NotAgeFile)));
        let cut = &sealed[..sealed.len() - 20];
        assert!(matches!(open(cut, "ABCD-EFGH"), Err(FileError::Damaged(_))), "{:?}", open(cut, "ABCD-EFGH"));
        let mut tampered = sealed.clone();
        let n = tampered.len() - 40;
        tampered[n] ^= 1;
        assert!(matches!(open(&tampered, "ABCD-EFGH"), Err(FileError::Damaged(_))));
    }
}
