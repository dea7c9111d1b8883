"""Quick GPU sanity check before a benchmark: kernels, semantics, compile (seconds)."""
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from wan.modules.attention import attention, available_backends  # noqa: E402
from wan.modules.model import ForwardOptions, WanModel  # noqa: E402

out = {'torch': torch.__version__, 'gpu': torch.cuda.get_device_name(),
       'backends': available_backends()}
print(out, flush=True)
torch.manual_seed(0)
q, k, v = (torch.randn(2, 300, 4, 128, device='cuda') for _ in range(3))
k_lens = torch.tensor([300, 217], device='cuda')
ref = attention(q, k, v, k_lens=k_lens, dtype=torch.float32, backend='sdpa')
for b in out['backends']:
    o = attention(q, k, v, k_lens=k_lens, backend=b)
    out[f'err_{b}'] = ((o - ref).norm() / ref.norm()).item()
    o = attention(q, k, v, backend=b)
    r = attention(q, k, v, dtype=torch.float32, backend='sdpa')
    out[f'err_dense_{b}'] = ((o - r).norm() / r.norm()).item()
print(out, flush=True)
m = WanModel.from_random(seed=0, device='cuda', dtype=torch.bfloat16, dim=512, ffn_dim=1024,
                         num_heads=4, num_layers=2)
lat = [torch.randn(16, 3, 16, 16, device='cuda')]
ctx = [torch.randn(10, 4096, device='cuda', dtype=torch.bfloat16)]
t = torch.tensor([900], device='cuda')
with torch.autocast('cuda', dtype=torch.bfloat16), torch.no_grad():
    m.set_options(ForwardOptions())
    r = m(lat, t, ctx, 192)[0]
    m.set_options(ForwardOptions(attn_backend=out['backends'][0], per_sample_time=True,
                                 fast_rope=True))
    for blk in m.blocks:
        blk.compile()
    t0 = time.time()
    o = m(lat, t, ctx, 192)[0]
    torch.cuda.synchronize()
    out['compile_seconds_small'] = time.time() - t0
    out['compiled_rel_err'] = ((o - r).norm() / r.norm()).item()
    o2 = m([lat[0], lat[0]], torch.tensor([900, 900], device='cuda'), ctx * 2, 192)
    out['compiled_batch2_rel_err'] = ((o2[0] - r).norm() / r.norm()).item()
print(json.dumps(out, indent=1), flush=True)
