"""Zone builders: the I/O around the pure transforms (Postgres, Delta tables, DuckDB)."""
