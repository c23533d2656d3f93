#!/bin/sh
# As in the official rabbitmq image: started as root, make the data dir the rabbitmq
# user's (a fresh volume may be root's), then run the server as that user.
set -eu
if [ "${1:-}" = rabbitmq-server ] && [ "$(id -u)" = 0 ]; then
    find /var/lib/rabbitmq \! -user rabbitmq -exec chown rabbitmq:rabbitmq '{}' +
    exec setpriv --reuid=rabbitmq --regid=rabbitmq --init-groups "$0" "$@"
fi
exec "$@"
