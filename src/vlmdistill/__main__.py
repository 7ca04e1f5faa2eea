"""``python -m vlmdistill``: the command line, so ``torchrun ... -m vlmdistill train CONFIG`` runs it per rank."""

from vlmdistill.cli import run

run()
