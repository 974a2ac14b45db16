"""The CPU engine: ISA primitives (isa.py) and the block-format kernels built on them (qmatmul.py)."""
