//! Bundle files (age, passphrase-encrypted) and the bundle JSON inside them.
//!
//! Input: one length byte, that many bytes of passphrase, then the file.
#![no_main]

use handoff::bundle::Bundle;
use libfuzzer_sys::fuzz_target;

/// Highest scrypt work factor (log2 N) run. `open` accepts up to 22 on purpose (files from
/// `age -p`), but 2^22 needs 4 GiB and seconds per run: that is by design, not a finding, and it
/// would only trip the fuzzer's memory limit. Handoff seals with 15; above 22 `open` refuses
/// before any work, so those inputs still run.
const MAX_WORK_FACTOR: u64 = 16;
const OPEN_MAX_WORK_FACTOR: u64 = 22;

fuzz_target!(|data: &[u8]| {
    // The inner JSON parser, on the whole input: most inputs never decrypt.
    let _ = Bundle::from_json(data);

    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let (passphrase, file) = rest.split_at(usize::from(n).min(rest.len()));
    if asks_for_more_work(file) {
        return;
    }
    let _ = handoff::bundle::file::open(file, &String::from_utf8_lossy(passphrase));
});

/// Whether an scrypt stanza (`-> scrypt SALT WORK_FACTOR`) asks for more than [`MAX_WORK_FACTOR`]
/// that `open` would still compute; any numeric argument counts, to be safe.
fn asks_for_more_work(file: &[u8]) -> bool {
    file.split(|&b| b == b'\n').filter_map(|line| line.strip_prefix(b"-> scrypt ")).any(|args| {
        args.split(|&b| b == b' ')
            .filter_map(|a| std::str::from_utf8(a).ok()?.parse::<u64>().ok())
            .any(|wf| (MAX_WORK_FACTOR + 1..=OPEN_MAX_WORK_FACTOR).contains(&wf))
    })
}
