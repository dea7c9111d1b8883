"""Tests of the flow-matching schedulers (docs/SOLVERS.md).

The solver math is checked three ways: hand-computed first steps, a float64 re-statement of
the formulas of docs/SOLVERS.md (#unipc, #dpm-solver) compared over whole trajectories, and
convergence on flows whose exact ODE solution is known.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from wan.utils.fm_solvers import (
    FlowDPMSolverMultistepScheduler,
    get_sampling_sigmas,
    retrieve_timesteps,
)
from wan.utils.fm_solvers_unipc import FlowUniPCMultistepScheduler

# docs/SOLVERS.md#integer-timesteps, 40 steps at shift 12 (upstream's schedules).
UNIPC_40 = [
    999, 997, 995, 993, 990, 988, 985, 982, 979, 976, 972, 969, 965, 961, 956, 952, 947, 941,
    936, 929, 922, 915, 907, 898, 888, 877, 865, 852, 837, 819, 799, 776, 749, 717, 678, 631,
    571, 492, 386, 235
]
DPM_40 = [
    1000, 997, 995, 993, 990, 988, 985, 982, 979, 976, 972, 969, 965, 961, 957, 952, 947, 941,
    936, 929, 923, 915, 907, 898, 888, 878, 865, 852, 837, 819, 800, 776, 750, 717, 679, 631,
    571, 493, 387, 235
]


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def make_unipc(steps: int, shift: float) -> FlowUniPCMultistepScheduler:
    """As the pipeline builds it."""
    sched = FlowUniPCMultistepScheduler(num_train_timesteps=1000, shift=1,
                                        use_dynamic_shifting=False)
    sched.set_timesteps(steps, device='cpu', shift=shift)
    return sched


def make_dpm(steps: int, shift: float) -> FlowDPMSolverMultistepScheduler:
    """As the pipeline builds it (custom sigmas, scheduler shift 1)."""
    sched = FlowDPMSolverMultistepScheduler(num_train_timesteps=1000, shift=1,
                                            use_dynamic_shifting=False)
    retrieve_timesteps(sched, device='cpu', sigmas=get_sampling_sigmas(steps, shift))
    return sched


def make(kind: str, steps: int, shift: float):
    return make_unipc(steps, shift) if kind == 'unipc' else make_dpm(steps, shift)


def reschedule(kind: str, sched, steps: int, shift: float) -> None:
    """A new set_timesteps on an existing scheduler, the way the pipeline would call it."""
    if kind == 'unipc':
        sched.set_timesteps(steps, device='cpu', shift=shift)
    else:
        retrieve_timesteps(sched, device='cpu', sigmas=get_sampling_sigmas(steps, shift))


def toy_velocity(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """A smooth nonlinear stand-in for the DiT, so that the multistep terms are not zero."""
    return (x * (1 + 0.5 * math.sin(3 * sigma)) - 0.8 * torch.tanh(2 * x) +
            0.3 * math.cos(5 * sigma))


def sample_loop(sched, x: torch.Tensor, velocity) -> torch.Tensor:
    """The pipeline's loop: batch axis added for step() and removed again."""
    for i, t in enumerate(sched.timesteps):
        v = velocity(x, float(sched.sigmas[i]))
        x = sched.step(v[None], t, x[None], return_dict=False)[0][0]
    return x


def lam(sigma: float) -> float:
    """Half log-SNR of the flow schedule, with the limits used at sigma = 1 and sigma = 0."""
    if sigma >= 1.0:
        return -math.inf
    if sigma <= 0.0:
        return math.inf
    return math.log(1 - sigma) - math.log(sigma)


