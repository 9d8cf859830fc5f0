//! One-time transfer codes: 140 bits from a CSPRNG, shown as upper-case base32 in groups of four
//! (`7KQM-2XD9-…`), typed back in any case and spacing. Only a hash of a code is ever stored.

use std::fmt;

use rand::Rng;
use ruma::{OwnedUserId, UserId};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::bundle::BundleId;

/// RFC 4648 base32 alphabet: no 0/1/8/9, so O/I/B/g can't be mistaken for digits.
const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
/// 28 symbols × 5 bits = 140 bits.
const SYMBOLS: usize = 28;
const GROUP: usize = 4;

/// A transfer code. `Debug` hides it, so it can't reach a log by accident.
#[derive(Clone, PartialEq, Eq)]
pub struct TransferCode(String);

/// The SHA-256 of a normalised code: what the store keeps instead of the code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CodeHash(pub [u8; 32]);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodeFormatError {
    #[error("a transfer code has {SYMBOLS} letters and digits 2-7 (like 7KQM-2XD9-…); this one has {0}")]
    Length(usize),
    #[error("a transfer code has only letters A-Z and digits 2-7; `{0}` is not one of them")]
    Symbol(char),
}

impl TransferCode {
    pub fn generate() -> Self {
        let mut rng = rand::rng();
        TransferCode((0..SYMBOLS).map(|_| ALPHABET[rng.random_range(0..32)] as char).collect())
    }

    /// Reads a code as a person may type it: any case, with or without hyphens and spaces.
    pub fn parse(input: &str) -> Result<Self, CodeFormatError> {
        let mut out = String::with_capacity(SYMBOLS);
        for c in input.chars().filter(|c| *c != '-' && !c.is_whitespace()) {
            let c = c.to_ascii_uppercase();
            if !ALPHABET.contains(&(c as u8)) || !c.is_ascii() {
                return Err(CodeFormatError::Symbol(c));
            }
            out.push(c);
        }
        if out.len() != SYMBOLS {
            return Err(CodeFormatError::Length(out.len()));
        }
        Ok(TransferCode(out))
    }

    pub fn hash(&self) -> CodeHash {
        CodeHash(Sha256::digest(self.0.as_bytes()).into())
    }

    /// The grouped form shown to users; also the passphrase of bundle files.
    pub fn display(&self) -> String {
        self.0.as_bytes().chunks(GROUP).map(|g| std::str::from_utf8(g).expect("ASCII")).collect::<Vec<_>>().join("-")
    }
}

impl fmt::Debug for TransferCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TransferCode(<redacted>)")
    }
}

/// What is kept about a transfer code (by its hash), and the rules of its use: the store only
/// keeps the record and swaps it atomically.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CodeRecord {
    pub owner: OwnedUserId,
    pub bundle: BundleId,
    pub expires_at_ms: u64,
    /// With `export --to`: only this account may redeem the code.
    pub bound_to: Option<OwnedUserId>,
    pub redeemed_by: Option<OwnedUserId>,
}

impl CodeRecord {
    /// A used code is kept, without its bundle, until it expires, through `forget` and trimming:
    /// the same file and code would otherwise open again here (a claim starts from no record).
    pub fn remembered_as_used(&self, now: u64) -> bool {
        self.redeemed_by.is_some() && self.expires_at_ms > now
    }
}

/// Why a code can't be redeemed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RedeemError {
    /// Also what a code bound to another account looks like: nobody learns that it exists.
    #[error("no such transfer code for this account")]
    NotFound,
    #[error("this transfer code has expired; ask for a new one with `export`")]
    Expired,
    #[error("this transfer code was already used; ask for a new one with `export`")]
    Used,
}

/// Whether `redeemer` may use the code of `record` at `now`: it must be unexpired, unused, and (if
/// bound) bound to `redeemer`. A code bound to someone else looks like no code at all.
pub fn check(record: CodeRecord, redeemer: &UserId, now: u64) -> Result<CodeRecord, RedeemError> {
    if record.bound_to.as_deref().is_some_and(|b| b != redeemer) {
        return Err(RedeemError::NotFound);
    }
    if record.redeemed_by.is_some() {
        return Err(RedeemError::Used);
    }
    if record.expires_at_ms <= now {
        return Err(RedeemError::Expired);
    }
    Ok(record)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_codes_are_grouped_base32_and_distinct() {
        let code = TransferCode::generate();
        let shown = code.display();
        assert_eq!(shown.len(), SYMBOLS + SYMBOLS / GROUP - 1);
        assert!(shown.split('-').all(|g| g.len() == GROUP));
        assert!(shown.chars().all(|c| c == '-' || ALPHABET.contains(&(c as u8))));
        assert_ne!(code, TransferCode::generate());
        assert!(!format!("{code:?}").contains(&shown));
    }

    #[test]
    fn typed_variations_parse_to_the_same_code() {
        let code = TransferCode::generate();
        let shown = code.display();
        for typed in
            [shown.clone(), shown.to_lowercase(), shown.replace('-', " "), shown.replace('-', ""), format!("{shown}\n")]
        {
            let parsed = TransferCode::parse(&typed).unwrap();
            assert_eq!(parsed, code);
            assert_eq!(parsed.hash(), code.hash());
        }
    }

    #[test]
    fn a_code_is_for_its_account_once_and_until_it_expires() {
        let (old, new, other) = (ruma::user_id!("@o:x.org"), ruma::user_id!("@n:x.org"), ruma::user_id!("@e:x.org"));
        let record = CodeRecord {
            owner: old.to_owned(),
            bundle: BundleId::new(old, 1),
            expires_at_ms: 1_000,
            bound_to: Some(new.to_owned()),
            redeemed_by: None,
        };
        assert!(check(record.clone(), new, 999).is_ok());
        assert_eq!(check(record.clone(), other, 999), Err(RedeemError::NotFound));
        assert_eq!(check(record.clone(), new, 1_000), Err(RedeemError::Expired));
        let used = CodeRecord { redeemed_by: Some(new.to_owned()), ..record.clone() };
        assert_eq!(check(used.clone(), new, 999), Err(RedeemError::Used));
        assert!(used.remembered_as_used(999) && !used.remembered_as_used(1_000) && !record.remembered_as_used(0));
    }

    #[test]
    fn malformed_codes_say_why() {
        assert_eq!(TransferCode::parse("ABCD-EFGH"), Err(CodeFormatError::Length(8)));
        assert_eq!(TransferCode::parse("ABC1"), Err(CodeFormatError::Symbol('1')));
    }
}
