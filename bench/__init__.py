"""qvmd benchmarks: what users feel, against baselines measured in the same run.

Run as root from the repository root: `python -m bench.run [--quick]`.
"""
