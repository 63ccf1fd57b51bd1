"""`python -m mirror` runs the command line."""
from mirror.cli import main

raise SystemExit(main())
