"""NYUv2 readers and writers, shard building, and the WebDataset pipeline that feeds training."""
