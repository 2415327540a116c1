"""``python -m eqx_norm.demo``: see :mod:`eqx_norm.demo`."""

from ._cli import main

raise SystemExit(main())
