"""The decoder and its token loop: layers, quantised linears, patterns, sampling, scheduling, precision."""
