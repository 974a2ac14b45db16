#!/usr/bin/env python3
"""Convert model weights: a Hugging Face folder (safetensors or pytorch_model.bin), a GGUF file, a llama2.c
checkpoint (+ tokenizer.bin) or a minirt low-rank export → a GGUF file or a Hugging Face folder.

    python tools/convert.py SRC DST [--type F32|F16|BF16|Q8_0|Q4_0|Q4_1] [--tokenizer tokenizer.bin]

The same as `minirt convert`; the work is done by minirt.convert (see docs/CONVERSION.md)."""
import sys

from minirt.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
