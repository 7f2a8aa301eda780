"""Independent references, written from the published algorithms in NumPy; nothing here imports vitq."""
