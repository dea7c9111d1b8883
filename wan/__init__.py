"""wan-fast: a drop-in optimized Wan2.2 text-to-video implementation."""
from . import configs, distributed, modules, utils
from .text2video import WanT2V
from .text2video_optimized import WanT2VOptimized

__all__ = ['WanT2V', 'WanT2VOptimized', 'configs', 'distributed', 'modules', 'utils']
