#!/bin/sh
# Entry point of the handoff image, mautrix-style: the first run writes an example config and
# exits; the second writes the registrations and exits; after that it serves.
set -e
cd /data
if [ ! -f /data/config.yaml ]; then
    sed -e 's/^    hostname: 127.0.0.1/    hostname: 0.0.0.0/' /opt/handoff/bridge-config.yaml > /data/config.yaml
    echo "Wrote an example config to /data/config.yaml."
    echo "Edit it (homeserver.address, homeserver.domain, appservice.address, handoff.permissions), then start the container again."
    exit 0
fi
if [ ! -f /data/handoff-registration.yaml ]; then
    handoff generate-registration -c /data/config.yaml
    echo "Add /data/handoff-registration.yaml and /data/handoff-acting-registration.yaml to app_service_config_files"
    echo "in your homeserver config, restart the homeserver, then start this container again."
    exit 0
fi
exec handoff serve -c /data/config.yaml
