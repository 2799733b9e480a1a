# Image for the MLflow and Prefect servers of infra/compose.yaml (build context: infra/): Python 3.11, mlflow[auth] 3.17, prefect 3.8.8, PostgreSQL and S3 clients.
FROM python:3.11-slim

# Same versions as pyproject.toml; fastapi <0.151 because prefect 3.8.8 fails at import with 0.160+.
# psycopg 3: the postgresql+psycopg:// URIs of infra/mlflow (SQLAlchemy 2.1 also picks it for postgresql://).
RUN pip install --no-cache-dir "mlflow[auth]==3.17.2" "psycopg[binary]" boto3 \
        "prefect==3.8.8" "fastapi>=0.139,<0.151" \
    && useradd --create-home --uid 1000 mmpipe

COPY mlflow/ /infra/mlflow/
COPY prefect/ /infra/prefect/
USER mmpipe
WORKDIR /home/mmpipe
