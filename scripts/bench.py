"""Time the guided step and a whole edit with and without each fast path (``blended.benchmark``'s command line).

Usage (from the repository root):

    PYTHONPATH=. .venv/bin/python scripts/bench.py                      # tiny fixture, CPU, faithful fp32
    PYTHONPATH=. .venv/bin/python scripts/bench.py --short              # CI smoke run: a few seconds
    PYTHONPATH=. .venv/bin/python scripts/bench.py --preset faithful,fast-cpu --batch 4
    PYTHONPATH=. .venv/bin/python scripts/bench.py --config full256 --device cuda --preset fast-gpu \\
        --batch 1,4,16 --steps 75 --views 8

Run with ``--help`` for every option; ``scripts/gpu_compare.py`` runs it beside the original on a GPU.
"""

import logging

from blended.benchmark import main

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main()
