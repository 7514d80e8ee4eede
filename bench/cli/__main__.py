"""``python -m bench.cli``: the ``tdbench`` command."""
import sys

from bench.cli import main

sys.exit(main())
