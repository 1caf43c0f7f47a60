"""shardify: zips of images and labels → battery-grouped WebDataset shards + Parquet manifest."""

__version__ = "0.1.0"
