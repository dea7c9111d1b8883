"""wan-fast: a drop-in optimized Wan2.2 text-to-video implementation."""
from . import configs, distributed, modules, utils
from .text2video import WanT2V

__all__ = ['WanT2V', 'configs', 'distributed', 'modules', 'utils']
