#!/bin/bash
# The official mongo image's entrypoint contract, for SecantusDB:
#   `mongod [flags]`  serve /data/db on 0.0.0.0:27017 as the mongodb user;
#   MONGO_INITDB_ROOT_USERNAME and MONGO_INITDB_ROOT_PASSWORD (both or neither) create
#   that user with the root role in the admin database on the first start, on a
#   loopback-only port, and turn authentication on for every start.
set -euo pipefail

dbpath=/data/db
initdb_done=$dbpath/.initdb-complete

if [ "${1:-}" = mongod ] || [ "${1:0:1}" = - ]; then
    [ "${1:-}" = mongod ] && shift
    if [ "$(id -u)" = 0 ]; then
        find /data/db /data/configdb \! -user mongodb -exec chown mongodb:mongodb '{}' +
        HOME=/data/db exec setpriv --reuid=mongodb --regid=mongodb --init-groups "$0" mongod "$@"
    fi
    for flag in "$@"; do
        case $flag in
            --bind_ip_all|--auth) ;;  # what this stand-in does anyway
            *) echo "mongo stand-in: ignoring unsupported mongod flag $flag" >&2 ;;
        esac
    done

    serve=(secantusd-py --standalone --storage-path "$dbpath")
    user=${MONGO_INITDB_ROOT_USERNAME:-} password=${MONGO_INITDB_ROOT_PASSWORD:-}
    if { [ -n "$user" ] && [ -z "$password" ]; } || { [ -z "$user" ] && [ -n "$password" ]; }; then
        echo "mongo stand-in: set both MONGO_INITDB_ROOT_USERNAME and MONGO_INITDB_ROOT_PASSWORD, or neither" >&2
        exit 1
    fi
    if [ -n "$user" ]; then
        if [ ! -e "$initdb_done" ]; then
            echo "mongo stand-in: first start, creating the root user '$user'" >&2
            "${serve[@]}" --host 127.0.0.1 --port 27099 --log-level WARNING &
            init_pid=$!
            trap 'kill -TERM "$init_pid" 2>/dev/null' EXIT
            python3 - <<'PY'
import os, sys, time
import pymongo
from pymongo.errors import OperationFailure, PyMongoError

client = pymongo.MongoClient("mongodb://127.0.0.1:27099/", directConnection=True, serverSelectionTimeoutMS=1000)
deadline = time.monotonic() + 60
while True:
    try:
        client.admin.command("ping")
        break
    except PyMongoError:
        if time.monotonic() > deadline:
            sys.exit("mongo stand-in: the server did not start within 60 s")
        time.sleep(0.2)
try:
    client.admin.command("createUser", os.environ["MONGO_INITDB_ROOT_USERNAME"],
                         pwd=os.environ["MONGO_INITDB_ROOT_PASSWORD"], roles=[{"role": "root", "db": "admin"}])
except OperationFailure as exc:
    if "already exists" not in str(exc):
        raise
PY
            kill -TERM "$init_pid"
            wait "$init_pid" || true
            trap - EXIT
            touch "$initdb_done"
        fi
        serve+=(--auth)
    fi
    exec "${serve[@]}" --host 0.0.0.0 --port 27017
fi
exec "$@"
