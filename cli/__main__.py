"""``python -m cli``: the same as the ``edgefleet`` command."""

from cli.main import main

main()
