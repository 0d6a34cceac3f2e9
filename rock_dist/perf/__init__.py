"""Performance measurements: the data-pipeline benchmark (`data_bench`) and the pieces `python -m rock_dist.bench`
assembles into one report (issue 6)."""
