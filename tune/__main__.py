"""``python -m tune --config F [--ray-address A] [--no-ray]``: see tune/main.py."""

from tune.main import main

raise SystemExit(main())
