"""numba kernels: plain contiguous NumPy arrays in and out, nothing of torch."""