def unipc_reference(sigmas: np.ndarray, x: np.ndarray, velocity) -> np.ndarray:
    """docs/SOLVERS.md#unipc written out in float64 (orders 1-2, bh2, predict-x0)."""
    n = len(sigmas) - 1
    m = []
    x_hat_prev, order_prev = None, None
    for i in range(n):
        m.append(x - sigmas[i] * velocity(x, sigmas[i]))  # from the uncorrected x_i
        if i >= 1:  # corrector: rebuild x^_i from x^_{i-1}
            h = lam(sigmas[i]) - lam(sigmas[i - 1])
            phi = math.expm1(-h)
            big_b = phi
            base = sigmas[i] / sigmas[i - 1] * x_hat_prev - (1 - sigmas[i]) * phi * m[i - 1]
            if order_prev == 1:
                x = base - (1 - sigmas[i]) * big_b * 0.5 * (m[i] - m[i - 1])
            else:
                r = (lam(sigmas[i - 2]) - lam(sigmas[i - 1])) / h
                d = (m[i - 2] - m[i - 1]) / r
                g1 = phi / (-h) - 1
                g2 = g1 / (-h) - 0.5
                rho = np.linalg.solve([[1.0, 1.0], [r, 1.0]], [g1 / big_b, 2 * g2 / big_b])
                x = base - (1 - sigmas[i]) * big_b * (rho[0] * d + rho[1] * (m[i] - m[i - 1]))
        x_hat_prev = x
        order = min(2, n - i, min(i, 2) + 1)
        order_prev = order
        h = lam(sigmas[i + 1]) - lam(sigmas[i])
        phi = math.expm1(-h)
        x_next = sigmas[i + 1] / sigmas[i] * x - (1 - sigmas[i + 1]) * phi * m[i]
        if order == 2:
            r = (lam(sigmas[i - 1]) - lam(sigmas[i])) / h
            x_next = x_next - (1 - sigmas[i + 1]) * phi * 0.5 * (m[i - 1] - m[i]) / r
        x = x_next
    return x


def dpm_reference(sigmas: np.ndarray, x: np.ndarray, velocity) -> np.ndarray:
    """docs/SOLVERS.md#dpm-solver (DPM-Solver++ 2M, midpoint) written out in float64."""
    n = len(sigmas) - 1
    m = []
    for i in range(n):
        m.append(x - sigmas[i] * velocity(x, sigmas[i]))
        h = lam(sigmas[i + 1]) - lam(sigmas[i])
        e = math.exp(-h) - 1
        x_next = sigmas[i + 1] / sigmas[i] * x - (1 - sigmas[i + 1]) * e * m[i]
        if 0 < i < n - 1:
            r0 = (lam(sigmas[i]) - lam(sigmas[i - 1])) / h
            d1 = (m[i] - m[i - 1]) / r0 if math.isfinite(r0) else 0.0 * m[i]
            x_next = x_next - 0.5 * (1 - sigmas[i + 1]) * e * d1
        x = x_next
    return x


def np_toy_velocity(x: np.ndarray, sigma: float) -> np.ndarray:
    return toy_velocity(torch.from_numpy(x), float(sigma)).numpy()


# ---------------------------------------------------------------------------------------------
# schedule
# ---------------------------------------------------------------------------------------------


def test_unipc_timesteps_40_steps_shift_12():
    sched = make_unipc(40, 12.0)
    assert sched.timesteps.dtype == torch.int64
    assert sched.timesteps.tolist() == UNIPC_40
    assert sched.sigmas.dtype == torch.float32
    assert sched.sigmas.device.type == 'cpu'
    assert len(sched.sigmas) == 41 and float(sched.sigmas[-1]) == 0.0
    assert float(sched.sigmas[0]) == pytest.approx(0.999917, abs=1e-6)
    assert float(sched.sigmas[-2]) == pytest.approx(0.235110, abs=1e-6)
    assert sched.sigma_max == 0.9990000128746033 and sched.sigma_min == 0.0
    assert int((sched.timesteps >= 875).sum()) == 26
    assert sched.num_inference_steps == 40


def test_dpm_timesteps_40_steps_shift_12():
    sigmas = get_sampling_sigmas(40, 12.0)
    assert isinstance(sigmas, np.ndarray) and sigmas.dtype == np.float64
    assert len(sigmas) == 40 and sigmas[0] == 1.0
    sched = FlowDPMSolverMultistepScheduler(num_train_timesteps=1000, shift=1,
                                            use_dynamic_shifting=False)
    timesteps, steps = retrieve_timesteps(sched, device='cpu', sigmas=sigmas)
    assert steps == 40
    assert timesteps is sched.timesteps
    assert timesteps.dtype == torch.int64
    assert timesteps.tolist() == DPM_40
    assert sched.sigmas.dtype == torch.float32 and sched.sigmas.device.type == 'cpu'
    assert float(sched.sigmas[0]) == 1.0 and float(sched.sigmas[-1]) == 0.0
    assert int((timesteps >= 875).sum()) == 26


def test_timesteps_go_to_device_sigmas_stay_on_cpu():
    # 'meta' stands in for an accelerator: timesteps follow `device`, sigmas never do.
    for sched in (FlowUniPCMultistepScheduler(), FlowDPMSolverMultistepScheduler()):
        sched.set_timesteps(40, device='meta', shift=12.0)
        assert sched.timesteps.device.type == 'meta'
        assert sched.timesteps.dtype == torch.int64
        assert sched.sigmas.device.type == 'cpu'


