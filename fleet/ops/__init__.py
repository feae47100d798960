"""Deploying, watching and running a fleet: deploy, watch, demo, the local process fleet
and `secure init`."""
