//! Bundle files: the bundle JSON encrypted with a passphrase in the age format, so a file can be
//! carried on any storage and opened anywhere (also with the `age` tool: `age -d FILE`).

use std::io::{Read, Write};

use age::secrecy::SecretString;

use super::border::{self, Limits, Opened};
use super::{Bundle, BundleFormatError};

/// scrypt work factor (log2 N) for files sealed with a transfer code. A code carries 140 bits
/// from a CSPRNG, so the KDF needn't make up for a weak passphrase; 2^15 keeps sealing fast.
pub const CODE_WORK_FACTOR: u8 = 15;
/// The most work a file given to the service may ask for: what the service seals with, and one
/// step of headroom. scrypt at 2^16 (r = 8) takes 64 MiB; 2^22 took 4 GiB, on every try.
pub const SERVICE_MAX_WORK_FACTOR: u8 = CODE_WORK_FACTOR + 1;
/// scrypt work factor for files sealed with a passphrase a person chose (`handoff export --out`):
/// 128 MiB and about half a second, the most that keeps opening a file under 256 MiB.
pub const PASSPHRASE_WORK_FACTOR: u8 = 17;
/// The most work a file given to the device side asks for by default: what it seals with.
pub const DEVICE_MAX_WORK_FACTOR: u8 = PASSPHRASE_WORK_FACTOR;
/// The most the device side accepts when its user says so (`--max-work-factor`), for a file they
/// made on their own machine (`age -p` calibrates to a second: 18 to 20 today): age's own ceiling.
pub const MOST_WORK_FACTOR: u8 = 22;

/// What a file may ask of the one opening it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// scrypt's work factor (log2 N): a file asking for more is refused before any derivation.
    pub max_work_factor: u8,
    pub limits: Limits,
}

impl Policy {
    /// The service opens only files it could have made.
    pub fn service(limits: Limits) -> Policy {
        Policy { max_work_factor: SERVICE_MAX_WORK_FACTOR, limits }
    }

    /// The device side opens the files handoff makes; `max_work_factor` (from its user, at most
    /// [`MOST_WORK_FACTOR`]) lets it open one they made with more work on their own machine.
    pub fn device(max_work_factor: Option<u8>) -> Policy {
        let max_work_factor = max_work_factor.unwrap_or(DEVICE_MAX_WORK_FACTOR).min(MOST_WORK_FACTOR);
        Policy { max_work_factor, limits: Limits::DEVICE }
    }

    /// What the device side opens without being told more.
    pub const DEVICE: Policy = Policy { max_work_factor: DEVICE_MAX_WORK_FACTOR, limits: Limits::DEVICE };
}

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
    /// Refused before any key derivation: the work factor is the file's word, and 2^22 is 4 GiB.
    #[error("the file asks for scrypt work factor {asked}, more than the {accepted} accepted here")]
    ExcessiveWork { asked: u8, accepted: u8 },
    #[error("{0}")]
    Format(#[from] BundleFormatError),
}

/// Encrypts a bundle with `passphrase` (for bundles made by the bot: the transfer code as shown).
pub fn seal(bundle: &Bundle, passphrase: &str) -> Vec<u8> {
    seal_at(bundle, passphrase, Some(CODE_WORK_FACTOR))
}

/// Encrypts a bundle with a passphrase a person chose, with more work ([`PASSPHRASE_WORK_FACTOR`]),
/// which a weak passphrase needs.
pub fn seal_with_passphrase(bundle: &Bundle, passphrase: &str) -> Vec<u8> {
    seal_at(bundle, passphrase, Some(PASSPHRASE_WORK_FACTOR))
}

fn seal_at(bundle: &Bundle, passphrase: &str, work_factor: Option<u8>) -> Vec<u8> {
    seal_json(&bundle.to_json(), passphrase, work_factor)
}

/// Encrypts bundle JSON as it is (for tests of what hand-made files carry).
#[doc(hidden)]
pub fn seal_json(json: &[u8], passphrase: &str, work_factor: Option<u8>) -> Vec<u8> {
    let mut recipient = age::scrypt::Recipient::new(SecretString::from(passphrase.to_owned()));
    if let Some(w) = work_factor {
        recipient.set_work_factor(w);
    }
    let encryptor = age::Encryptor::with_recipients(std::iter::once(&recipient as &dyn age::Recipient))
        .expect("one passphrase recipient is always valid");
    let mut out = Vec::new();
    let mut writer = encryptor.wrap_output(&mut out).expect("writing to memory");
    writer.write_all(json).expect("writing to memory");
    writer.finish().expect("writing to memory");
    out
}

/// A file error for a person at a terminal, with what they can do about it.
pub fn explain(e: FileError, path: &std::path::Path) -> anyhow::Error {
    match e {
        FileError::ExcessiveWork { asked, .. } if asked <= MOST_WORK_FACTOR => anyhow::anyhow!(
            "{}: {e}. If you made this file yourself, open it with --max-work-factor {asked} (scrypt then takes {} MiB).",
            path.display(),
            1u64 << (asked - 10)
        ),
        e => anyhow::anyhow!("{}: {e}", path.display()),
    }
}

/// Opens a bundle file with what a person typed: a transfer code in any case and spacing, or
/// else a passphrase as it is.
pub fn open_typed(bytes: &[u8], typed: &str, policy: &Policy) -> Result<Opened, FileError> {
    match crate::code::TransferCode::parse(typed) {
        Ok(code) => match open(bytes, &code.display(), policy) {
            Err(FileError::WrongPassphrase) => open(bytes, typed, policy),
            other => other,
        },
        Err(_) => open(bytes, typed, policy),
    }
}

