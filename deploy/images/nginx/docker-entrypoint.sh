#!/bin/sh
# As in the official nginx image: before nginx starts, run /docker-entrypoint.d/*.sh.
set -eu
if [ "${1:-}" = nginx ] || [ "${1:-}" = nginx-debug ]; then
    for script in /docker-entrypoint.d/*.sh; do
        if [ -x "$script" ]; then
            "$script"
        fi
    done
fi
exec "$@"
