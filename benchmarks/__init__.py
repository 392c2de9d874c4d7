"""Benchmarks of the optipfair library: slower and noisier than tests, with committed results.

Run each from the repository root as a module, e.g. `python -m benchmarks.quality --help`;
benchmarks/README.md says what each one measures and holds its latest figures.
"""
