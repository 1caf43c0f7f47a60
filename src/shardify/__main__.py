"""`python -m shardify` is the same as the `shardify` command."""

import sys

from .cli import main

sys.exit(main())
