"""Command lines: ``dwirecon`` (file-level stages) and, later, ``dwiflow`` (BIDS App)."""
