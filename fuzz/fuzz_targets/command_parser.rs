//! Chat commands: any message text, in a DM or a group room, must parse or fail without panicking.
#![no_main]

use handoff::bot::commands::{Place, parse};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let place = if first & 1 == 0 { Place::Dm } else { Place::Group };
    // Message bodies reach the bot as JSON strings, so always valid UTF-8.
    let text = String::from_utf8_lossy(rest);
    let _ = parse(&text, place, "!handoff");
});
