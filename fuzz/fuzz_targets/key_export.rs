//! Element key exports as users upload them: validation must never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The bot reads uploads as text (lossily), so every input is a string here too.
    let text = String::from_utf8_lossy(data);
    if let Ok(export) = handoff::keys::validate(&text) {
        // What is kept is the armour that was validated: checking it again must agree.
        let again = handoff::keys::validate(&export.armored).expect("the kept armour validates");
        assert_eq!(again, export);
    }
});
