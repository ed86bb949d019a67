"""The ML side of the lakehouse: Feast over gold, the online store, models and serving.

Imports go one way: `lakehouse.ml` uses the batch core (settings, storage, zones,
transforms); the core never imports `lakehouse.ml`. The entry points (`lakehouse.cli`,
the Luigi `tasks`, `stream`) use both, and `feature_repo` (the Feast repository the
`feast` CLI reads) builds its objects from `lakehouse.ml.definitions`.
"""
