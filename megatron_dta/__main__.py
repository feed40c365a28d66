"""`python -m megatron_dta` is the `megatron-dta` command."""

import sys

from megatron_dta.cli import main

sys.exit(main())
