"""``python -m fastmeta``: the ``fastmeta`` command line."""
import sys

from fastmeta.cli import main

if __name__ == "__main__":
    sys.exit(main())
