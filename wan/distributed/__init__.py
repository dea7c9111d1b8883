"""Multi-GPU support: FSDP sharding, Ulysses sequence parallelism, CFG parallelism."""
