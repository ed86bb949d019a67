"""Pure transforms: Polars frames in, Polars frames out (or DuckDB SQL text); no I/O."""
