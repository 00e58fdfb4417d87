"""Memory-lean replacements for hot blocks of the decoder, each with a plain-PyTorch twin as oracle."""
