"""The benchmarks of the running system (`edvit bench ...`); common.py holds what they
share."""
