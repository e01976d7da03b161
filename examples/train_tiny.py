"""Train the shipped "tiny" model (Infinity architecture, 512x512, 10 scales, 2521 tokens) from scratch on
procedurally generated pictures, and write a servable weights folder.

    python examples/train_tiny.py --out varserve/weights/tiny --minutes 20

One H100: ~20 minutes wall clock in all (scenes, VAE, transformer, export, evaluation of 50 held-out prompts with
the dense full-cache generation path). Every option: `python examples/train_tiny.py --help`; the phases and what
they write: varserve/training/train.py.
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from varserve.training.train import main  # noqa: E402

if __name__ == "__main__":
    main()