/// Decrypts and reads a bundle file through the [`border`]. Each way it can fail has its own
/// error. The passphrase is used exactly as given: `seal_with_passphrase` seals with it as typed.
pub fn open(bytes: &[u8], passphrase: &str, policy: &Policy) -> Result<Opened, FileError> {
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
    let mut identity = age::scrypt::Identity::new(SecretString::from(passphrase.to_owned()));
    // age checks the stanza's work factor against this before it derives anything.
    identity.set_max_work_factor(policy.max_work_factor);
    let reader = match decryptor.decrypt(std::iter::once(&identity as &dyn age::Identity)) {
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
            return Err(FileError::ExcessiveWork { asked: required, accepted: policy.max_work_factor });
        }
        Err(e) => return Err(FileError::Damaged(e.to_string())),
    };
    // Capped before it is all read: the size the file says is the sender's word.
    let mut json = Vec::new();
    let cap = border::MAX_JSON_BYTES as u64 + 1;
    reader.take(cap).read_to_end(&mut json).map_err(|e| FileError::Damaged(e.to_string()))?;
    if json.len() as u64 == cap {
        return Err(BundleFormatError::TooLarge { bytes: json.len() }.into());
    }
    Ok(border::open(&json, &policy.limits)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bundle::tests::sample;

    const P: Policy = Policy::DEVICE;

    #[test]
    fn round_trip_and_each_failure_has_its_error() {
        let bundle = sample();
        let sealed = seal(&bundle, "ABCD-EFGH");
        assert!(sealed.starts_with(b"age-encryption.org/v1"));
        assert_eq!(open(&sealed, "ABCD-EFGH", &P).unwrap().bundle.to_json(), bundle.to_json());
        let wrong = open(&sealed, "WRONG", &P);
        assert!(matches!(wrong, Err(FileError::WrongPassphrase)), "{wrong:?}");
        assert!(matches!(open(b"hello world", "x", &P), Err(FileError::NotAgeFile)));
        let cut = &sealed[..sealed.len() - 20];
        let cut = open(cut, "ABCD-EFGH", &P);
        assert!(matches!(cut, Err(FileError::Damaged(_))), "{cut:?}");
        let mut tampered = sealed.clone();
        let n = tampered.len() - 40;
        tampered[n] ^= 1;
        assert!(matches!(open(&tampered, "ABCD-EFGH", &P), Err(FileError::Damaged(_))));
    }

    #[test]
    fn a_passphrase_opens_as_it_was_typed_spaces_included() {
        let sealed = seal_at(&sample(), "  two spaces  ", Some(10));
        assert!(open(&sealed, "  two spaces  ", &P).is_ok());
        assert!(matches!(open(&sealed, "two spaces", &P), Err(FileError::WrongPassphrase)));
    }

    /// A file sealed at `sealed_at` whose header says it asks for `asks`: age reads the work
    /// factor before anything is derived or the header's MAC checked, as a hostile file's would be.
    fn asking_for(asks: u8) -> Vec<u8> {
        let sealed = seal_at(&sample(), "ABCD-EFGH", Some(10));
        let text = String::from_utf8_lossy(&sealed[..64]).into_owned();
        let line_end = text.find(" 10\n").expect("the scrypt stanza");
        [&sealed[..line_end], format!(" {asks}\n").as_bytes(), &sealed[line_end + 4..]].concat()
    }

    #[test]
    fn the_service_refuses_more_work_than_it_would_ask_before_deriving_anything() {
        let service = Policy::service(Limits { max_rooms: 10, max_history: 10 });
        let timed = |file: &[u8], policy: &Policy| {
            let started = std::time::Instant::now();
            (open(file, "ABCD-EFGH", policy), started.elapsed())
        };
        let (refused, refusing) = timed(&asking_for(SERVICE_MAX_WORK_FACTOR + 1), &service);
        let Err(e @ FileError::ExcessiveWork { asked: 17, accepted: 16 }) = refused else { panic!("{refused:?}") };
        assert!(e.to_string().contains("work factor 17, more than the 16 accepted here"), "{e}");
        let too_much = open(&asking_for(MOST_WORK_FACTOR), "ABCD-EFGH", &P);
        assert!(matches!(too_much, Err(FileError::ExcessiveWork { asked: 22, accepted: 17 })), "{too_much:?}");
        // The device side derives it (and then finds the edited header's MAC wrong).
        let (derived, deriving) = timed(&asking_for(SERVICE_MAX_WORK_FACTOR + 1), &P);
        assert!(matches!(derived, Err(FileError::WrongPassphrase | FileError::Damaged(_))), "{derived:?}");
        assert!(refusing * 4 < deriving, "refused in {refusing:?}, derived in {deriving:?}");
        assert!(open(&seal(&sample(), "ABCD-EFGH"), "ABCD-EFGH", &service).is_ok());
    }

    /// The input the `bundle_file` fuzzer found (fuzz/corpus/bundle_file/seed-regression-work-factor-overflow):
    /// a stanza asking for work factor 255, whose age error text overflowed a shift.
    #[test]
    fn an_excessive_work_factor_in_a_crafted_header_is_refused_in_words() {
        let input = include_bytes!("../../fuzz/corpus/bundle_file/seed-regression-work-factor-overflow");
        let (len, rest) = (input[0] as usize, &input[1..]);
        let (pass, file) = rest.split_at(len.min(rest.len()));
        let r = open(file, &String::from_utf8_lossy(pass), &P);
        let Err(e @ FileError::ExcessiveWork { asked: 64, .. }) = r else { panic!("{r:?}") };
        assert!(e.to_string().contains("work factor 64"), "{e}");
    }
}
