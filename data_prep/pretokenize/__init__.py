"""Pre-tokenization: videos → DALI clips → tokenizer latents and multi-scale bits → MDS shards.

Design decisions:
- **Partitions, not ranks, are the unit of work and of restart.** The input manifest is cut into
  ``num_partitions`` contiguous slices (default: one per worker); worker ``i`` of ``n`` (torchrun rank,
  SLURM array task, or both combined) owns partitions ``p`` with ``p % n == i``. Each partition is
  written into ``.tmp-part-…``, committed (marker written last) and renamed to ``part-…``. A rerun
  skips committed partitions and redoes the others from scratch, so its output is byte-identical to
  an uninterrupted run. More partitions than workers make restarts cheaper and let a rerun use a
  different number of workers.
- **No collectives.** Workers never talk to each other: the run manifest is created with an atomic
  hard link (one creator, every other worker compares), and whichever worker finds every partition
  committed merges the indexes (merging is deterministic and atomic, so a race writes the same
  bytes). The same code runs under torchrun, a SLURM array, or a single process.
- **Everything in input order.** Probing runs in a thread pool and decoding in several decoder threads,
  but results are consumed in manifest order and encoded in fixed batches, so the shards do not
  depend on timing nor on which decoder took a clip. Rejects are sorted by (manifest row, clip start).
- **Honest rejects.** A video that is missing, unreadable, too short or in a codec the decode device
  cannot handle goes to ``rejects.jsonl`` with the reason (probe stage, whole video); a clip that
  fails to decode or decodes to fewer frames goes there with its clip start. Nothing is substituted.

Where each stage lives (one file per stage, in pipeline order; docs/pretokenize.md has the same map):

- ``config.py``: ``PretokenizeConfig``, the recipe's knobs and the checks that need only the recipe.
- ``worker.py``: ``Worker``, ``worker_from_env``: this process's slot (torchrun, srun, SLURM array).
- ``clip_stream.py``: ``ClipStream``: probe → plan → decode in manifest order, ``Reject``; its threads
  (probe pool, background thread) are ``threads.py``.
- ``decoders.py``: ``DecoderLanes``: the decoders (DALI pipelines on NVDEC or the CPU, PyAV decoders),
  each a thread pulling videos from one queue; which took a clip changes no byte.
- ``decode_process.py``: ``DecodeProcess``: the same decoders in a spawned process of their own
  (``decode_process``; its own CUDA context), frames back over CUDA IPC or shared memory.
- ``encoder.py``: ``ClipEncoder`` (tokenizer encoder → stored latents, BSQ bits, text features) and
  ``EncoderGraph`` (the encoder as one CUDA graph).
- ``writer.py``: ``PartitionWriter``: a partition → MDS shards + rejects, committed; ``DecoderBroken``.
- ``run_manifest.py``: ``build_run_manifest``: manifest.json, what fixes the bytes (content hashes).
- ``pipeline.py``: ``Pretokenizer``, one worker's run (builds the stages, writes its partitions,
  merges), and ``merge_only``.

The tokenizer comes from the caller (``Pretokenizer(cfg, worker, tokenizer.load_tokenizer)``):
``data_prep`` sits below ``tokenizer`` and uses it only through :mod:`data_prep.tokenizer_api`.
"""
