"""`python -m kdzoo ...` is the `kdzoo` command."""
import sys

from kdzoo.cli import main

sys.exit(main())