def test_config_and_defaults():
    sched = FlowUniPCMultistepScheduler()
    assert sched.config.num_train_timesteps == 1000
    assert sched.config['solver_type'] == 'bh2' and sched.config.solver_order == 2
    assert sched.order == 1 and len(sched) == 1000
    dpm = FlowDPMSolverMultistepScheduler()
    assert dpm.config.algorithm_type == 'dpmsolver++' and dpm.config.solver_type == 'midpoint'
    with pytest.raises(AttributeError):
        sched.config.shift = 3.0


def test_dynamic_shifting_matches_equivalent_shift():
    # e^mu / (e^mu + 1/t - 1) with mu = ln 12 is the shift-12 transform.
    sched = FlowUniPCMultistepScheduler(use_dynamic_shifting=True)
    with pytest.raises(ValueError, match='mu'):
        sched.set_timesteps(40)
    sched.set_timesteps(40, mu=math.log(12.0))
    torch.testing.assert_close(sched.sigmas, make_unipc(40, 12.0).sigmas)


def test_retrieve_timesteps_variants():
    sched = FlowUniPCMultistepScheduler()
    timesteps, steps = retrieve_timesteps(sched, 40, device='cpu', shift=12.0)
    assert steps == 40 and timesteps.tolist() == UNIPC_40
    with pytest.raises(ValueError, match='Only one'):
        retrieve_timesteps(sched, timesteps=[999, 500], sigmas=[0.9, 0.5])
    with pytest.raises(ValueError, match='timesteps'):
        retrieve_timesteps(sched, timesteps=[999, 500])


@pytest.mark.parametrize('kwargs', [
    dict(thresholding=True),
    dict(prediction_type='epsilon'),
    dict(predict_x0=False),
    dict(solver_order=3),
    dict(solver_p=object()),
    dict(final_sigmas_type='sigma_min'),
    dict(timestep_spacing='trailing'),
    dict(steps_offset=1),
])
def test_unipc_unsupported_options_raise(kwargs):
    with pytest.raises(ValueError, match='not supported'):
        FlowUniPCMultistepScheduler(**kwargs)


@pytest.mark.parametrize('kwargs', [
    dict(thresholding=True),
    dict(algorithm_type='sde-dpmsolver++'),
    dict(solver_order=3),
    dict(variance_type='learned'),
    dict(invert_sigmas=True),
    dict(lambda_min_clipped=-5.1),
    dict(final_sigmas_type='sigma_min'),
])
def test_dpm_unsupported_options_raise(kwargs):
    with pytest.raises(ValueError, match='not supported'):
        FlowDPMSolverMultistepScheduler(**kwargs)


# ---------------------------------------------------------------------------------------------
# step-index rule and duplicate timesteps
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize('cls', [FlowUniPCMultistepScheduler, FlowDPMSolverMultistepScheduler])
def test_duplicate_leading_timesteps_raise_clear_error(cls):
    sched = cls(num_train_timesteps=1000, shift=1, use_dynamic_shifting=False)
    with pytest.raises(ValueError, match=r'100 steps at shift 12 gives duplicate'):
        sched.set_timesteps(100, device='cpu', shift=12.0)
    # 91 steps are fine (the reference runs them), 92 is the first failing count.
    sched.set_timesteps(91, shift=12.0)
    with pytest.raises(ValueError, match='duplicate'):
        sched.set_timesteps(92, shift=12.0)


def test_dpm_sampling_sigmas_at_100_steps_run_to_the_end():
    # get_sampling_sigmas starts at sigma 1 (t = 1000), so no leading duplicate.
    sched = make_dpm(100, 12.0)
    assert sched.timesteps[0] == 1000
    x = sample_loop(sched, torch.linspace(-1, 1, 8), toy_velocity)
    assert torch.isfinite(x).all() and sched.step_index == 100


def test_reference_index_rule_second_occurrence_and_repeated_start():
    sched = make_unipc(90, 12.0)  # duplicates further in: 998, 998
    ts = sched.timesteps.tolist()
    first = ts.index(998)
    assert ts[first + 1] == 998
    assert sched.index_for_timestep(torch.tensor(998)) == first + 1  # the reference's choice
    assert sched.index_for_timestep(999) == 0
    x = torch.zeros(4)
    with pytest.raises(ValueError, match='occurs 2 times'):
        sched.step(x, torch.tensor(998), x)
    # A full run from the start is fine (the repeated value is not the starting one).
    sched.set_timesteps(90, shift=12.0)
    assert torch.isfinite(sample_loop(sched, torch.linspace(-1, 1, 8), toy_velocity)).all()


