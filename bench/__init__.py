"""The benchmark of wan-fast, as a package (`benchmark_t2v.py` is its command line).

- `bench.schema`: the results JSON as types, and the numbers derived from the measurements
  (`derive`, `derive_scaling`, `psnr`, `agreement`, projections); atomic JSON writes;
- `bench.instrument`: `StageRecorder`, the observer that times the pipeline's stages;
- `bench.ceilings`: FLOP counts, the measured bf16 GEMM rate and attention kernels, the floor;
- `bench.checks`: argument and machine checks made before anything is built;
- `bench.runs`: one benchmark process (modes, agreement, profiles);
- `bench.ablation`: each optimization toggle flipped in a fresh process;
- `bench.scaling`: one torchrun per GPU count;
- `bench.cli`: the flags and `main` of `benchmark_t2v.py`;
- `bench.targets`: the targets and claims the documents judge the results against;
- `bench.render`: the measured tables of the OPTIMIZATION_*.md documents.

Scripts next to these (`vae_check.py`, `gpu_check.py`, `toggle_check.py`) are GPU diagnostics.
"""
