"""The trainer: accelerate launch, DeepSpeed ZeRO for every network, model plugins."""
