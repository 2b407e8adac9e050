"""EnCodec: tokens to audio (whole or streamed) and audio to tokens."""
