"""``python -m mf_edge.train ARGS`` = ``mf-edge train ARGS`` (handy under ``torchrun -m``)."""

import sys

from mf_edge.cli import main

if __name__ == "__main__":
    main(["train", *sys.argv[1:]])
