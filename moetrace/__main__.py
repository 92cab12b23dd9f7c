"""``python -m moetrace ...``, the same as the ``moetrace`` command."""

from moetrace.cli import main

main()
