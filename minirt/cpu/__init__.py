"""The CPU engine: ISA primitives (isa.py: the per-ISA integer dot products), the block-format kernels built on
them (qmatmul.py), the float kernels (kernels.py: norms, RoPE, attention, activations) and threads (threads.py)."""
