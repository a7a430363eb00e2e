"""Write a tiny random Gemma 4 checkpoint in the Hugging Face layout.

    python scripts/make_tiny_model.py OUT [--kind moe|moe_v|dense_e2b] [--layout text|multimodal] [--seed N]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from localrun.tiny import tiny_config, write_checkpoint  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="directory to write (created if missing)")
    parser.add_argument("--kind", choices=["moe", "moe_v", "dense_e2b"], default="moe")
    parser.add_argument("--layout", choices=["text", "multimodal"], default="text")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = write_checkpoint(args.out, tiny_config(args.kind), layout=args.layout, seed=args.seed)
    print(f"wrote tiny {args.kind} checkpoint ({args.layout} layout, seed {args.seed}) to {out}")


if __name__ == "__main__":
    main()
