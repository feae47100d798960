"""The benchmarks of the running system (`edvit bench ...`); common.py holds what they
share. This module stays light: the command line reads its defaults without loading a bench."""

WARMUP_S = 2.0  # of camera load before a bench starts counting
