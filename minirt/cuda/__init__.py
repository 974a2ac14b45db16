"""The GPU backend (backend.py: GPUModel, the device cache, sampling, the speculative loop; CuPy) and its CUDA
kernels (kernels.py)."""
