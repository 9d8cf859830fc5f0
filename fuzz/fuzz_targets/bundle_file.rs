//! Bundle files (age, passphrase-encrypted) and the bundle JSON inside them, through the border
//! that every bundle from outside crosses.
//!
//! Input: one length byte, that many bytes of passphrase, then the file.
#![no_main]

use handoff::bundle::border::{self, Limits};
use handoff::bundle::file::{self, Policy};
use libfuzzer_sys::fuzz_target;

/// What the service opens a file from another server with. Its work factor ceiling (16: 64 MiB,
/// well inside the fuzzer's memory limit) is refused before any derivation above it, so every
/// input runs.
const LIMITS: Limits = Limits { max_rooms: 1000, max_history: 50 };

fuzz_target!(|data: &[u8]| {
    // The border on the whole input: most inputs never decrypt.
    if let Ok(opened) = border::open(data, &LIMITS) {
        // What crossed, crosses again unchanged (nothing it keeps is over a bound).
        let again = border::open(&opened.bundle.to_json(), &LIMITS).expect("a checked bundle opens");
        assert!(again.dropped.is_empty(), "{:?}", again.dropped);
        assert_eq!(again.bundle.to_json(), opened.bundle.to_json());
    }

    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let (passphrase, bytes) = rest.split_at(usize::from(n).min(rest.len()));
    let _ = file::open(bytes, &String::from_utf8_lossy(passphrase), &Policy::service(LIMITS));
});
