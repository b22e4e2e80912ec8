"""`python -m harmony render [--date YYYY-MM-DD]` and `python -m harmony parse` (see harmony.cli)."""

from harmony.cli import main

raise SystemExit(main())
