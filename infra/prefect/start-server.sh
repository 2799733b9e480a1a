#!/usr/bin/env bash
# Starts mmpipe's Prefect server (API, UI, scheduler, event triggers) on PostgreSQL with basic auth.
# Every setting comes from the environment (server.env.example names each one); nothing secret is in this file.
set -euo pipefail

need() { for v in "$@"; do [[ -n "${!v:-}" ]] || { echo "start-server.sh: set $v (see infra/prefect/server.env.example)" >&2; exit 2; }; done; }
need PREFECT_SERVER_API_AUTH_STRING
if [[ -z "${PREFECT_SERVER_DATABASE_CONNECTION_URL:-}" ]]; then
    need PREFECT_SERVER_DATABASE_DRIVER PREFECT_SERVER_DATABASE_HOST PREFECT_SERVER_DATABASE_USER \
         PREFECT_SERVER_DATABASE_NAME PREFECT_SERVER_DATABASE_PASSWORD
fi
[[ "${PREFECT_SERVER_API_AUTH_STRING}" == *:* ]] || { echo "start-server.sh: PREFECT_SERVER_API_AUTH_STRING must be user:password" >&2; exit 2; }

# Host and port come from PREFECT_SERVER_API_HOST / PREFECT_SERVER_API_PORT (default 127.0.0.1:4200).
# Database migrations run on start (PREFECT_SERVER_DATABASE_MIGRATE_ON_START, default true).
exec prefect server start
