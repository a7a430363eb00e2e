"""`python -m localrun`: the same command line as the `localrun` script (for a venv without its bin/ on PATH)."""

from .cli import main

if __name__ == "__main__":
    main()
