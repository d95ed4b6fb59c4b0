"""`python -m runtime sample ...` (a copy of runtime/ on a board) or `python -m cfg_export.runtime`."""
from .cli import main

main(prog_name="python -m runtime")
