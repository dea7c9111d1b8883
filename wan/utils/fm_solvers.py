"""Flow-matching DPM-Solver++ scheduler and the sampling-sigma helpers.

This is the ODE (deterministic) multistep DPM-Solver++ of Lu et al. adapted to rectified flow:
the model predicts a velocity v, the data prediction is x0 = x - sigma * v, and the
"noise schedule" is alpha = 1 - sigma with half-log-SNR lambda = ln(alpha) - ln(sigma).
docs/SOLVERS.md (#sigma-schedule, #dpm-solver) states the facts this module reproduces;
the upstream counterpart is Wan2.2's wan/utils/fm_solvers.py.

The module also holds the pieces shared with ``fm_solvers_unipc`` (configuration object,
step output, sigma shifting, step-index search) so both schedulers behave identically there.
"""

from __future__ import annotations

import inspect
import logging
import math
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence, Union

import numpy as np
import torch

__all__ = [
    'FlowDPMSolverMultistepScheduler',
    'FlowSchedulerBase',
    'SchedulerConfig',
    'SchedulerOutput',
    'get_sampling_sigmas',
    'retrieve_timesteps',
]

logger = logging.getLogger(__name__)

DeviceLike = Union[str, torch.device, None]


# ---------------------------------------------------------------------------------------------
# Shared helpers (also imported by fm_solvers_unipc)
# ---------------------------------------------------------------------------------------------


class SchedulerConfig(dict):
    """The constructor arguments of a scheduler, readable as attributes or as dict items.

    Users of the reference read e.g. ``scheduler.config.num_train_timesteps``; diffusers'
    config is a frozen dict with attribute access, so this mimics that.
    """

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError as exc:
            raise AttributeError(name) from exc

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError('scheduler config is read-only; build a new scheduler instead')


@dataclass
class SchedulerOutput:
    """Result of ``step()``: ``prev_sample`` is the sample at the next (lower) noise level."""

    prev_sample: torch.Tensor

    def __getitem__(self, index: int) -> torch.Tensor:
        # Allows ``out[0]`` like the tuple returned with return_dict=False.
        return self.to_tuple()[index]

    def to_tuple(self) -> tuple:
        return (self.prev_sample,)


