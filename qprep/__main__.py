"""`python -m qprep ...`, as `torchrun --nproc-per-node N -m qprep train ...` starts each rank."""

from qprep.cli import main

if __name__ == "__main__":
    main()
