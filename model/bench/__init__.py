"""Measurement only, never imported at run time: our engine against transformers, end to end."""
