"""The ingest benchmark's baseline: a minimal application service on the mautrix framework.

It does what handoff's transaction endpoint does before handing events on, with mautrix's own
machinery: `AppService` serves `PUT /_matrix/app/v1/transactions/{txnId}` on aiohttp, checks the
`hs_token`, drops transaction IDs it has seen, deserializes each event and hands it to the event
handlers (its state store's, and one that picks out the events a bot would act on, as handoff's
`Bot::addressed` does), then answers 200. It never contacts a homeserver: `homeserver` is only
stored (the bench passes a dead address).

Run by `cargo bench --bench ingest`; it prints `ready` once listening, and a summary on SIGTERM.
"""

import argparse
import asyncio
import os
import signal
import sys

from mautrix.appservice import AppService
from mautrix.appservice.state_store import FileASStateStore
from mautrix.types import Event, EventType


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--hs-token", required=True)
    parser.add_argument("--domain", default="localhost")
    parser.add_argument("--bot-localpart", default="handoff")
    parser.add_argument("--homeserver", default="http://127.0.0.1:9")
    parser.add_argument("--state-dir", required=True)
    args = parser.parse_args()

    # mautrix's default state store (a JSON file, saved at most once a minute), in a directory of
    # the bench's own rather than the working directory.
    state_store = FileASStateStore(path=os.path.join(args.state_dir, "mx-state.json"), binary=False)
    appservice = AppService(
        server=args.homeserver,
        domain=args.domain,
        as_token="unused-the-baseline-never-calls-the-homeserver",
        hs_token=args.hs_token,
        bot_localpart=args.bot_localpart,
        id="handoff-ingest-baseline",
        state_store=state_store,
    )
    bot = appservice.bot_mxid
    counts = {"events": 0, "for_the_bot": 0}

    @appservice.matrix_event_handler
    async def addressed(evt: Event) -> None:
        # handoff's filter: an invite or leave of the bot, or a message from someone else that
        # is not an edit and is a command (this baseline knows no DMs; in this load the only
        # messages in DMs are the bot's own).
        counts["events"] += 1
        if evt.type == EventType.ROOM_MEMBER:
            if evt.state_key == bot:
                counts["for_the_bot"] += 1
        elif evt.type == EventType.ROOM_MESSAGE and evt.sender != bot:
            content = evt.content.serialize()
            edit = (content.get("m.relates_to") or {}).get("rel_type") == "m.replace"
            if str(content.get("body", "")).lstrip().startswith("!handoff") and not edit:
                counts["for_the_bot"] += 1

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    await appservice.start(host="127.0.0.1", port=args.port)
    print("ready", flush=True)
    await stop.wait()
    await appservice.stop()
    print(
        f"transactions={len(appservice.transactions)} events={counts['events']} "
        f"for_the_bot={counts['for_the_bot']}",
        flush=True,
    )


if __name__ == "__main__":
    asyncio.run(main())
    sys.exit(0)
