"""Where weights live: pages given back, huge pages, shape-only modules, the converted-weights cache."""
