#!/bin/sh
# Least-privilege roles for the compose demo, run once by the postgres image on a new
# volume. Passwords come from the environment (.env), never from this file.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
  -v owner_pw="$LAKEHOUSE_OWNER_PASSWORD" -v batch_pw="$LAKEHOUSE_BATCH_PASSWORD" \
  -v cdc_pw="$LAKEHOUSE_CDC_PASSWORD" -v app_pw="$LAKEHOUSE_APP_PASSWORD" <<'SQL'
-- Owns the lending schema and its tables (`lakehouse seed`); nothing else logs in as it.
CREATE ROLE lakehouse_owner LOGIN PASSWORD :'owner_pw';
CREATE SCHEMA lending AUTHORIZATION lakehouse_owner;
-- Batch extraction: reads the tables; sees other sessions' open transactions (the fence).
CREATE ROLE lakehouse_batch LOGIN PASSWORD :'batch_pw';
GRANT pg_read_all_stats TO lakehouse_batch;
GRANT USAGE ON SCHEMA lending TO lakehouse_batch;
ALTER DEFAULT PRIVILEGES FOR ROLE lakehouse_owner IN SCHEMA lending
    GRANT SELECT ON TABLES TO lakehouse_batch;
-- The CDC stream: replication, and table ownership (by membership) for CREATE PUBLICATION.
CREATE ROLE lakehouse_cdc LOGIN REPLICATION PASSWORD :'cdc_pw' IN ROLE lakehouse_owner;
-- The application (the change simulator): reads and writes rows, changes no schema.
CREATE ROLE lakehouse_app LOGIN PASSWORD :'app_pw';
GRANT USAGE ON SCHEMA lending TO lakehouse_app;
ALTER DEFAULT PRIVILEGES FOR ROLE lakehouse_owner IN SCHEMA lending
    GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO lakehouse_app;
ALTER DEFAULT PRIVILEGES FOR ROLE lakehouse_owner IN SCHEMA lending
    GRANT USAGE ON SEQUENCES TO lakehouse_app;
SQL
