"""HSTU and SASRec sequential recommenders in Flax NNX."""
