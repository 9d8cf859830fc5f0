//! A transaction body as the homeserver PUTs it: parsed by the HTTP edge's own `parse`, then each
//! event deserialized as the bot does.
#![no_main]

use handoff::appservice::parse;
use libfuzzer_sys::fuzz_target;
use ruma::api::appservice::event::push_events;
use ruma::events::AnyTimelineEvent;

fuzz_target!(|data: &[u8]| {
    let req = http::Request::builder()
        .method("PUT")
        .uri("http://localhost/_matrix/app/v1/transactions/txn1")
        .header("authorization", "Bearer hs_token")
        .header("content-type", "application/json")
        .body(data.to_vec())
        .expect("a fixed, valid request");
    let Ok(txn) = parse::<push_events::v1::Request>(req, &["txn1"]) else {
        return;
    };
    for raw in &txn.events {
        let _: Result<AnyTimelineEvent, _> = raw.deserialize();
    }
});
