"""CDC streaming from Postgres logical replication into bronze (Bytewax); see issue 3."""
