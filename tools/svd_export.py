#!/usr/bin/env python3
"""Export a low-rank model: the same as `minirt svd ARGS` (see `minirt svd --help`).

    python3 tools/svd_export.py smollm2 --params 0.9 --calibration notes.txt --factor-type Q8_0
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minirt.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["svd", *sys.argv[1:]]))
