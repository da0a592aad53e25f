#!/bin/sh
# Runs retrain-router for each collection in $COLLECTIONS every $RETRAIN_INTERVAL seconds
# (with --maintain in the default arguments: the layout's upkeep first, maintain-layout).
# A loop instead of crond keeps the container's logs on stdout and needs no root.
set -u
: "${MILVUS_URI:=http://milvus:19530}"
: "${COLLECTIONS:?set COLLECTIONS to a space-separated list of laid-out collections}"
: "${RETRAIN_INTERVAL:=86400}"
: "${RETRAIN_ARGS:=--since 7d --sample 50000 --nprobe 8 --maintain}"
while true; do
  for c in $COLLECTIONS; do
    # shellcheck disable=SC2086
    retrain-router --uri "$MILVUS_URI" --collection "$c" --model-dir /models \
      --report /models/reports $RETRAIN_ARGS
    echo "$(date -u +%FT%TZ) retrain-router $c exited with $?"
  done
  sleep "$RETRAIN_INTERVAL"
done
