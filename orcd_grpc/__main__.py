"""`python -m orcd_grpc ...` is the `orcd` command (handy where the console script is not on PATH)."""
import sys

from .cli import main

sys.exit(main())
