#!/bin/sh
# Fails early, with a reason, when the mounted model repository is empty.
set -e
repo="${GANSERVE_REPOSITORY:-/app/model_repository}"
if ! ls "$repo"/*/*/spec.json >/dev/null 2>&1; then
  echo "ganserve: no model entries under $repo (expected <name>/<version>/spec.json); mount a repository or run 'make models'" >&2
  exit 2
fi
exec "$@"
