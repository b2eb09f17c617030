"""Script entry point for the serving benchmark; same flags as `vllm-slora bench`.

    python benchmarks/serving/run_bench.py --systems base,stock,slora --num-adapters 1,8,32

The __main__ guard matters: --offline runs vLLM in-process, and vLLM spawns engine
processes that re-import the main module.
"""

import argparse
import sys

from vllm_slora.bench.cli import add_bench_arguments, run_bench

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_bench_arguments(parser)
    sys.exit(run_bench(parser.parse_args()))
