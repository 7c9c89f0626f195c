"""Backends run the adapters' ops: NumPy on the CPU (the reference), PyCUDA on the GPU."""
