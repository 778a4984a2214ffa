"""`python -m meshnode.cli`: the `meshnode` command."""

import sys

from meshnode.cli.main import main

sys.exit(main())
