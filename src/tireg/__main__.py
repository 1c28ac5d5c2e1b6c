"""``python -m tireg``: the ``tireg`` command (:func:`tireg.cli.main`), where the script is not on the path."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
