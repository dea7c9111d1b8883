"""Stage timing shared by the pipelines, the benchmark and the diagnostics.

- `Timer`: wall time on the CPU; on a GPU, CUDA events bracketed by synchronisation, so that a
  timed region holds exactly the device work queued inside it.
- `PipelineObserver`: what a pipeline tells about its stages. `WanT2V.generate` announces each
  stage (`text_encode`, `expert_switch`, `step`, `decode`, `vae_decode`) through
  `WanT2V.stage`; an observer added with `WanT2V.add_observer` sees every start and finish,
  with the stage's details (the expert of a step, the final latent of a decode). The
  benchmark's stage recorder is one such observer; nothing wraps the pipeline's methods.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List

import torch

__all__ = ['Timer', 'PipelineObserver', 'STAGES']

# the stages a generate() call announces, in order (`vae_decode` runs inside `decode`)
STAGES = ('text_encode', 'expert_switch', 'step', 'decode', 'vae_decode')


class Timer:
    """`with timer(out): ...` appends the region's seconds to the list `out`."""

    def __init__(self, device: torch.device | str):
        self.cuda = torch.device(device).type == 'cuda'

    @contextmanager
    def __call__(self, out: List[float]) -> Iterator[None]:
        if self.cuda:
            torch.cuda.synchronize()
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            torch.cuda.synchronize()
            out.append(start.elapsed_time(end) / 1000.0)
        else:
            t0 = time.perf_counter()
            yield
            out.append(time.perf_counter() - t0)


class PipelineObserver:
    """Base class of the objects that follow a pipeline's stages (override what you need).

    `info` is the dict the stage was announced with; the pipeline may add to it before the
    stage finishes (e.g. `decode` carries `latent`, the final latent it decodes).
    """

    def stage_started(self, name: str, info: Dict[str, Any]) -> None:
        pass

    def stage_finished(self, name: str, info: Dict[str, Any]) -> None:
        pass