def test_step_errors_before_set_timesteps_unknown_t_and_after_the_end():
    x = torch.zeros(3)
    for cls in (FlowUniPCMultistepScheduler, FlowDPMSolverMultistepScheduler):
        with pytest.raises(ValueError, match='set_timesteps'):
            cls().step(x, 999, x)
        sched = cls()
        sched.set_timesteps(5, shift=3.0)
        with pytest.raises(ValueError, match='not in the scheduler timesteps'):
            sched.step(x, 1, x)
        sample_loop(sched, x, toy_velocity)
        with pytest.raises(ValueError, match='steps of the schedule have been taken'):
            sched.step(x, sched.timesteps[-1], x)


@pytest.mark.parametrize('kind', ['unipc', 'dpm'])
def test_timestep_forms_are_equivalent(kind):
    """int, 0-dim and 1-element tensors (the pipeline passes any of them)."""
    x0 = torch.linspace(-1, 1, 16)
    results = []
    for form in (int, lambda t: t.reshape(()), lambda t: t.reshape(1)):
        sched = make(kind, 8, 5.0)
        x = x0
        for i, t in enumerate(sched.timesteps):
            v = toy_velocity(x, float(sched.sigmas[i]))
            x = sched.step(v, form(t), x).prev_sample
        results.append(x)
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])


# ---------------------------------------------------------------------------------------------
# solver math
# ---------------------------------------------------------------------------------------------


def test_unipc_first_step_by_hand():
    sched = make_unipc(40, 12.0)
    x = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(0))
    v = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(1))
    s0, s1 = float(sched.sigmas[0]), float(sched.sigmas[1])
    xd, vd = x.double(), v.double()
    m0 = xd - s0 * vd
    h = lam(s1) - lam(s0)
    expected = (s1 / s0) * xd - (1 - s1) * (math.exp(-h) - 1) * m0
    out = sched.step(v, sched.timesteps[0], x).prev_sample
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=2e-6)


def test_unipc_second_step_by_hand():
    """Order-1 corrector (rho 0.5 on m1 - m0) then order-2 predictor (fixed 0.5)."""
    sched = make_unipc(10, 5.0)
    x0 = torch.randn(7, generator=torch.Generator().manual_seed(2))
    v0 = torch.randn(7, generator=torch.Generator().manual_seed(3))
    v1 = torch.randn(7, generator=torch.Generator().manual_seed(4))
    x1 = sched.step(v0, sched.timesteps[0], x0).prev_sample
    x2 = sched.step(v1, sched.timesteps[1], x1).prev_sample

    s0, s1, s2 = (float(sched.sigmas[k]) for k in range(3))
    x0d, x1d = x0.double(), x1.double()
    m0 = x0d - s0 * v0.double()
    m1 = x1d - s1 * v1.double()  # from the uncorrected x1
    h1 = lam(s1) - lam(s0)
    phi1 = math.expm1(-h1)
    x1_hat = (s1 / s0) * x0d - (1 - s1) * phi1 * m0 - (1 - s1) * phi1 * 0.5 * (m1 - m0)
    h2 = lam(s2) - lam(s1)
    phi2 = math.expm1(-h2)
    r = (lam(s0) - lam(s1)) / h2
    expected = ((s2 / s1) * x1_hat - (1 - s2) * phi2 * m1 -
                (1 - s2) * phi2 * 0.5 * (m0 - m1) / r)
    torch.testing.assert_close(x2.double(), expected, rtol=0, atol=2e-6)


def test_dpm_first_step_is_euler_like_at_sigma_one():
    sched = make_dpm(40, 12.0)
    x = torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(5))
    v = torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(6))
    assert float(sched.sigmas[0]) == 1.0
    s1 = float(sched.sigmas[1])
    m0 = x.double() - v.double()
    expected = s1 * x.double() + (1 - s1) * m0
    out = sched.step(v, sched.timesteps[0], x, return_dict=False)[0]
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=2e-6)


@pytest.mark.parametrize('kind', ['unipc', 'dpm'])
def test_final_step_returns_x0_prediction_exactly(kind):
    sched = make(kind, 12, 12.0)
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(7))
    for i, t in enumerate(sched.timesteps):
        v = toy_velocity(x, float(sched.sigmas[i]))
        out = sched.step(v, t, x).prev_sample
        if i == len(sched.timesteps) - 1:
            # x0 = x - sigma * v from the incoming (uncorrected) sample, bit for bit.
            assert torch.equal(out, x - sched.sigmas[i] * v)
        x = out


