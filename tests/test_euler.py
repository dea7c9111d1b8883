"""FlowEulerScheduler (wan/utils/fm_solvers_euler.py) and the Lightning preset (CPU)."""
import inspect

import numpy as np
import pytest
import torch

from wan.configs.presets import PRESETS
from wan.utils.fm_solvers import (FlowDPMSolverMultistepScheduler, SchedulerOutput,
                                  get_sampling_sigmas, retrieve_timesteps)
from wan.utils.fm_solvers_euler import FlowEulerScheduler
from wan.utils.fm_solvers_unipc import FlowUniPCMultistepScheduler


def lightning_scheduler():
    recipe = PRESETS['lightning']
    s = FlowEulerScheduler(num_train_timesteps=1000, shift=1, use_dynamic_shifting=False)
    s.set_timesteps(recipe['sample_steps'], device='cpu', shift=recipe['sample_shift'])
    return s


def test_lightning_timesteps_and_sigmas():
    s = lightning_scheduler()
    # shift * u / (1 + (shift - 1) * u) for u = 1, .75, .5, .25 at shift 5
    sig = [1.0, 3.75 / 4.0, 2.5 / 3.0, 1.25 / 2.0]
    assert s.timesteps.dtype == torch.float32
    assert torch.equal(s.timesteps, torch.tensor([1000 * x for x in sig], dtype=torch.float32))
    assert s.timesteps[:2].tolist() == [1000.0, 937.5] and s.timesteps[3].item() == 625.0
    assert abs(s.timesteps[2].item() - 833.3333) < 1e-4
    assert torch.equal(s.sigmas, torch.tensor(sig + [0.0], dtype=torch.float32))


def lightning_float32(steps, shift):
    """The Lightning code's arithmetic: float32 linspace over 1000..0, shift in float32."""
    u = np.linspace(1000, 0, steps + 1, dtype=np.float32) / np.float32(1000)
    sigmas = np.float32(shift) * u / (1 + np.float32(shift - 1) * u)
    return torch.from_numpy(sigmas), torch.from_numpy(sigmas[:-1] * np.float32(1000))


def test_recipe_values_equal_the_lightning_float32_computation():
    """Same bits for the recipe; other schedules (computed in float64, rounded once, like the
    other solvers) are within one float32 step of the float32 computation."""
    s = lightning_scheduler()
    sigmas, timesteps = lightning_float32(4, 5.0)
    assert torch.equal(s.sigmas, sigmas) and torch.equal(s.timesteps, timesteps)
    for steps, shift in ((8, 5.0), (6, 3.0), (5, 12.0)):
        s = FlowEulerScheduler()
        s.set_timesteps(steps, shift=shift)
        sigmas, timesteps = lightning_float32(steps, shift)
        torch.testing.assert_close(s.sigmas, sigmas, rtol=1.2e-7, atol=0)
        torch.testing.assert_close(s.timesteps, timesteps, rtol=1.2e-7, atol=0)


def test_truncated_timesteps_are_those_of_dpmpp():
    """The documented rounding: int64 truncation of the Euler timesteps is exactly what the
    DPM++ path (get_sampling_sigmas) feeds the model; UniPC's default starts at 999."""
    s = lightning_scheduler()
    dpm = FlowDPMSolverMultistepScheduler(shift=1)
    dpm_t, _ = retrieve_timesteps(dpm, sigmas=get_sampling_sigmas(4, 5.0))
    assert dpm_t.tolist() == [1000, 937, 833, 625]
    assert torch.equal(s.timesteps.to(torch.int64), dpm_t)
    unipc = FlowUniPCMultistepScheduler(shift=1)
    unipc.set_timesteps(4, shift=5.0)
    assert unipc.timesteps[0].item() == 999


def test_lightning_expert_split():
    recipe = PRESETS['lightning']
    boundary = recipe['boundary'] * 1000
    experts = ['high' if t.item() >= boundary else 'low' for t in lightning_scheduler().timesteps]
    assert experts == ['high', 'high', 'low', 'low']
    assert recipe['sample_solver'] == 'euler' and recipe['sample_guide_scale'] == (1.0, 1.0)


