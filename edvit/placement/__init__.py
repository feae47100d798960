"""Placing sub-models on devices: the device inventory (devices.py), the assignment
(assignment.py) and a bundle's assignment.json with the `edvit plan` command (plan.py).

Shared runtime: models/ places while it builds, fleet/ deploys what was placed and the
aggregator's planner re-places when nodes go down; none of them imports another for it.
"""
