"""``python -m clearway.gateway`` (see ``_cli.py``)."""

from clearway.gateway._cli import main

raise SystemExit(main())
