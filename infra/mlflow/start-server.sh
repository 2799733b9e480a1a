#!/usr/bin/env bash
# Starts mmpipe's MLflow tracking server: PostgreSQL backend store, artifacts proxied to object storage, basic-auth app.
# Every setting comes from the environment (mlflow.env.example names each one); nothing secret is in this file.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"

need() { for v in "$@"; do [[ -n "${!v:-}" ]] || { echo "start-server.sh: set $v (see infra/mlflow/mlflow.env.example)" >&2; exit 2; }; done; }
need PGHOST PGUSER PGPASSWORD MLFLOW_ARTIFACTS_DESTINATION MLFLOW_ALLOWED_HOSTS \
     MLFLOW_AUTH_ADMIN_PASSWORD MLFLOW_FLASK_SERVER_SECRET_KEY

export MLFLOW_AUTH_CONFIG_PATH="${MLFLOW_AUTH_CONFIG_PATH:-$here/auth.ini}"

# postgresql+psycopg:///<db>: psycopg 3 (libpq) takes host, port, user and password from PGHOST, PGPORT, PGUSER, PGPASSWORD.
# --serve-artifacts: clients upload and download through this server (mlflow-artifacts:/), so only
# the server holds object-storage credentials (AWS_ACCESS_KEY_ID, ..., MLFLOW_S3_ENDPOINT_URL).
exec mlflow server \
    --app-name basic-auth \
    --backend-store-uri "postgresql+psycopg:///${MLFLOW_DB_NAME:-mlflow}" \
    --serve-artifacts \
    --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION" \
    --host "${MLFLOW_HOST:-127.0.0.1}" \
    --port "${MLFLOW_PORT:-5000}" \
    --allowed-hosts "$MLFLOW_ALLOWED_HOSTS" \
    --workers "${MLFLOW_WORKERS:-4}"
