"""One module per PEFT method; each registers itself with :mod:`peftlab.registry`."""
