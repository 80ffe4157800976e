"""`python -m tunesmith` (and `accelerate launch -m tunesmith ...`) runs the CLI."""

import sys

from .cli import main

sys.exit(main())
