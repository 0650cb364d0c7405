"""Making adapters: extraction from fine-tunes, conversion between methods, combination."""
