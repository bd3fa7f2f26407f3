"""Reproduce the HSTU paper's Table 4 (MovieLens 1M) in one command.

    python benchmarks/ml1m_paper_table.py --data-path /path/to/ml-1m --accelerator gpu
    # no data yet?  gauss data download movielens-1m --dest data   (then --data-path data/ml-1m)

Trains SASRec, HSTU and HSTU-large with src/gauss_plugins/configs/ml-1m-*.yaml (the paper's settings, 101
epochs), selects each on validation NDCG@10, and prints test HR@10 / NDCG@10 beside the
paper's numbers (SASRec .2853/.1603, HSTU .3097/.1720, HSTU-large .3294/.1893). Writes
benchmarks/results/ml1m_paper_table.json (and .md). Use --seeds for several seeds.
"""
from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

PAPER = {"sasrec": (0.2853, 0.1603), "hstu": (0.3097, 0.1720), "hstu-large": (0.3294, 0.1893)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-path", help="ml-1m folder (default: $GAUSS_DATA or ../shared/data/ml-1m)")
    p.add_argument("--accelerator", choices=["cpu", "gpu"], default="gpu")
    p.add_argument("--seeds", type=int, nargs="+", default=[42])
    p.add_argument("--max-epochs", type=int, default=None, help="override the configs' 101 epochs")
    p.add_argument("--models", nargs="+", default=list(PAPER), choices=list(PAPER))
    p.add_argument("--workdir", default=os.path.join(REPO, "runs", "ml1m_paper_table"))
    p.add_argument("--out", default=os.path.join(HERE, "results", "ml1m_paper_table.json"))
    p.add_argument("--resume", action="store_true")
    args = p.parse_args(argv)

    from gauss_plugins.train.compare import markdown_table, run_comparison
    from gauss_plugins.train.config import load_config, with_overrides

    configs = {m: with_overrides(load_config(f"ml-1m-{m}"),
                                 data__path=args.data_path, train__accelerator=args.accelerator,
                                 train__max_epochs=args.max_epochs)
               for m in args.models}
    try:
        result = run_comparison(configs, args.seeds, args.workdir, result_path=args.out, resume=args.resume,
                                extra={"paper_table4_ml1m": {m: {"hr@10": v[0], "ndcg@10": v[1]} for m, v in PAPER.items()}})
    except (FileNotFoundError, ValueError) as exc:
        print(f"{os.path.basename(__file__)}: {exc}", file=sys.stderr)
        return 2
    print("\nmodel        ours HR@10  paper   ours NDCG@10  paper")
    for m in args.models:
        s = result["summary"][m]
        print(f"{m:<12} {s['test/hr@10']['mean']:.4f}      {PAPER[m][0]:.4f}  {s['test/ndcg@10']['mean']:.4f}        {PAPER[m][1]:.4f}")
    md_path = os.path.splitext(args.out)[0] + ".md"
    with open(md_path + ".tmp", "w") as f:
        f.write("# MovieLens 1M, paper Table 4 settings\n\n" + markdown_table(result["summary"], "test") + "\n\n"
                "Paper (HR@10 / NDCG@10): SASRec .2853/.1603, HSTU .3097/.1720, HSTU-large .3294/.1893.\n")
    os.replace(md_path + ".tmp", md_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
