"""tdbench: the benchmark harness for text diffusion language models.

The harness (this package) owns data, the shared backbone, the training loop, the evaluation
protocol, launching, run records and leaderboards. Methods live in the separate ``methods``
package (and in third-party packages) and are found only through :mod:`bench.registry`.
"""
__version__ = "0.1.0"
