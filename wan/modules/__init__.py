from .attention import attention, flash_attention
from .model import WanModel
from .t5 import T5EncoderModel
from .tokenizers import HuggingfaceTokenizer
from .vae2_1 import Wan2_1_VAE

__all__ = ['WanModel', 'T5EncoderModel', 'HuggingfaceTokenizer', 'Wan2_1_VAE', 'attention',
           'flash_attention']
