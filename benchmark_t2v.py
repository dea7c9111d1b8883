"""Benchmark the reference path (WanT2V) against the optimized one (WanT2VOptimized).

    python benchmark_t2v.py --mode both --size 1280*720 --sample_steps 4 --save_results
    python benchmark_t2v.py --mode optimized --size 832*480 --ablate --save_results
    python benchmark_t2v.py --task t2v-tiny --mode both            # CPU smoke test
    torchrun --nproc_per_node=4 benchmark_t2v.py --mode optimized --ulysses_size 4
    python benchmark_t2v.py --mode optimized --scaling 1 2 4 --output scaling.json

Both modes run in one process on the same weights, seed and prompt, so that speed-ups and
output agreement come from one run on one GPU (bench/runs.py). `--ablate` runs each
optimization toggle flipped, every configuration in a fresh process (bench/ablation.py).
`--scaling` launches one torchrun per GPU count (bench/scaling.py).

Measured per mode: model build/load, T5 encode, DiT time per denoising step for each expert
(CUDA events, median over the steps after --warmup), expert switch/offload cost, VAE decode,
end-to-end generate(), peak GPU memory, first-step overhead (compile included), achieved
TFLOP/s. Measured once: the ceilings (bf16 GEMM rate, every available attention kernel at
this size) and from them the floor per forward (bench/ceilings.py). 40-step totals are
labelled "projected from measured stages". A short benchmark needs both experts to run in few
steps, so by default the boundary is moved to split the steps evenly between the experts
(recorded in the JSON); the projection uses the real 40-step split (26 high-noise, 14
low-noise for t2v-A14B). The JSON's schema: bench/schema.py.

A JSON is written only when asked: --output PATH, or --save_results for a name under
bench/results/ (--scaling and --ablate, long multi-process runs, otherwise write to a
temporary file and print its name). While a run is going, and after a failure, what it has
measured so far is in PATH.partial; a finished run leaves PATH only.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench.cli import main  # noqa: E402

__all__ = ['main']

if __name__ == '__main__':
    main()
