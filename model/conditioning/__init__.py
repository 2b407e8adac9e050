"""What the decoder is conditioned on: T5 text states and melody chroma."""
