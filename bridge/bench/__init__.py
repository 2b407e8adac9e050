"""Measurement only, never imported at run time: `musicbridge bench --jam`."""
