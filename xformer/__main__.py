"""``python -m xformer``: the command line (:func:`xformer.cli.main`); what ``torchrun -m
xformer`` and ``xformer train --nproc N`` start on every worker."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
