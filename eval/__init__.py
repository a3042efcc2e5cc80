"""The shared evaluation library: data sets and splits, metrics, protocols, result tables."""
