#!/usr/bin/env bash
# Creates mmpipe's Prefect process work pool `mmpipe-process` (the pool prefect.yaml deploys to); safe to run again.
# Needs PREFECT_API_URL and PREFECT_API_AUTH_STRING (worker.env.example) pointing at the server.
set -euo pipefail

if prefect work-pool inspect mmpipe-process >/dev/null 2>&1; then
    echo "work pool mmpipe-process already exists"
else
    prefect work-pool create mmpipe-process --type process
fi
