#!/usr/bin/env python
"""The study of the papers' claims: ``python scripts/study.py --all`` (every claim, the
committed scale) or ``--quick`` (a smoke run). The same as ``python -m scripts.study.run``;
the code lives in the ``scripts/study/`` package next to this file (see its ``run.py``)."""
import os
import sys

if __name__ == "__main__":
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path[0] = root  # import the package scripts.study, not this file
    from scripts.study.run import main
    sys.exit(main())