@pytest.mark.parametrize('steps,shift', [(4, 5.0), (7, 12.0), (1, 1.0)])
def test_exact_on_a_straight_flow(steps, shift):
    """x_t = (1 - s) x0 + s n has velocity n - x0: every step stays on the line and the last
    one lands on x0."""
    g = torch.Generator().manual_seed(0)
    x0, n = torch.randn(2, 16, 3, 4, 4, generator=g).unbind(0)
    s = FlowEulerScheduler()
    s.set_timesteps(steps, shift=shift)
    x = n.clone()  # sigma_0 = 1
    for i, t in enumerate(s.timesteps):
        x = s.step(n - x0, t, x).prev_sample
        sigma = s.sigmas[i + 1].double()
        torch.testing.assert_close(x.double(), (1 - sigma) * x0.double() + sigma * n.double(),
                                   rtol=0, atol=2e-6)
    torch.testing.assert_close(x, x0, rtol=0, atol=2e-6)


def test_step_is_the_euler_update_in_float32():
    s = lightning_scheduler()
    x = torch.randn(1, 16, 2, 4, 4, dtype=torch.float64)
    v = torch.randn_like(x)
    out, = s.step(v, s.timesteps[0], x, return_dict=False)
    assert out.dtype == torch.float64
    want = (x.float() + (s.sigmas[1] - s.sigmas[0]) * v.float()).double()
    assert torch.equal(out, want)
    assert s.step_index == 1


def test_api_parity_with_the_other_schedulers():
    others = (FlowUniPCMultistepScheduler, FlowDPMSolverMultistepScheduler)
    params = lambda cls, m: list(inspect.signature(getattr(cls, m)).parameters)  # noqa: E731
    for other in others:
        assert params(FlowEulerScheduler, 'set_timesteps') == params(other, 'set_timesteps')
        assert params(FlowEulerScheduler, 'step')[:6] == params(other, 'step')[:6]
    s = FlowEulerScheduler(num_train_timesteps=1000, shift=1, use_dynamic_shifting=False)
    assert s.order == 1 and len(s) == 1000 and s.config.num_train_timesteps == 1000
    s.set_timesteps(3, device='cpu', shift=5.0)
    assert s.num_inference_steps == 3 and s.sigmas.shape == (4,) and s.sigmas[-1] == 0
    assert s.sigmas.dtype == torch.float32 and s.sigmas.device.type == 'cpu'
    x = torch.zeros(1, 2, 1, 2, 2)
    assert s.scale_model_input(x, s.timesteps[0]) is x
    out = s.step(torch.ones_like(x), s.timesteps[0], x)
    assert isinstance(out, SchedulerOutput) and out[0] is out.prev_sample
    for t in s.timesteps[1:]:
        s.step(torch.ones_like(x), t, x)
    with pytest.raises(ValueError, match='all 3 steps'):
        s.step(torch.ones_like(x), s.timesteps[-1], x)
    s.set_timesteps(3, shift=5.0)  # a new run starts from the beginning
    assert s.step_index is None
    with pytest.raises(ValueError, match='not in the scheduler timesteps'):
        s.step(x, 937, x)  # the truncated value is not a timestep of this schedule
    # custom sigmas (shifted like the others) and retrieve_timesteps
    t, n = retrieve_timesteps(FlowEulerScheduler(shift=1), sigmas=[1.0, 0.5], shift=3.0)
    assert n == 2 and t.tolist() == [1000.0, 750.0]
    # the noising helper of the base class
    s.set_timesteps(4, shift=5.0)
    noisy = s.add_noise(torch.zeros(1, 2), torch.ones(1, 2), s.timesteps[1:2])
    assert torch.allclose(noisy, torch.full((1, 2), 0.9375))
    with pytest.raises(ValueError):
        s.set_timesteps(0)


def test_dynamic_shift_uses_mu():
    s = FlowEulerScheduler(use_dynamic_shifting=True)
    with pytest.raises(ValueError, match='mu'):
        s.set_timesteps(4)
    s.set_timesteps(4, mu=1.0)
    u = np.linspace(1, 0, 5)[:-1]
    want = np.e / (np.e + (1 / u - 1))
    assert torch.allclose(s.sigmas[:-1].double(), torch.from_numpy(want), atol=1e-7)
