"""``python -m lmlab.bench``: see :mod:`lmlab.bench`."""

from lmlab.bench import main

main()
