"""``python -m videoar_megatron.cli COMMAND ...``: the ``videoar`` console script without installing."""
import sys

from videoar_megatron.cli import main

sys.exit(main())
