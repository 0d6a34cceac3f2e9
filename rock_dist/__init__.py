"""rock_dist: distributed training of ROCK (SSD + residual auxiliary block) on NYU Depth v2.

The package is organised as data → model → engine, with thin command-line entry points
`python -m rock_dist.{shards,train,evaluate,detect,export,bench}`, also installed as console scripts (`rock-shards`,
`rock-train`, ...; rock_dist/scripts.py).
"""

# The one version source: pyproject.toml reads it ([tool.setuptools.dynamic]).

__version__ = "0.1.0"
