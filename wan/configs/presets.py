"""Sampling presets: named sets of sampling settings that override a task config's defaults.

`lightning`: the recipe of the Wan2.2-Lightning T2V-A14B 4-step LoRAs (LightX2V / ModelTC,
"Wan2.2-T2V-A14B-4steps-lora-rank64-Seko-V1.1", released August 2025, with the inference code
of their Wan2.2 fork): flow-matching Euler steps, 4 steps at shift 5.0, i.e. sigmas
shift * s / (1 + (shift - 1) * s) for s = 1, 0.75, 0.5, 0.25 (timesteps 1000, 937.5, 833.3,
625), guidance 1.0 for both experts (no classifier-free guidance), the usual boundary 0.875
(two high-noise steps, two low-noise steps), each expert with its own LoRA at strength 1.0.
The LoRA files are not part of the preset: pass them per expert.
"""
from typing import Any, Dict

__all__ = ['PRESETS']

# keys are task-config keys; sample_guide_scale is (low-noise expert, high-noise expert)
PRESETS: Dict[str, Dict[str, Any]] = {
    'lightning': dict(sample_solver='euler', sample_steps=4, sample_shift=5.0,
                      sample_guide_scale=(1.0, 1.0), boundary=0.875),
}
