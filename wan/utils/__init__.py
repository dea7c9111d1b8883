"""Solvers, video saving and loading helpers.

The scheduler names are resolved lazily so that importing `wan.utils.checkpoint` (needed by
every model) does not import the solvers.
"""
import importlib

_LAZY = {
    'FlowDPMSolverMultistepScheduler': 'fm_solvers',
    'get_sampling_sigmas': 'fm_solvers',
    'retrieve_timesteps': 'fm_solvers',
    'FlowUniPCMultistepScheduler': 'fm_solvers_unipc',
    'FlowEulerScheduler': 'fm_solvers_euler',
}

__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f'.{_LAZY[name]}', __name__), name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
