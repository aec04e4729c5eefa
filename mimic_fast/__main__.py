"""`python -m mimic_fast ...` is the `mimic-fast` command (torchrun: `torchrun ... -m mimic_fast`)."""
from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
