"""Command-line tools: data fetching, baselines and leaderboards."""
