"""``python -m worker``: the same as the ``pabx-worker`` command."""

from worker.cli import main

main()
