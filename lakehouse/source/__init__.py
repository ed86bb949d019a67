"""The source Postgres: schema, embedded cluster, seeding, simulation and extraction."""
