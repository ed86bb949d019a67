"""A single-node lakehouse for machine learning: Postgres to Delta Lake bronze, silver and gold."""

__version__ = "0.1.0"
