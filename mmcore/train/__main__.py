"""`python -m mmcore.train`: see mmcore/train/here.py."""

from mmcore.train.here import main

main()
