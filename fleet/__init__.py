"""The operator's wing, torch-free, one room per concern:

- ops/: deploy, watch, demo, the local process fleet (LocalFleet) and `secure init`;
- bench/: the benchmarks (`edvit bench ...`) and what they share (common.py);
- chaos/: the chaos scenarios (`edvit bench chaos`) and the hostile-payload fuzzer;
- boards/: edge nodes on emulated boards (`edvit fleet ...`), their kernel plumbing and
  link proxy;
- dashboard/: `edvit dashboard`, the web app and its static files;
- bundles/: the shipped Fashion-MNIST bundle (package data).

Placement (devices, assignment, the assignment file) lives in edvit.placement, shared with
models/; the planner that heals placements runs in the aggregator (edvit.aggregator.planner).
"""
