#!/bin/sh
# Debian's redis-server, without a config file, answers only loopback clients while no password is
# set ("protected mode"). The other containers reach it over the Compose network: turn that off,
# as the upstream redis image does, then run the command compose gives (redis-server and its flags).
set -e
if [ "${1:-}" = "redis-server" ]; then
    shift
    exec redis-server --protected-mode no "$@"
fi
exec "$@"
