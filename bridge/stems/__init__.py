"""Stems: plans, the job queue, engine requests, fitting to the grid, writing to disk."""
