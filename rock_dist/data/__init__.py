"""The streaming data pipeline that feeds training and evaluation: shard sources, the epoch plan, decoding and
augmentation, collation. Also the shard format's shared contract (`constants`, `manifest`, `npy_member`), which the
shard builder (`rock_dist.shardbuild`) writes and this package reads. It never imports the builder or the synthetic
renderers (`rock_dist.synthetic`): data flows official files -> shards -> batches (docs/architecture.md)."""
