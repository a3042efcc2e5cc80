"""RQ-VAE semantic-ID tokenizer (TIGER-style residual quantisation) in Flax NNX."""
