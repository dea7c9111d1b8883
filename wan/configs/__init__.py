"""Task configs and size tables (docs/PIPELINE.md#task-config, docs/PIPELINE.md#sizes)."""
import copy
import os

os.environ['TOKENIZERS_PARALLELISM'] = 'false'

from .wan_t2v_A14B import t2v_A14B
from .wan_t2v_tiny import t2v_tiny

# Tasks of the reference that this project does not implement. They stay in the registry so
# that `--task` accepts the reference's names and can refuse them with a clear message.
UNSUPPORTED_TASKS = ('i2v-A14B', 'ti2v-5B', 'animate-14B', 's2v-14B')

WAN_CONFIGS = {
    't2v-A14B': t2v_A14B,
    't2v-tiny': t2v_tiny,
}
for _task in UNSUPPORTED_TASKS:
    _cfg = copy.deepcopy(t2v_A14B)
    _cfg.__name__ = f'Config: {_task} (not supported by this project)'
    _cfg.unsupported = True
    WAN_CONFIGS[_task] = _cfg

# "W*H" -> (W, H)
SIZE_CONFIGS = {
    '720*1280': (720, 1280),
    '1280*720': (1280, 720),
    '480*832': (480, 832),
    '832*480': (832, 480),
    '704*1280': (704, 1280),
    '1280*704': (1280, 704),
    '1024*704': (1024, 704),
    '704*1024': (704, 1024),
    # tiny demo sizes (this project's addition, used by t2v-tiny only)
    '128*64': (128, 64),
    '64*128': (64, 128),
    '128*128': (128, 128),
}

MAX_AREA_CONFIGS = {key: w * h for key, (w, h) in SIZE_CONFIGS.items()}

SUPPORTED_SIZES = {
    't2v-A14B': ('720*1280', '1280*720', '480*832', '832*480'),
    't2v-tiny': ('128*64', '64*128', '128*128', '832*480'),
    'i2v-A14B': ('720*1280', '1280*720', '480*832', '832*480'),
    'ti2v-5B': ('704*1280', '1280*704'),
    's2v-14B': ('720*1280', '1280*720', '480*832', '832*480', '1024*704', '704*1024',
                '704*1280', '1280*704'),
    'animate-14B': ('720*1280', '1280*720'),
}



def default_size(task: str) -> str:
    """The CLI's default --size for `task`: the reference's 1280*720 where supported."""
    return '1280*720' if '1280*720' in SUPPORTED_SIZES[task] else SUPPORTED_SIZES[task][0]


__all__ = ['default_size', 'WAN_CONFIGS', 'SIZE_CONFIGS', 'MAX_AREA_CONFIGS', 'SUPPORTED_SIZES',
           'UNSUPPORTED_TASKS']
