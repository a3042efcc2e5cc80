"""Fine-tuning Qwen LLMs for generative recommendation (BIGRec) in JAX/Flax NNX."""
