#!/bin/sh
# Least-privilege roles for the compose demo. The postgres image runs the executable
# *.sh files of /docker-entrypoint-initdb.d once, when its data volume is new, as the
# superuser over the Unix socket. Passwords come from the environment (.env), never from
# this file. The schema is LAKEHOUSE_PG_SCHEMA of the compose file (`lending`); Feast's
# online store lives beside it in `lending_online`.
set -eu
# psql reads the passwords from its environment (\getenv, psql 15+): on its command line
# (-v) they would show in `ps` to anyone on the host.
psql -v ON_ERROR_STOP=1 --no-psqlrc --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
  -v db="$POSTGRES_DB" <<'SQL'
\getenv owner_pw PG_OWNER_PASSWORD
\getenv batch_pw PG_BATCH_PASSWORD
\getenv cdc_pw PG_CDC_PASSWORD
\getenv app_pw PG_APP_PASSWORD
\getenv features_pw PG_FEATURES_PASSWORD
\getenv serving_pw PG_SERVING_PASSWORD
-- Owns the lending schema and its tables (`lakehouse seed`); nothing else logs in as it.
-- CREATE on the database: seed's `CREATE SCHEMA IF NOT EXISTS` is checked against it even
-- when the schema exists.
CREATE ROLE lakehouse_owner LOGIN PASSWORD :'owner_pw';
CREATE SCHEMA lending AUTHORIZATION lakehouse_owner;
GRANT CREATE ON DATABASE :"db" TO lakehouse_owner;

-- Batch extraction (the pipeline): reads the tables (its fence is its own snapshot's
-- xmin, which needs no privilege).
CREATE ROLE lakehouse_batch LOGIN PASSWORD :'batch_pw';
GRANT USAGE ON SCHEMA lending TO lakehouse_batch;
ALTER DEFAULT PRIVILEGES FOR ROLE lakehouse_owner IN SCHEMA lending
    GRANT SELECT ON TABLES TO lakehouse_batch;

-- The CDC stream: replication slots; CREATE PUBLICATION ... FOR TABLE needs the tables'
-- ownership and CREATE on the database, both by membership of lakehouse_owner.
CREATE ROLE lakehouse_cdc LOGIN REPLICATION PASSWORD :'cdc_pw' IN ROLE lakehouse_owner;

-- The application (the change simulator): reads and writes rows, changes no schema.
CREATE ROLE lakehouse_app LOGIN PASSWORD :'app_pw';
GRANT USAGE ON SCHEMA lending TO lakehouse_app;
ALTER DEFAULT PRIVILEGES FOR ROLE lakehouse_owner IN SCHEMA lending
    GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO lakehouse_app;
ALTER DEFAULT PRIVILEGES FOR ROLE lakehouse_owner IN SCHEMA lending
    GRANT USAGE ON SEQUENCES TO lakehouse_app;

-- The online store: the pipeline's Materialize creates and writes its tables, the stream
-- (--promote) keeps the rows of changed entities fresh.
CREATE ROLE lakehouse_features LOGIN PASSWORD :'features_pw';
CREATE SCHEMA lending_online AUTHORIZATION lakehouse_features;

-- The prediction API: reads the online store, nothing else.
CREATE ROLE lakehouse_serving LOGIN PASSWORD :'serving_pw';
GRANT USAGE ON SCHEMA lending_online TO lakehouse_serving;
ALTER DEFAULT PRIVILEGES FOR ROLE lakehouse_features IN SCHEMA lending_online
    GRANT SELECT ON TABLES TO lakehouse_serving;
SQL
