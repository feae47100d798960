"""Chaos: the fault scenarios of `edvit bench chaos` (scenarios.py) and the hostile payloads
of its `hostile` scenario (fuzz.py)."""
