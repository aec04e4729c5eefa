"""`python -m mimic_fast.bench ...` = `mimic-fast bench ...`."""
import sys

from . import main

sys.exit(main())
