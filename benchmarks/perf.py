"""Speed and memory of the corrected forward, as ratios to the plain forward (same as `dmc perf`).

    python benchmarks/perf.py --out results/perf [--threads 2] [--repeats 7]
"""

import argparse
import sys

from torch_dmc.bench.perf import add_perf_arguments, run_perf

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_perf_arguments(parser)
    sys.exit(run_perf(parser.parse_args()))
