"""``python -m lmlab.bench``: see :mod:`lmlab.bench`."""

from . import main

main()
