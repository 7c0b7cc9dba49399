"""``python -m training <step>``; see ``training/cli.py``."""

from training.cli import main

raise SystemExit(main())
