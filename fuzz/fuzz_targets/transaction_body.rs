//! A transaction body as the homeserver PUTs it: parsed by the HTTP edge's own `parse`, then each
//! event through the bot's own filter (`bot::addressed`, what decides whether an event is stored
//! and handled) and deserialized as the bot does.
#![no_main]

use handoff::appservice::parse;
use handoff::bot::addressed;
use libfuzzer_sys::fuzz_target;
use ruma::api::appservice::event::push_events;
use ruma::events::AnyTimelineEvent;
use ruma::{OwnedUserId, RoomId, owned_user_id};

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
    let bot: OwnedUserId = owned_user_id!("@handoff:localhost");
    // Every room is someone's DM with the bot: the filter's deepest path.
    let dm_owner = |_: &RoomId| Some(owned_user_id!("@alice:localhost"));
    for raw in &txn.events {
        if let Some(a) = addressed(raw, &bot, "!handoff", dm_owner) {
            assert!(
                a.dm_invite.is_none()
                    || raw.get_field::<String>("type").ok().flatten().as_deref() == Some("m.room.member")
            );
        }
        let _: Result<AnyTimelineEvent, _> = raw.deserialize();
    }
});
