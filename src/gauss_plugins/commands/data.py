"""``gauss data``: fetch and inspect datasets.

    gauss data download movielens-1m [--dest FOLDER] [--force]
    gauss data info ml-100k [--data-path PATH]
    gauss data list

Datasets live in the data folder ($GAUSS_DATA, else ../shared/data beside the checkout, else
~/.cache/gauss_plugins/data): see gauss_plugins.data.locate.
"""
from __future__ import annotations

import argparse
import sys

# Mirrors gauss_plugins.data.download.DATASETS (a test keeps them equal): building the CLI
# parser must not import the data package.
DOWNLOADABLE = ("movielens-100k", "movielens-1m", "movielens-20m", "movielens-25m")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("data", help="download MovieLens (checksum-verified) and inspect datasets",
                              description="Download and inspect event datasets.")
    sub = p.add_subparsers(dest="data_command", metavar="ACTION")
    d = sub.add_parser("download", help="download a MovieLens archive from GroupLens, verify its MD5, extract it")
    d.add_argument("name", choices=DOWNLOADABLE, help="which dataset")
    d.add_argument("--dest", help="folder to extract into (default: the data folder, where every command looks: "
                                  "$GAUSS_DATA, else ../shared/data beside the checkout, else ~/.cache/gauss_plugins/data)")
    d.add_argument("--force", action="store_true", help="download again even if the folder exists")
    d.add_argument("--timeout", type=float, default=30.0, help="network timeout in seconds")
    i = sub.add_parser("info", help="load a dataset and print its size and sequence lengths")
    i.add_argument("name", help="a registered dataset (ml-100k, ml-1m, ml-20m, ml-25m, seqfile, synthetic, ...)")
    i.add_argument("--data-path", help="file or folder (default: NAME/ in the data folder, see `gauss data list`)")
    sub.add_parser("list", help="the data folder, registered datasets and downloadable archives")
    return p


def run(args: argparse.Namespace) -> int:
    from gauss_plugins.data.download import DATASETS, DownloadError, download_dataset
    from gauss_plugins.data.locate import data_root, load_configured_dataset

    action = getattr(args, "data_command", None)
    if action == "download":
        ds = DATASETS[args.name]
        dest = args.dest if args.dest is not None else data_root().path
        print(f"downloading {ds.url} (~{ds.size_mb} MB, MD5 {ds.md5}) into {dest}/{ds.folder} ...", flush=True)
        try:
            folder = download_dataset(args.name, dest, force=args.force, timeout_s=args.timeout)
        except DownloadError as exc:
            print(f"gauss data download: {exc}", file=sys.stderr)
            return 1
        print(f"{folder} is ready (checksum verified). MovieLens is for research use with acknowledgement: "
              f"see {folder}/README*")
        return 0
    if action == "info":
        try:
            seqs = load_configured_dataset(args.name, args.data_path)
        except (FileNotFoundError, ValueError, KeyError) as exc:
            # KeyError's str() quotes its message; show the message itself
            print(f"gauss data info: {exc.args[0] if isinstance(exc, KeyError) else exc}", file=sys.stderr)
            return 2
        print(seqs.describe())
        return 0
    if action == "list":
        from gauss_plugins.plugins import get_registry

        root = data_root()
        print(f"data folder: {root.path} (from {root.source}; set $GAUSS_DATA to change it)")
        print("registered datasets:")
        for comp in get_registry().components("dataset"):
            print(f"  {comp.name:<10} {comp.description} [{comp.provider}]")
        print("downloadable (gauss data download NAME):")
        for ds in DATASETS.values():
            print(f"  {ds.name:<15} {ds.url} (~{ds.size_mb} MB)")
        return 0
    print("gauss data: choose an action: download, info, list (see gauss data --help)", file=sys.stderr)
    return 2
