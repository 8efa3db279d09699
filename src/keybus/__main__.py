"""``python -m keybus``: the command line."""

from keybus.cli import main

main()
