-- PostgreSQL databases for mmpipe's servers: mlflow (tracking + registry), mlflow_auth (basic-auth users), prefect.
-- Run once as the owner role (the postgres image runs it from /docker-entrypoint-initdb.d as POSTGRES_USER),
-- or by hand: psql -v ON_ERROR_STOP=1 -f infra/postgres/init.sql. The role and its password are made
-- outside this file (POSTGRES_USER/POSTGRES_PASSWORD, or your managed database's console).
CREATE DATABASE mlflow;
CREATE DATABASE mlflow_auth;
CREATE DATABASE prefect;
-- Prefect needs pg_trgm (PostgreSQL 14.9 or newer).
\connect prefect
CREATE EXTENSION IF NOT EXISTS pg_trgm;
