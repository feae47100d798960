"""Edge nodes on emulated boards (`edvit fleet up|down|status`): the boards (boards.py), the
kernel plumbing (emulation.py) and the link proxy (proxy.py)."""
