"""`python -m dinotrain ...` (what `torchrun -m dinotrain train ...` runs)."""

import sys

from dinotrain.cli import main

sys.exit(main())
