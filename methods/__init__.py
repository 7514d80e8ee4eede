"""Method plugins, one module per family. Each module registers its methods with
``bench.registry.register``; the harness discovers them through the registry only."""
