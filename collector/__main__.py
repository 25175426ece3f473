"""`python -m collector` is the same as the `collect` command."""

from collector.cli import main

raise SystemExit(main())
