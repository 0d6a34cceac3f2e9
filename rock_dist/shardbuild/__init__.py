"""From the official NYU Depth v2 files to shards: the reader of the official layout (`nyuv2`) and the sample
encoding and tar writing (`shard_writer`), driven by `python -m rock_dist.shards`. Imports only the shard format's
shared contract from `rock_dist.data` (constants, manifest, npy members), never the streaming pipeline."""
