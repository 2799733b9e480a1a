#!/usr/bin/env bash
# Starts a Prefect process worker for mmpipe: polls `mmpipe-process` and runs each flow run as a subprocess of this host.
# Flow runs inherit this environment (worker.env.example: Prefect, MLflow and Ray addresses and credentials).
set -euo pipefail

need() { for v in "$@"; do [[ -n "${!v:-}" ]] || { echo "start-worker.sh: set $v (see infra/prefect/worker.env.example)" >&2; exit 2; }; done; }
need PREFECT_API_URL PREFECT_API_AUTH_STRING MLFLOW_TRACKING_URI

# --limit: concurrent flow runs on this host (ingest downloads and evaluation run here, training on Ray).
exec prefect worker start --pool mmpipe-process --type process \
    --name "mmpipe-$(hostname)" --limit "${MMPIPE_WORKER_LIMIT:-4}"
