"""The CPU engine: ISA primitives (isa.py), the block-format kernels built on them (qmatmul.py), the float
kernels (kernels.py: norms, RoPE, attention, activations), quantized matmuls (qkernels.py) and threads (threads.py)."""