def shift_sigmas(sigmas: Any, shift: float) -> Any:
    """The flow "shift" transform s -> shift*s / (1 + (shift-1)*s) (works on numpy and torch)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def time_shift(mu: float, sigma_exp: float, t: np.ndarray) -> np.ndarray:
    """Resolution-dependent ("dynamic") shift: e^mu / (e^mu + (1/t - 1)^sigma_exp)."""
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1)**sigma_exp)


def training_sigmas(num_train_timesteps: int, shift: float,
                    use_dynamic_shifting: bool) -> torch.Tensor:
    """The training sigma table, descending from 1 - 1/N (0.999 for N = 1000) to 0, in fp32.

    Built exactly as the reference does (float64 linspace, then fp32, then the shift in fp32)
    because ``sigma_max = sigmas[0]`` seeds the default inference schedule: its fp32 rounding
    (0.9990000128746033) determines the first integer timestep (999).
    """
    alphas = np.linspace(1, 1 / num_train_timesteps, num_train_timesteps)[::-1].copy()
    sigmas = torch.from_numpy(1.0 - alphas).to(dtype=torch.float32)
    if not use_dynamic_shifting:
        sigmas = shift_sigmas(sigmas, shift)
    return sigmas


def check_unsupported(name: str, value: Any, allowed: Iterable[Any]) -> None:
    """Raise a clear ValueError for a reference keyword set to a value this project lacks."""
    allowed = list(allowed)
    if value not in allowed:
        raise ValueError(f'{name}={value!r} is not supported by this implementation '
                         f'(supported: {", ".join(repr(a) for a in allowed)})')


def build_inference_sigmas(
    num_inference_steps: Optional[int],
    sigmas: Optional[Any],
    sigma_max: float,
    sigma_min: float,
    shift: float,
    use_dynamic_shifting: bool,
    mu: Optional[float],
) -> np.ndarray:
    """Inference sigmas (without the final 0) in float64 (docs/SOLVERS.md#sigma-schedule).

    Custom ``sigmas`` are shifted too (with the identity shift 1 in the reference's DPM++ use,
    where get_sampling_sigmas already applied the real shift).
    """
    if use_dynamic_shifting and mu is None:
        raise ValueError('use_dynamic_shifting=True needs a value for `mu` in set_timesteps')
    if sigmas is None:
        if num_inference_steps is None:
            raise ValueError('set_timesteps needs either num_inference_steps or sigmas')
        if int(num_inference_steps) < 1:
            raise ValueError(f'num_inference_steps must be >= 1, got {num_inference_steps}')
        sigmas = np.linspace(sigma_max, sigma_min, int(num_inference_steps) + 1)[:-1]
    else:
        if isinstance(sigmas, torch.Tensor):
            sigmas = sigmas.detach().cpu().numpy()
        sigmas = np.asarray(sigmas, dtype=np.float64).reshape(-1)
        if sigmas.size < 1:
            raise ValueError('custom sigmas must not be empty')
    if use_dynamic_shifting:
        return np.asarray(time_shift(mu, 1.0, sigmas), dtype=np.float64)
    return np.asarray(shift_sigmas(sigmas, shift), dtype=np.float64)


def leading_duplicate_error(timesteps: torch.Tensor, num_steps: int,
                            shift: Optional[float]) -> Optional[str]:
    """Message for the reference's duplicate-first-timestep trap, or None if it cannot occur.

    The reference looks up the step index on the first ``step()`` by value and takes the
    *second* match when the value occurs twice. If the first two integer timesteps coincide
    (from N = 92 at shift 12, both truncate to 999) the index starts at 1, the run goes one step
    past the schedule and the reference fails with an assertion/IndexError on the last step.
    We keep the indexing rule but refuse the schedule up front, before any model work is done.
    """
    if timesteps.numel() >= 2 and int(timesteps[0]) == int(timesteps[1]):
        shift_txt = f' at shift {shift:g}' if shift is not None else ''
        return (f'{num_steps} steps{shift_txt} gives duplicate leading timesteps '
                f'({int(timesteps[0])}, {int(timesteps[1])}); the reference step-index rule would '
                f'start at the second one and fail on the last step. Use fewer steps or a '
                f'smaller shift.')
    return None


def find_step_index(timestep: Any, schedule: torch.Tensor, strict: bool = True) -> int:
    """Index of ``timestep`` in ``schedule`` with the reference rule (second match if repeated).

    Raises ValueError when the timestep is not in the schedule. With ``strict`` (used to start
    a sampling run) a repeated timestep raises too: taking the second match, as the reference
    does, makes a full loop over the timesteps run past the end of the schedule, so it is
    reported up front instead of failing obscurely on the last step.
    """
    t = torch.as_tensor(timestep).to(schedule.device)
    if t.numel() != 1:
        raise ValueError(f'expected a single timestep, got shape {tuple(t.shape)}')
    matches = (schedule == t.reshape(())).nonzero()
    if len(matches) == 0:
        raise ValueError(f'timestep {t.item()} is not in the scheduler timesteps')
    # Reference rule: with several matches the second one is taken.
    index = int(matches[1 if len(matches) > 1 else 0].item())
    if strict and len(matches) > 1:
        raise ValueError(
            f'timestep {t.item()} occurs {len(matches)} times in the schedule; the reference '
            f'starts at its second occurrence (index {index}) and then runs past the last '
            f'step. Use fewer steps or a smaller shift.')
    return index


def sigma_to_alpha_sigma(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flow matching: x_t = alpha*x0 + sigma*noise with alpha = 1 - sigma."""
    return 1 - sigma, sigma


def half_log_snr(sigma: torch.Tensor) -> torch.Tensor:
    """lambda = ln(alpha) - ln(sigma); -inf at sigma = 1 and +inf at sigma = 0 (both used)."""
    alpha, sigma = sigma_to_alpha_sigma(sigma)
    return torch.log(alpha) - torch.log(sigma)


# ---------------------------------------------------------------------------------------------
# Public helpers of the reference module
# ---------------------------------------------------------------------------------------------


def get_sampling_sigmas(sampling_steps: int, shift: float) -> np.ndarray:
    """DPM++ sampling sigmas: linspace(1, 0, steps + 1)[:steps], then the shift transform.

    Float64; the first value is exactly 1.0 (so the first integer timestep is 1000).
    """
    sigma = np.linspace(1, 0, sampling_steps + 1)[:sampling_steps]
    return shift_sigmas(sigma, shift)


def retrieve_timesteps(
    scheduler: Any,
    num_inference_steps: Optional[int] = None,
    device: DeviceLike = None,
    timesteps: Optional[Sequence[int]] = None,
    sigmas: Optional[Sequence[float]] = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, int]:
    """Call ``scheduler.set_timesteps`` and return ``(scheduler.timesteps, num_inference_steps)``.

    Exactly one way of describing the schedule may be used: custom ``timesteps``, custom
    ``sigmas``, or ``num_inference_steps``. Extra keywords (e.g. ``shift``) are passed through.
    With custom timesteps/sigmas, ``num_inference_steps`` is the length of the new schedule.
    """
    if timesteps is not None and sigmas is not None:
        raise ValueError('Only one of `timesteps` or `sigmas` can be passed.')
    params = set(inspect.signature(scheduler.set_timesteps).parameters)
    if timesteps is not None:
        if 'timesteps' not in params:
            raise ValueError(f'{type(scheduler).__name__}.set_timesteps does not accept custom '
                             f'timesteps; pass `sigmas` or `num_inference_steps` instead.')
        scheduler.set_timesteps(timesteps=timesteps, device=device, **kwargs)
        num_inference_steps = len(scheduler.timesteps)
    elif sigmas is not None:
        if 'sigmas' not in params:
            raise ValueError(f'{type(scheduler).__name__}.set_timesteps does not accept custom '
                             f'sigmas; pass `num_inference_steps` instead.')
        scheduler.set_timesteps(sigmas=sigmas, device=device, **kwargs)
        num_inference_steps = len(scheduler.timesteps)
    else:
        scheduler.set_timesteps(num_inference_steps, device=device, **kwargs)
    return scheduler.timesteps, num_inference_steps


# ---------------------------------------------------------------------------------------------
# Shared scheduler base
# ---------------------------------------------------------------------------------------------


class FlowSchedulerBase:
    """Schedule handling shared by the flow-matching multistep schedulers.

    Subclasses build ``self.config`` (a SchedulerConfig with at least num_train_timesteps,
    shift, use_dynamic_shifting and solver_order), call ``_init_schedule()``, and implement
    ``reset()`` and ``step()``.
    """

    # Pipelines read ``scheduler.order`` (number of model calls per step).
    order = 1
    config: SchedulerConfig

    def _init_schedule(self) -> None:
        cfg = self.config
        sigmas = training_sigmas(cfg.num_train_timesteps, cfg.shift, cfg.use_dynamic_shifting)
        self.sigmas = sigmas  # fp32, CPU
        self.timesteps = sigmas * cfg.num_train_timesteps
        self.sigma_min = float(sigmas[-1].item())
        self.sigma_max = float(sigmas[0].item())
        self.num_inference_steps: Optional[int] = None
        self._begin_index: Optional[int] = None
        self.reset()

    def reset(self) -> None:
        """Forget the step index and the solver history (a new generation starts)."""
        raise NotImplementedError

    @property
    def step_index(self) -> Optional[int]:
        """Index of the current step; None until the first ``step()`` after set_timesteps."""
        return self._step_index

    @property
    def begin_index(self) -> Optional[int]:
        """First step index if fixed with ``set_begin_index`` (skips the timestep lookup)."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start at a fixed index instead of looking the first timestep up."""
        self._begin_index = begin_index

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    def set_timesteps(
        self,
        num_inference_steps: Optional[int] = None,
        device: DeviceLike = None,
        sigmas: Optional[Any] = None,
        mu: Optional[float] = None,
        shift: Optional[float] = None,
    ) -> None:
        """Build the inference schedule and reset the solver state (docs/SOLVERS.md#sigma-schedule).

        Default: sigmas = linspace(sigma_max, sigma_min, N + 1)[:-1] (sigma_max = fp32 0.999
        with the constructor's shift 1), then the shift transform with ``shift`` (default: the
        constructor's). Custom ``sigmas`` are shifted the same way. ``timesteps`` =
        int64(truncate(sigma * num_train_timesteps)) on ``device``; ``sigmas`` = fp32 with a
        final 0 appended, kept on the CPU.

        Raises ValueError when the first two integer timesteps coincide (N >= ~92 steps at
        shift 12): the reference would start at index 1 and fail on the last step.
        """
        if shift is None:
            shift = self.config.shift
        inference_sigmas = build_inference_sigmas(
            num_inference_steps, sigmas, self.sigma_max, self.sigma_min, shift,
            self.config.use_dynamic_shifting, mu)
        # Timesteps from the float64 sigmas, truncated toward zero by the int64 cast; checked
        # on the CPU before being moved to the device.
        timesteps = torch.from_numpy(inference_sigmas * self.config.num_train_timesteps).to(
            torch.int64)
        error = leading_duplicate_error(timesteps, len(inference_sigmas), shift)
        if error is not None:
            raise ValueError(error)

        sigma_last = 0.0  # final_sigmas_type == 'zero'
        self.sigmas = torch.from_numpy(
            np.concatenate([inference_sigmas, [sigma_last]]).astype(np.float32))
        self.timesteps = timesteps.to(device)
        self.num_inference_steps = len(timesteps)
        self._begin_index = None
        self.reset()

    def index_for_timestep(self, timestep: Any,
                           schedule_timesteps: Optional[torch.Tensor] = None) -> int:
        """Reference lookup: index of ``timestep``, the second match if it occurs twice."""
        schedule = self.timesteps if schedule_timesteps is None else schedule_timesteps
        return find_step_index(timestep, schedule, strict=False)

    def _begin_step(self, timestep: Any) -> int:
        """Step index for this ``step()`` call, found on the first call of a run."""
        if self.num_inference_steps is None:
            raise ValueError("Number of inference steps is 'None'; call set_timesteps first")
        if self._step_index is None:
            self._step_index = (self._begin_index if self._begin_index is not None else
                                find_step_index(timestep, self.timesteps, strict=True))
        n = len(self.timesteps)
        if self._step_index >= n:
            raise ValueError(f'all {n} steps of the schedule have been taken; call '
                             f'set_timesteps again for a new generation')
        return self._step_index

    def scale_model_input(self, sample: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """No input scaling for flow matching; kept for pipeline compatibility."""
        return sample

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor,
                  timesteps: torch.Tensor) -> torch.Tensor:
        """x_t = (1 - sigma)*x0 + sigma*noise at the sigmas of the given schedule timesteps."""
        sigmas = self.sigmas.to(device=original_samples.device, dtype=original_samples.dtype)
        timesteps = torch.as_tensor(timesteps).reshape(-1)
        indices = [self.index_for_timestep(t) for t in timesteps]
        sigma = sigmas[indices].flatten()
        while sigma.dim() < original_samples.dim():
            sigma = sigma.unsqueeze(-1)
        alpha, sigma = sigma_to_alpha_sigma(sigma)
        return alpha * original_samples + sigma * noise

    def convert_model_output(self, model_output: torch.Tensor,
                             sample: torch.Tensor) -> torch.Tensor:
        """Data prediction x0 = x - sigma * v at the current step."""
        sigma = self.sigmas[self._step_index]
        return sample - sigma * model_output


# ---------------------------------------------------------------------------------------------
# DPM-Solver++ (multistep, ODE)
# ---------------------------------------------------------------------------------------------


class FlowDPMSolverMultistepScheduler(FlowSchedulerBase):
    """Multistep DPM-Solver++ for flow-matching models (docs/SOLVERS.md#dpm-solver).

    Order rule with the default ``solver_order=2``: first order at the first step (where, with
    sigma_0 = 1, it reduces to x_1 = sigma_1*x_0 + alpha_1*m_0) and at the last step (final
    sigma 0, so the result is exactly the data prediction m = x - sigma*v); second-order
    midpoint in between. Arithmetic is fp32 on 0-dim CPU sigmas; the data predictions are made
    from the incoming sample in its own dtype, the update in fp32, and the result is returned
    in the dtype of ``sample``.

    Step index: on the first ``step()`` it is found by looking ``timestep`` up in
    ``self.timesteps`` (second match if repeated, the reference rule). A repeated *first*
    timestep makes the reference run past the end of the schedule, so ``set_timesteps`` raises
    a ValueError for a schedule whose first two integer timesteps coincide (N >= 92 steps at
    shift 12 without custom sigmas; get_sampling_sigmas schedules start at 1000 and are safe),
    and ``step()`` raises if a run is started at a repeated timestep.

    Only the deterministic 'dpmsolver++' algorithm with solver orders 1 and 2 is implemented;
    reference keywords for other variants are accepted with their defaults and raise a
    ValueError when set to something else.
    """

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        solver_order: int = 2,
        prediction_type: str = 'flow_prediction',
        shift: Optional[float] = 1.0,
        use_dynamic_shifting: bool = False,
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        algorithm_type: str = 'dpmsolver++',
        solver_type: str = 'midpoint',
        lower_order_final: bool = True,
        euler_at_final: bool = False,
        final_sigmas_type: Optional[str] = 'zero',
        lambda_min_clipped: float = -float('inf'),
        variance_type: Optional[str] = None,
        invert_sigmas: bool = False,
    ) -> None:
        # diffusers maps these legacy solver names onto 'midpoint'; keep that for drop-in use.
        if solver_type in ('logrho', 'bh1', 'bh2'):
            solver_type = 'midpoint'
        check_unsupported('solver_order', solver_order, (1, 2))
        check_unsupported('prediction_type', prediction_type, ('flow_prediction',))
        check_unsupported('thresholding', thresholding, (False,))
        check_unsupported('algorithm_type', algorithm_type, ('dpmsolver++',))
        check_unsupported('solver_type', solver_type, ('midpoint', 'heun'))
        check_unsupported('final_sigmas_type', final_sigmas_type, ('zero',))
        check_unsupported('variance_type', variance_type, (None,))
        check_unsupported('invert_sigmas', invert_sigmas, (False,))
        if lambda_min_clipped != -float('inf'):
            raise ValueError('lambda_min_clipped is not supported by this implementation '
                             '(only the default -inf)')
        if shift is None:
            shift = 1.0

        self.config = SchedulerConfig(
            num_train_timesteps=num_train_timesteps,
            solver_order=solver_order,
            prediction_type=prediction_type,
            shift=shift,
            use_dynamic_shifting=use_dynamic_shifting,
            thresholding=thresholding,
            dynamic_thresholding_ratio=dynamic_thresholding_ratio,
            sample_max_value=sample_max_value,
            algorithm_type=algorithm_type,
            solver_type=solver_type,
            lower_order_final=lower_order_final,
            euler_at_final=euler_at_final,
            final_sigmas_type=final_sigmas_type,
            lambda_min_clipped=lambda_min_clipped,
            variance_type=variance_type,
            invert_sigmas=invert_sigmas,
        )

        self._init_schedule()

    # -- state ------------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget the step index and the model-output history (a new generation starts)."""
        self.model_outputs: list[Optional[torch.Tensor]] = [None] * self.config.solver_order
        self.lower_order_nums = 0
        self._step_index: Optional[int] = None

    # -- solver -------------------------------------------------------------------------------

    def _first_order_update(self, m0: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        # x_{i+1} = (s_{i+1}/s_i) x_i - a_{i+1} (e^{-h} - 1) m_i. At sigma_i = 1, lambda_i = -inf
        # so e^{-h} = 0; at sigma_{i+1} = 0 the result is exactly m_i.
        i = self._step_index
        sigma_t, sigma_s = self.sigmas[i + 1], self.sigmas[i]
        alpha_t = 1 - sigma_t
        h = half_log_snr(sigma_t) - half_log_snr(sigma_s)
        return (sigma_t / sigma_s) * sample - (alpha_t * (torch.exp(-h) - 1.0)) * m0

    def _second_order_update(self, sample: torch.Tensor) -> torch.Tensor:
        i = self._step_index
        sigma_t, sigma_s0, sigma_s1 = self.sigmas[i + 1], self.sigmas[i], self.sigmas[i - 1]
        alpha_t = 1 - sigma_t
        lambda_t, lambda_s0 = half_log_snr(sigma_t), half_log_snr(sigma_s0)
        lambda_s1 = half_log_snr(sigma_s1)
        m0, m1 = self.model_outputs[-1], self.model_outputs[-2]
        h, h_0 = lambda_t - lambda_s0, lambda_s0 - lambda_s1
        # After a start at sigma = 1, h_0 = +inf and hence D1 = 0 on the second step.
        r0 = h_0 / h
        d0, d1 = m0, (1.0 / r0) * (m0 - m1)
        if self.config.solver_type == 'midpoint':
            return ((sigma_t / sigma_s0) * sample - (alpha_t * (torch.exp(-h) - 1.0)) * d0 -
                    0.5 * (alpha_t * (torch.exp(-h) - 1.0)) * d1)
        # heun
        return ((sigma_t / sigma_s0) * sample - (alpha_t * (torch.exp(-h) - 1.0)) * d0 +
                (alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0)) * d1)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: Union[int, torch.Tensor],
        sample: torch.Tensor,
        return_dict: bool = True,
        generator: Optional[torch.Generator] = None,
        variance_noise: Optional[torch.Tensor] = None,
    ) -> Union[SchedulerOutput, tuple]:
        """Advance ``sample`` by one step given the velocity ``model_output``.

        ``generator`` and ``variance_noise`` are accepted for compatibility and unused (ODE
        solver). Returns ``SchedulerOutput(prev_sample)`` or ``(prev_sample,)``.
        """
        self._begin_step(timestep)
        n = len(self.timesteps)

        # The final step is first order whenever the final sigma is zero (always here), so
        # lower_order_final/euler_at_final cannot change it; the N < 15 "lower order second"
        # rule only matters for solver orders above 2, which are not implemented.
        lower_order_final = (self._step_index == n - 1) and (
            self.config.euler_at_final or (self.config.lower_order_final and n < 15) or
            self.config.final_sigmas_type == 'zero')

        out_dtype = sample.dtype
        # Data prediction from the incoming sample (before the fp32 upcast, as the reference).
        m = self.convert_model_output(model_output, sample)
        for k in range(self.config.solver_order - 1):
            self.model_outputs[k] = self.model_outputs[k + 1]
        self.model_outputs[-1] = m

        sample = sample.to(torch.float32)
        if self.config.solver_order == 1 or self.lower_order_nums < 1 or lower_order_final:
            prev_sample = self._first_order_update(m, sample)
        else:
            prev_sample = self._second_order_update(sample)

        if self.lower_order_nums < self.config.solver_order:
            self.lower_order_nums += 1
        prev_sample = prev_sample.to(out_dtype)
        self._step_index += 1
        if not return_dict:
            return (prev_sample,)
        return SchedulerOutput(prev_sample=prev_sample)
