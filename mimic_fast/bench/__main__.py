"""`python -m mimic_fast.bench ...` = `mimic-fast bench ...` (its errors are one line, as there)."""
import sys

from ..cli import main

sys.exit(main(["bench", *sys.argv[1:]]))
