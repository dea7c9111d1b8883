"""Record the tensor names that diffusers and transformers give tiny Wan models.

    pip install diffusers transformers   # in a scratch environment
    python tests/data/record_external_names.py

Writes tests/data/external_names.json: the state-dict names (and shapes) of a tiny
`WanTransformer3DModel`, `AutoencoderKLWan` and `UMT5EncoderModel`, built with the same sizes as
this project's tiny models. tests/test_formats.py checks the name maps of wan/utils/formats.py
against these lists, so that CI (which installs neither diffusers nor needs the network) still
compares with what the libraries really write. Re-record when a library renames its modules.
"""
from __future__ import annotations

import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))

# the sizes of tests/test_formats.py's tiny models
DIT = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=16,
           out_channels=16, text_dim=32, freq_dim=256, ffn_dim=128, num_layers=2,
           cross_attn_norm=True, qk_norm='rms_norm_across_heads', eps=1e-6)
VAE = dict(base_dim=8, z_dim=16)
T5 = dict(vocab_size=384, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
          relative_attention_num_buckets=32, feed_forward_proj='gated-gelu')


def main() -> None:
    import diffusers
    import transformers
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    def shapes(model):
        return {k: list(v.shape) for k, v in model.state_dict().items()}

    out = {
        'versions': {'diffusers': diffusers.__version__,
                     'transformers': transformers.__version__},
        'dit_config': {k: list(v) if isinstance(v, tuple) else v for k, v in DIT.items()},
        'dit': shapes(WanTransformer3DModel(**DIT)),
        'vae_config': VAE,
        'vae': shapes(AutoencoderKLWan(**VAE)),
        't5_config': T5,
        't5': shapes(UMT5EncoderModel(UMT5Config(**T5))),
    }
    path = os.path.join(HERE, 'external_names.json')
    with open(path, 'w') as f:
        json.dump(out, f, indent=1, sort_keys=True)
    print(f'wrote {path}')


if __name__ == '__main__':
    main()
