"""verl's own Megatron checkpoint code (``MegatronCheckpointManager``), plugged into megatron-lora-compat."""
