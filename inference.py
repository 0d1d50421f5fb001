#!/usr/bin/env python
"""The paper's decoding command, `python inference.py MODEL TARGET [key=value ...]`: `dqwhisper decode` under its
old name (dqwhisper/inference.py)."""

import sys

from dqwhisper.inference import main

if __name__ == "__main__":
    sys.exit(main())
