"""`python -m lorakit ...`, which torchrun runs on each process: `torchrun --nproc_per_node 2 -m lorakit train my.yaml`."""

import sys

from lorakit.cli import main

if __name__ == "__main__":
    sys.exit(main())
