"""Run under torchrun: `videoar tokenizer train` with the given arguments; exit with its code."""
import sys

from videoar_megatron.cli import main

sys.exit(main(["tokenizer", "train", *sys.argv[1:]]))
