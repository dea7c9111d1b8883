"""Flow-matching UniPC multistep scheduler (predictor UniP + corrector UniC, bh2 variant).

UniPC (Zhao et al.) adapted to rectified flow: the model predicts a velocity v, the data
prediction is x0 = x - sigma * v, alpha = 1 - sigma and lambda = ln(alpha) - ln(sigma).
docs/SOLVERS.md (#sigma-schedule, #unipc) states the facts reproduced here (upstream: Wan2.2's
wan/utils/fm_solvers_unipc.py); this is the default sampler of T2V-A14B (40 steps, shift 12).
"""

from __future__ import annotations

import logging
from typing import Any, List, Optional, Union

import torch

from .fm_solvers import (
    FlowSchedulerBase,
    SchedulerConfig,
    SchedulerOutput,
    check_unsupported,
    half_log_snr,
)

__all__ = ['FlowUniPCMultistepScheduler']

logger = logging.getLogger(__name__)


class FlowUniPCMultistepScheduler(FlowSchedulerBase):
    """UniPC multistep sampler for flow-matching models (docs/SOLVERS.md#unipc).

    Per step i, with velocity v_i and incoming sample x_i:

    1. data prediction m_i = x_i - sigma_i * v_i from the *uncorrected* sample;
    2. for i >= 1, the UniC corrector rebuilds the previous predictor step with m_i included,
       giving the corrected sample x^_i (x^_0 = x_0);
    3. the UniP predictor of order p = min(solver_order, N - i, steps done + 1) goes from x^_i
       to x_{i+1}; p = 1 at the first and (lower_order_final) the last step, and the order-2
       predictor uses the fixed coefficient 0.5;
    4. at the final step (sigma_N = 0) the update reduces exactly to x_N = m_{N-1}.

    Arithmetic is done in the dtype of the sample (fp32 in the pipeline) with 0-dim fp32 CPU
    sigmas; the small 2x2 system of the order-2 corrector is solved on the sample's device, as
    the reference does. The output has the dtype of ``sample``.

    Step index: on the first ``step()`` it is found by looking ``timestep`` up in
    ``self.timesteps`` (second match if repeated, the reference rule). With shift 12 and
    N >= 92 steps the first two integer timesteps are both 999, so the reference starts at
    index 1 and fails on the last step (verified at N = 100). ``set_timesteps`` raises a
    ValueError for such a schedule, and ``step()`` raises if a run is started at any repeated
    timestep, instead of failing at the end of the run.

    Implemented: solver orders 1 and 2, 'bh1'/'bh2', predict_x0=True, flow prediction, final
    sigma zero. Other values of the reference keywords raise a ValueError. ``timestep_spacing``
    and ``steps_offset`` are ignored by the reference's flow schedule, so only their defaults
    are accepted. ``base_shift``/``max_shift`` are stored in ``config`` only: the dynamic shift
    is driven by the ``mu`` given to ``set_timesteps``.
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
        predict_x0: bool = True,
        solver_type: str = 'bh2',
        lower_order_final: bool = True,
        disable_corrector: List[int] = [],  # noqa: B006 - reference default; never mutated
        solver_p: Any = None,
        timestep_spacing: str = 'linspace',
        steps_offset: int = 0,
        final_sigmas_type: Optional[str] = 'zero',
        *,
        base_shift: Optional[float] = 0.5,
        max_shift: Optional[float] = 1.15,
    ) -> None:
        # diffusers maps DPM-Solver style names onto bh2; keep that for drop-in use.
        if solver_type in ('midpoint', 'heun', 'logrho'):
            solver_type = 'bh2'
        check_unsupported('solver_order', solver_order, (1, 2))
        check_unsupported('prediction_type', prediction_type, ('flow_prediction',))
        check_unsupported('thresholding', thresholding, (False,))
        check_unsupported('predict_x0', predict_x0, (True,))
        check_unsupported('solver_type', solver_type, ('bh1', 'bh2'))
        check_unsupported('solver_p', solver_p, (None,))
        check_unsupported('timestep_spacing', timestep_spacing, ('linspace',))
        check_unsupported('steps_offset', steps_offset, (0,))
        check_unsupported('final_sigmas_type', final_sigmas_type, ('zero',))
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
            predict_x0=predict_x0,
            solver_type=solver_type,
            lower_order_final=lower_order_final,
            disable_corrector=list(disable_corrector),
            solver_p=solver_p,
            timestep_spacing=timestep_spacing,
            steps_offset=steps_offset,
            final_sigmas_type=final_sigmas_type,
            base_shift=base_shift,
            max_shift=max_shift,
        )
        self.predict_x0 = predict_x0
        self.disable_corrector = list(disable_corrector)
        self.solver_p = solver_p

        self._init_schedule()

    # -- state ------------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget the step index and all history (a new generation starts)."""
        order = self.config.solver_order
        self.model_outputs: list[Optional[torch.Tensor]] = [None] * order
        self.timestep_list: list[Any] = [None] * order
        self.lower_order_nums = 0
        self.last_sample: Optional[torch.Tensor] = None
        self.this_order = 0  # predictor order of the previous step, used by the corrector
        self._step_index: Optional[int] = None

    # -- solver -------------------------------------------------------------------------------

    def _b_h(self, hh: torch.Tensor) -> torch.Tensor:
        # B(h) of the UniPC paper: bh1 uses B(h) = h, bh2 uses B(h) = e^h - 1 (with h -> -h
        # for the data-prediction form).
        return hh if self.config.solver_type == 'bh1' else torch.expm1(hh)

    def _predictor(self, sample: torch.Tensor, order: int) -> torch.Tensor:
        """UniP from the (corrected) sample x^_i to x_{i+1}; uses m_i (and m_{i-1} at order 2)."""
        i = self._step_index
        m0 = self.model_outputs[-1]
        sigma_t, sigma_s0 = self.sigmas[i + 1], self.sigmas[i]
        alpha_t = 1 - sigma_t
        lambda_s0 = half_log_snr(sigma_s0)
        h = half_log_snr(sigma_t) - lambda_s0
        hh = -h
        h_phi_1 = torch.expm1(hh)  # -1 exactly at the final step (h = +inf)
        b_h = self._b_h(hh)

        x_t = sigma_t / sigma_s0 * sample - alpha_t * h_phi_1 * m0
        if order == 2:
            m1 = self.model_outputs[-2]
            rk = (half_log_snr(self.sigmas[i - 1]) - lambda_s0) / h
            d1 = (m1 - m0) / rk
            # The order-2 predictor uses the fixed coefficient rho = 0.5 (no linear solve).
            x_t = x_t - alpha_t * b_h * (0.5 * d1)
        return x_t.to(sample.dtype)

    def _corrector(self, m_this: torch.Tensor, last_sample: torch.Tensor,
                   order: int) -> torch.Tensor:
        """UniC: redo the step x^_{i-1} -> x_i with m_i included; returns x^_i.

        ``order`` is the predictor order used at step i-1. Only m_i enters from the current
        step, never the uncorrected x_i itself.
        """
        i = self._step_index
        m_prev = self.model_outputs[-1]  # m_{i-1}; the history is not shifted yet
        sigma_t, sigma_s0 = self.sigmas[i], self.sigmas[i - 1]
        alpha_t = 1 - sigma_t
        lambda_s0 = half_log_snr(sigma_s0)
        h = half_log_snr(sigma_t) - lambda_s0
        hh = -h
        h_phi_1 = torch.expm1(hh)
        b_h = self._b_h(hh)
        device, dtype = last_sample.device, last_sample.dtype

        x_t = sigma_t / sigma_s0 * last_sample - alpha_t * h_phi_1 * m_prev
        d1_t = m_this - m_prev
        if order == 1:
            corr = 0.5 * d1_t  # rho = 0.5 for the order-1 corrector
        else:
            m_prev2 = self.model_outputs[-2]
            rk = (half_log_snr(self.sigmas[i - 2]) - lambda_s0) / h
            d1 = (m_prev2 - m_prev) / rk
            # Coefficients of the order-2 corrector: solve [[1, 1], [r, 1]] rho = [b1, b2] with
            # b_k = k! * phi_k(h) / B(h) built by the recursion phi_{k+1} = phi_k/hh - 1/(k+1)!.
            g1 = h_phi_1 / hh - 1
            b1 = g1 * 1 / b_h
            g2 = g1 / hh - 1 / 2
            b2 = g2 * 2 / b_h
            rks = torch.stack([rk.to(torch.float32), torch.ones((), dtype=torch.float32)])
            lhs = torch.stack([torch.ones_like(rks), rks]).to(device)
            rhs = torch.stack([b1, b2]).to(device=device, dtype=torch.float32)
            rhos = torch.linalg.solve(lhs, rhs).to(dtype)
            corr = rhos[0] * d1 + rhos[-1] * d1_t
        x_t = x_t - alpha_t * b_h * corr
        return x_t.to(dtype)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: Union[int, torch.Tensor],
        sample: torch.Tensor,
        return_dict: bool = True,
        generator: Optional[torch.Generator] = None,
    ) -> Union[SchedulerOutput, tuple]:
        """Advance ``sample`` by one step given the velocity ``model_output``.

        ``generator`` is accepted for compatibility and unused (ODE solver). Returns
        ``SchedulerOutput(prev_sample)`` or ``(prev_sample,)``.
        """
        i = self._begin_step(timestep)
        n = len(self.timesteps)

        use_corrector = (i > 0 and (i - 1) not in self.disable_corrector and
                         self.last_sample is not None)
        # x0 prediction from the uncorrected sample: the corrector only changes the base of the
        # next predictor step, not the data prediction of this one.
        m = self.convert_model_output(model_output, sample)
        if use_corrector:
            sample = self._corrector(m, self.last_sample, self.this_order)

        for k in range(self.config.solver_order - 1):
            self.model_outputs[k] = self.model_outputs[k + 1]
            self.timestep_list[k] = self.timestep_list[k + 1]
        self.model_outputs[-1] = m
        self.timestep_list[-1] = timestep

        # lower_order_final caps the order by the steps left (order 1 on the last step at any
        # N); the warm-up caps it by the history available.
        if self.config.lower_order_final:
            this_order = min(self.config.solver_order, n - i)
        else:
            this_order = self.config.solver_order
        self.this_order = min(this_order, self.lower_order_nums + 1)

        self.last_sample = sample
        prev_sample = self._predictor(sample, self.this_order)

        if self.lower_order_nums < self.config.solver_order:
            self.lower_order_nums += 1
        self._step_index += 1
        if not return_dict:
            return (prev_sample,)
        return SchedulerOutput(prev_sample=prev_sample)
