"""Run under torchrun: every rank pre-tokenizes its own partitions of one manifest into one directory
(no process group: workers never talk; the manifest and the merge are race-free by construction)."""
from __future__ import annotations

import sys
from pathlib import Path

from data_prep.pretokenize.worker import worker_from_env
from tests.pretok_helpers import pretok_config, pretokenizer

tok, corpus, out = (Path(a) for a in sys.argv[1:4])
worker = worker_from_env()
assert worker.count == 2 and worker.launcher == "torchrun", worker
pretokenizer(pretok_config(tok, corpus, out, num_partitions=0), worker).run()
