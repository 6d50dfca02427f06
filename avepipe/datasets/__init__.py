"""Dataset formats: real AVE / UnAV-100 parsers, the sample index, synthetic generators."""
