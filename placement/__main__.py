"""`python -m placement`, and launchers that run a module (`torchrun -m placement`, `accelerate launch -m placement`)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main(prog_name="placement"))
