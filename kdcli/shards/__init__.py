"""Shard format v1: HDF5 shards + manifest.parquet + dataset.json. See README, "Shard format"."""
