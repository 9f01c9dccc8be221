"""The ``videoar`` command: one console script, one subcommand per stage.

Dispatch is two-stage so that ``videoar --help`` stays instant: the top level only knows each
subcommand's module and one-line summary; the chosen module builds its own parser (with every knob
explained) and runs. Entry-point modules parse, build, run and clean up; the library has no argparse.

Exit codes follow one rule for every subcommand (``videoar_common.exit_codes``), applied here rather than
in each command: a refused input (an :class:`~videoar_common.exit_codes.InputError`, which the project's
recipe, checkpoint, tokenizer, shard and manifest errors derive from, or a missing file) becomes one line
``videoar COMMAND: <message naming the path or knob>`` on stderr and exit 2, without a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from videoar_common.exit_codes import EXIT_CONFIG, InputError

# name → (module with `main(argv, prog)`, summary). Add a subcommand only when it works. Module names
# must not shadow top-level packages (`tokenizer`, `data_prep`): running cli/__main__.py as a script
# puts this directory first on sys.path.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("videoar_megatron.cli.demo", "the whole pipeline on a synthetic corpus, on CPU, with a report"),
    "synth": ("videoar_megatron.cli.synth", "write a synthetic class-labelled video corpus (PyAV)"),
    "pretokenize": ("videoar_megatron.cli.pretokenize", "videos → DALI clips → tokenizer bits + latents → MDS token shards"),
    "shards": ("videoar_megatron.cli.shards", "inspect token shards (counts, shapes, rejects, PNG) or merge partitions"),
    "transcode": ("videoar_megatron.cli.transcode", "re-encode videos DALI cannot decode on the target device (PyAV)"),
    "manifest": ("videoar_megatron.cli.manifest", "build an input manifest for a known corpus (UCF-101 splits)"),
    "sample": ("videoar_megatron.cli.sample", "sample videos from an AR checkpoint (KV cache, CFG, V2V/I2V)"),
    "eval": ("videoar_megatron.cli.eval", "gFVD of an AR checkpoint, tokenizer rFVD/PSNR/SSIM, real-set statistics"),
    "train": ("videoar_megatron.cli.train", "train the VideoAR transformer on token shards (Megatron-core TP x PP x DP)"),
    "tokenizer": ("videoar_megatron.cli.tokenizer_cmd",
                  "train | eval | inflate the 3D causal multi-scale BSQ video tokenizer (DeepSpeed)"),
}


ACTION_SUBCOMMANDS = ("eval", "manifest", "shards", "tokenizer")
"""Subcommands whose first argument is an action (``videoar eval fvd``); error lines name it."""


def _top_level_parser() -> argparse.ArgumentParser:
    lines = [f"  {name:<12} {summary}" for name, (_, summary) in SUBCOMMANDS.items()]
    return argparse.ArgumentParser(
        prog="videoar",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="videoar-megatron: distributed pretraining stack for VideoAR "
                    "(next-frame, next-scale video generation).",
        epilog="commands:\n" + "\n".join(lines) + "\n\nRun `videoar COMMAND --help` for a command's options.",
        usage="videoar COMMAND [options]")


def _quiet_dependency_noise() -> None:
    """Hide import-time notices of optional dependencies (they repeat on every command and rank)."""
    import logging
    import warnings
    warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex) (and Apex )?(is|are) not installed.*")
    warnings.filterwarnings("ignore", message=r".*full scope is deprecated.*")
    # Megatron-core's dist_checkpointing (0.16) saves and loads through torch.distributed.checkpoint's
    # ShardedTensor path and its deprecated load_state_dict; the warnings name lines inside those two
    # libraries, and there is no call of ours to change.
    warnings.filterwarnings("ignore", category=FutureWarning, message=r"Please use DTensor instead and we are "
                                                                      r"deprecating ShardedTensor")
    warnings.filterwarnings("ignore", category=FutureWarning, message=r"`load_state_dict` is deprecated")
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _quiet_dependency_noise()
    if not argv or argv[0] in ("-h", "--help"):
        _top_level_parser().print_help()
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        _top_level_parser().print_usage(sys.stderr)
        print(f"videoar: unknown command '{name}'; choose from: {', '.join(SUBCOMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    try:
        return int(module.main(rest, prog=f"videoar {name}") or 0)
    except (InputError, FileNotFoundError, NotADirectoryError) as e:
        print(f"{_label(name, rest)}: {_one_line(e)}", file=sys.stderr)
        return EXIT_CONFIG


def _label(name: str, rest: list[str]) -> str:
    """``videoar tokenizer train`` for subcommands whose first argument picks an action."""
    action = rest[0] if name in ACTION_SUBCOMMANDS and rest and not rest[0].startswith("-") else ""
    return " ".join(filter(None, ("videoar", name, action)))


def _one_line(error: BaseException) -> str:
    return "; ".join(line.strip() for line in str(error).splitlines() if line.strip())


if __name__ == "__main__":
    sys.exit(main())
