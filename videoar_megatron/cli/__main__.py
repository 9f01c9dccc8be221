"""`python -m videoar_megatron.cli ...` runs the `videoar` command."""
import sys

from videoar_megatron.cli import main

sys.exit(main())
