"""``python -m proxy``: the ``pgscope`` command (proxy.cli.main)."""

from proxy.cli import main

raise SystemExit(main())
