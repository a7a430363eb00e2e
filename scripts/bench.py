"""`localrun bench` from a checkout: python scripts/bench.py bench --compare transformers [--out FILE.md] ...

Same options as the command (python scripts/bench.py --help); the measuring lives in localrun/bench.py.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from localrun.cli import main  # noqa: E402

if __name__ == "__main__":
    main(["bench", *sys.argv[1:]])
