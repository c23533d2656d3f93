#!/usr/bin/env bash
# CI: build the images the docker tests run, idempotently, and say how long it took.
# A fresh machine builds everything from Debian packages and PyPI wheels when no
# registry answers (a few minutes); later runs check input hashes only (about a second).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
started=$SECONDS
deploy/build-images.sh "$@"
echo "deploy/ci-images.sh: images ready in $((SECONDS - started)) s" >&2
