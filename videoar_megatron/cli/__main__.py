"""``python -m videoar_megatron.cli ...`` (and ``torchrun -m videoar_megatron.cli ...``) = ``videoar ...``."""
import sys

from videoar_megatron.cli import main

sys.exit(main())
