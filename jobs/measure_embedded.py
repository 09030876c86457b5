"""Measure the embedded model against its acceptance criteria; the numbers in docs/embedded.md.

    python jobs/measure_embedded.py [--n 512] [--seed 0] [--threads 2] [--json out.json]

Prints a markdown table (attribute accuracy, FD in the domain CLIP's space, CLIP score,
matched-beats-shuffled) for the shipped weights at several settings, a random UNet and
rendered ground truth; the library is pipelines/embedded/measure.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from pipelines.embedded.measure import measure, to_markdown  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=512, help="captions sampled from the grammar, one image each per run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = measure(args.n, args.seed)
    print(to_markdown(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
