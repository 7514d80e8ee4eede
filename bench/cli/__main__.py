"""``python -m bench.cli``: the ``tdbench`` command."""
import sys

from bench.cli import main

if __name__ == "__main__":   # not when a spawned helper process imports it
    sys.exit(main())