@pytest.mark.parametrize('steps,shift', [(40, 12.0), (10, 5.0), (3, 1.0)])
def test_unipc_matches_float64_restatement_of_the_spec(steps, shift):
    sched = make_unipc(steps, shift)
    x0 = torch.randn(64, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    out = sample_loop(sched, x0, toy_velocity)
    expected = unipc_reference(sched.sigmas.double().numpy(), x0.numpy(), np_toy_velocity)
    np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=2e-5)


@pytest.mark.parametrize('steps,shift', [(40, 12.0), (10, 5.0), (3, 1.0)])
def test_dpm_matches_float64_restatement_of_the_spec(steps, shift):
    sched = make_dpm(steps, shift)
    x0 = torch.randn(64, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    out = sample_loop(sched, x0, toy_velocity)
    expected = dpm_reference(sched.sigmas.double().numpy(), x0.numpy(), np_toy_velocity)
    np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=2e-5)


@pytest.mark.parametrize('kind', ['unipc', 'dpm'])
def test_straight_line_flow_is_solved_exactly(kind):
    """v = noise - x0 is the exact velocity of x_s = (1-s) x0 + s noise: no discretisation
    error, so any step count lands on x0 (up to fp32 rounding)."""
    gen = torch.Generator().manual_seed(10)
    data = torch.randn(2, 16, 4, 4, generator=gen)
    noise = torch.randn(2, 16, 4, 4, generator=gen)
    for steps in (2, 7, 40):
        sched = make(kind, steps, 12.0)
        s0 = float(sched.sigmas[0])
        x = (1 - s0) * data + s0 * noise
        out = sample_loop(sched, x, lambda x, s: noise - data)
        torch.testing.assert_close(out, data, rtol=0, atol=1e-5)


@pytest.mark.parametrize('kind', ['unipc', 'dpm'])
def test_convergence_order_on_gaussian_flow(kind):
    """Data N(mu, s^2): the marginal velocity and the exact flow map are analytic.

    x_sigma ~ N((1-sigma) mu, V(sigma)) with V = (1-sigma)^2 s^2 + sigma^2;
    v(x, sigma) = (sigma - (1-sigma) s^2) / V * (x - (1-sigma) mu) - mu, and the flow keeps
    z = (x - (1-sigma) mu) / sqrt(V) fixed, so the exact end point is mu + s z.
    """
    mu, s = 0.3, 1.5

    def var(sig: float) -> float:
        return (1 - sig)**2 * s * s + sig * sig

    def velocity(x: torch.Tensor, sig: float) -> torch.Tensor:
        return ((sig - (1 - sig) * s * s) / var(sig) * (x.double() - (1 - sig) * mu) -
                mu).to(x.dtype)

    z = torch.linspace(-2.5, 2.5, 101, dtype=torch.float64)
    errors = []
    for steps in (10, 20, 40, 80):
        sched = make(kind, steps, 1.0)
        s0 = float(sched.sigmas[0])
        x = ((1 - s0) * mu + math.sqrt(var(s0)) * z).float()
        out = sample_loop(sched, x, velocity)
        errors.append((out.double() - (mu + s * z)).abs().max().item())
    orders = [math.log2(errors[k] / errors[k + 1]) for k in range(len(errors) - 1)]
    assert errors[-1] < 3e-3, errors
    assert min(orders) > 1.5, (errors, orders)


@pytest.mark.parametrize('kind', ['unipc', 'dpm'])
def test_dtype_preserved(kind):
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        sched = make(kind, 6, 5.0)
        x = sample_loop(sched, torch.linspace(-1, 1, 8, dtype=dtype), toy_velocity)
        assert x.dtype == dtype


@pytest.mark.parametrize('kind', ['unipc', 'dpm'])
def test_no_state_leaks_across_set_timesteps(kind):
    x0 = torch.randn(32, generator=torch.Generator().manual_seed(11))
    fresh = sample_loop(make(kind, 12, 8.0), x0, toy_velocity)

    sched = make(kind, 12, 8.0)
    x = x0 + 1
    for i, t in enumerate(sched.timesteps[:5]):  # an abandoned partial run
        x = sched.step(toy_velocity(x, float(sched.sigmas[i])), t, x).prev_sample
    reschedule(kind, sched, 12, 8.0)
    assert sched.step_index is None
    assert torch.equal(sample_loop(sched, x0, toy_velocity), fresh)

    # A complete run followed by a new schedule (a second generation) also starts clean.
    reschedule(kind, sched, 12, 8.0)
    assert torch.equal(sample_loop(sched, x0, toy_velocity), fresh)

    # reset() alone rewinds the run too.
    sched.reset()
    assert torch.equal(sample_loop(sched, x0, toy_velocity), fresh)
