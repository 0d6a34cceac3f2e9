"""Synthetic NYUv2 look-alikes written in the official file layout, for the quickstart, tests and benchmarks: the
layout writer and random test sets (`official_layout`), and the ray-cast rooms (`rooms`, `scenes`, `geometry`).
Tooling, not the training path: neither `rock_dist.data` nor the engine or model import it."""
