"""Flow-matching Euler scheduler: x_{i+1} = x_i + (sigma_{i+1} - sigma_i) * v_i.

The first-order ODE step of rectified flow, used by few-step distilled models such as the
Wan2.2-Lightning LoRAs (wan/configs/presets.py). It shares the schedule handling, step-index
rules and API of the UniPC and DPM++ schedulers (`FlowSchedulerBase`); only the timesteps
differ in one convention, explained in `FlowEulerScheduler.set_timesteps`.
"""

from __future__ import annotations

import logging
from typing import Any, Optional, Union

import numpy as np
import torch

from .fm_solvers import (DeviceLike, FlowSchedulerBase, SchedulerConfig, SchedulerOutput,
                         build_inference_sigmas)

__all__ = ['FlowEulerScheduler']

logger = logging.getLogger(__name__)


class FlowEulerScheduler(FlowSchedulerBase):
    """Euler sampler for flow-matching models (velocity prediction, final sigma 0).

    Per step i with velocity v_i: x_{i+1} = x_i + (sigma_{i+1} - sigma_i) * v_i, in float32,
    returned in the dtype of ``sample``. On a straight flow x_t = (1 - sigma) x0 + sigma * n,
    whose velocity is n - x0 everywhere, every step lands on that flow and the last one
    (sigma_N = 0) on x0, whatever the schedule.
    """

    def __init__(self, num_train_timesteps: int = 1000, shift: Optional[float] = 1.0,
                 use_dynamic_shifting: bool = False) -> None:
        if shift is None:
            shift = 1.0
        self.config = SchedulerConfig(num_train_timesteps=num_train_timesteps, shift=shift,
                                      use_dynamic_shifting=use_dynamic_shifting,
                                      solver_order=1, prediction_type='flow_prediction',
                                      final_sigmas_type='zero')
        self._init_schedule()

    def reset(self) -> None:
        """Forget the step index (a new generation starts); Euler keeps no history."""
        self._step_index: Optional[int] = None

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device: DeviceLike = None,
                      sigmas: Optional[Any] = None, mu: Optional[float] = None,
                      shift: Optional[float] = None) -> None:
        """Build the schedule: sigmas s_i = linspace(1, 0, N + 1)[:N] (or custom ``sigmas``),
        shifted by shift * s / (1 + (shift - 1) * s) (``shift`` defaults to the constructor's;
        with use_dynamic_shifting the ``mu`` time shift instead), then a final 0.

        ``sigmas``: float32, with the final 0, on the CPU. ``timesteps``: float32
        sigma * num_train_timesteps, unrounded, on ``device``. The UniPC and DPM++ schedulers
        truncate their timesteps to int64 (the reference does); the Lightning recipe feeds the
        model the float values, e.g. 1000, 937.5, 833.333, 625 for 4 steps at shift 5, which
        int64 would turn into 1000, 937, 833, 625, a different time embedding. The expert
        switch (t >= boundary * 1000) picks the same expert for both. Unlike UniPC's default
        schedule, which starts at the training table's fp32 sigma_max (0.999, timestep 999),
        the schedule starts at sigma 1 (timestep 1000), as DPM++'s get_sampling_sigmas does.
        Sigmas are computed in float64 and rounded once to float32, as for the other two; the
        Lightning code computes in float32, which gives the same bits for its 4-step schedule
        and can differ in the last bit for others.
        """
        if shift is None:
            shift = self.config.shift
        if sigmas is None:
            if num_inference_steps is None:
                raise ValueError('set_timesteps needs either num_inference_steps or sigmas')
            if int(num_inference_steps) < 1:
                raise ValueError(f'num_inference_steps must be >= 1, got {num_inference_steps}')
            sigmas = np.linspace(1.0, 0.0, int(num_inference_steps) + 1)[:-1]
        inference_sigmas = build_inference_sigmas(None, sigmas, self.sigma_max, self.sigma_min,
                                                  shift, self.config.use_dynamic_shifting, mu)
        self.sigmas = torch.from_numpy(
            np.concatenate([inference_sigmas, [0.0]]).astype(np.float32))
        self.timesteps = torch.from_numpy(
            (inference_sigmas * self.config.num_train_timesteps).astype(np.float32)).to(device)
        self.num_inference_steps = len(inference_sigmas)
        self._begin_index = None
        self.reset()

    def step(self, model_output: torch.Tensor, timestep: Union[float, torch.Tensor],
             sample: torch.Tensor, return_dict: bool = True,
             generator: Optional[torch.Generator] = None) -> Union[SchedulerOutput, tuple]:
        """Advance ``sample`` by one Euler step given the velocity ``model_output``.

        ``generator`` is accepted for compatibility and unused (ODE solver). Returns
        ``SchedulerOutput(prev_sample)`` or ``(prev_sample,)``.
        """
        i = self._begin_step(timestep)
        dt = self.sigmas[i + 1] - self.sigmas[i]  # 0-dim fp32 on the CPU, as the other two
        prev_sample = (sample.to(torch.float32) + dt * model_output.to(torch.float32)
                       ).to(sample.dtype)
        self._step_index += 1
        if not return_dict:
            return (prev_sample,)
        return SchedulerOutput(prev_sample=prev_sample)
