"""`python -m modelzoo <command> [overrides]`."""

from modelzoo.cli import main

main()
