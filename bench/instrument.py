"""`StageRecorder`: the benchmark's view of a generate() call, through the public stage API.

    rec = pipe.add_observer(StageRecorder(pipe.device))
    try:
        pipe.generate(...)
    finally:
        pipe.remove_observer(rec)
    rec.seconds['step'], rec.step_experts, rec.x0

Each stage the pipeline announces (wan/utils/timing.py: `text_encode`, `expert_switch`,
`step`, `decode`, `vae_decode`) is timed with the shared `Timer`: wall time on the CPU, CUDA
events bracketed by synchronisation on a GPU, so a stage's time holds exactly the device work
queued inside it.
"""
from __future__ import annotations

from typing import Any, ContextManager, Dict, List, Optional

import torch

from wan.utils.timing import STAGES, PipelineObserver, Timer

__all__ = ['StageRecorder']


class StageRecorder(PipelineObserver):
    """Seconds of every announced stage, the expert of every step and the last final latent.

    `seconds[name]` lists the stage's times in order (every generate() call appends);
    `step_experts[i]` is 'high' or 'low' for `seconds['step'][i]`; `x0` is the latent of the
    last decode, as float32 on the CPU.
    """

    def __init__(self, device: torch.device | str):
        self.timer = Timer(device)
        self.seconds: Dict[str, List[float]] = {name: [] for name in STAGES}
        self.step_experts: List[str] = []
        self.x0: Optional[torch.Tensor] = None
        self._open: Dict[str, ContextManager[None]] = {}

    def stage_started(self, name: str, info: Dict[str, Any]) -> None:
        region = self.timer(self.seconds.setdefault(name, []))
        region.__enter__()
        self._open[name] = region

    def stage_finished(self, name: str, info: Dict[str, Any]) -> None:
        region = self._open.pop(name, None)
        if region is None:
            return
        region.__exit__(None, None, None)
        if name == 'step':
            self.step_experts.append(info['expert'])
        elif name == 'decode' and info.get('latent') is not None:
            # after the timed region, as the copy is not part of the stage
            self.x0 = info['latent'].detach().float().cpu()
