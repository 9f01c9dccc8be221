"""VideoAR sampling (issue 8): KV-cached next-frame / next-scale decoding, guidance, video files.

Module map (each module's docstring states its design decision):

- ``config``: ``SamplingConfig`` (guidance schedule, temperature, top-p, frames, seed, engine knobs).
- ``cfg``: temporal-spatial classifier-free guidance schedules, γ·cond + (1 − γ)·uncond on logits.
- ``bits``: per-bit temperature / top-p sampling from counter-based random numbers (per-sample streams).
- ``sampler``: ``VideoARSampler``, the KV-cached decode loop (static buffers, one CUDA graph per shape).
- ``extend``: videos longer than a window, video-to-video and image-to-video by frame re-encoding.
- ``loading``: checkpoint + tokenizer → sampler, with the tokenizer-hash check.
- ``video_io``: mp4 / GIF grid / PNG sheet writing, video and image inputs.
"""
