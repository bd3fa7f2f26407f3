"""``gauss export`` and ``gauss rank``: a trained HSTU model to a ``.pt2`` ranker, and
serving it from text requests.

    gauss export --checkpoint runs/demo/hstu-seed42 --out model.pt2 --snapshot rows.gsnp [--config demo-hstu]
    gauss rank --package model.pt2 --snapshot rows.gsnp < requests.txt

``gauss export`` rebuilds the model from the checkpoint (its stored config; ``--config``
must agree with it), exports the ranker program with the ``aoti`` export target (``--head
retrieval``, the default, scores as training and evaluation did: ``<query, item>``;
``--head mfalcon`` appends the candidates as M-FALCON targets),
runs the parity check (the export fails when eager and compiled differ by more than
``--tolerance``) and, with ``--snapshot``, freezes the item rows into a ``.gsnp`` file whose
path goes into the package metadata. ``gauss rank`` reads ``<history ids> | <candidate ids>``
lines and prints one line of ``%.9g`` scores per request (the format of the C++ runner).
"""
from __future__ import annotations

import argparse
import os
import sys


def add_parser(subparsers) -> argparse.ArgumentParser:
    rank = subparsers.add_parser(
        "rank",
        help="score candidates with a .pt2 ranker: '<history ids> | <candidate ids>' lines in, scores out",
        description="Read requests, one per line: '<history item ids> | <candidate item ids>' (space-separated), "
                    "from --input or stdin; print one line per request with the candidates' scores ('%%.9g', "
                    "space-separated). Rows come from --snapshot, else from the snapshot named in the package.",
    )
    rank.add_argument("--package", required=True, help="the .pt2 written by `gauss export`")
    rank.add_argument("--snapshot", help="the .gsnp rows (default: the package's embedding_source)")
    rank.add_argument("--input", help="request file (default: stdin)")
    rank.add_argument("--batch-size", type=int, default=256, help="users scored per call of the package (default 256)")
    rank.set_defaults(_run=run_rank)

    build = subparsers.add_parser(
        "build-runner",
        help="build gauss-runner, the C++ server of .pt2 rankers (cmake + g++, libtorch of this torch)",
        description="Compile gauss-runner (serves a .pt2 without Python; rows from a .gsnp snapshot or Redis) and "
                    "print its path. Cached by source hash: a second call returns at once.",
    )
    build.add_argument("--build-dir", help="put the binary here instead of the cache folder")
    build.add_argument("--force", action="store_true", help="rebuild even when an up-to-date binary exists")
    build.set_defaults(_run=run_build_runner)

    p = subparsers.add_parser(
        "export",
        help="export a trained HSTU model to an AOTInductor .pt2 ranker, parity-checked",
        description="Rebuild the model of a `gauss train` run, export its ranking program (--head) with "
                    "torch.export + AOTInductor, check the compiled package against eager on random inputs, and "
                    "write it atomically. With --snapshot, also freeze the item embedding rows into a .gsnp file.",
    )
    p.add_argument("--checkpoint", required=True, help="run folder of `gauss train` (with model.safetensors) or the file")
    p.add_argument("--config", help="config the run was trained with (checked against the one in the checkpoint)")
    p.add_argument("--out", required=True, help="the package to write (must end in .pt2)")
    p.add_argument("--snapshot", help="also write the item rows to this .gsnp and name it in the package metadata")
    p.add_argument("--target", default="aoti", help="export target from the registry (default aoti)")
    p.add_argument("--head", choices=("retrieval", "mfalcon"), default="retrieval",
                   help="scoring head: retrieval = <L2norm(query at the last history position), L2norm(item)>, the "
                        "score the model was trained and evaluated with (default); mfalcon = each candidate appended "
                        "as an M-FALCON target, scored by its own output (for models trained target-aware)")
    p.add_argument("--tolerance", type=float, default=1e-5, help="largest |eager - compiled| accepted (default 1e-5)")
    p.add_argument("--json", help="also write the export report (metadata, parity, timings) to this JSON file")
    return p


def _fail(command: str, exc: BaseException) -> int:
    print(f"gauss {command}: {exc}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    from gauss_plugins.export.aoti import ParityError
    from gauss_plugins.export.checkpoint import item_rows, load_trained_model
    from gauss_plugins.export.program import ExportError
    from gauss_plugins.export.snapshot import write_snapshot
    from gauss_plugins.plugins import get_registry
    from gauss_plugins.train.config import load_config

    try:
        if not args.out.endswith(".pt2"):
            raise ValueError(f"--out must end in .pt2, got {args.out}")
        config = load_config(args.config) if args.config else None
        trained = load_trained_model(args.checkpoint, config)
        try:
            export = get_registry().select("export_target", args.target).load()
        except RuntimeError as exc:  # the target is registered but cannot run here (e.g. no compiler)
            raise ValueError(str(exc)) from None
        ids, rows, embedding_version = item_rows(trained.model)
        source = ""
        if args.snapshot:
            # The rows first: a package must never name a snapshot that is not there.
            write_snapshot(args.snapshot, ids, rows)
            source = f"snapshot:{os.path.abspath(args.snapshot)}"
        row_std = float(rows.std()) if rows.numel() > 1 else 0.1
        result = export(trained.model, args.out, model_version=trained.version, embedding_version=embedding_version,
                        embedding_source=source, tolerance=args.tolerance, row_std=row_std, head=args.head)
    except (ExportError, ParityError, ValueError, TypeError, FileNotFoundError, KeyError) as exc:
        return _fail("export", exc)
    parity = result.parity
    print(f"gauss export: wrote {result.path} ({result.metadata['head']} head, max history "
          f"{result.metadata['max_seq_len']}; export {result.export_s:.1f} s, compile {result.compile_s:.1f} s)")
    print(f"  parity check: max |eager - compiled| = {parity.max_abs_diff:.3g} over {parity.trials} random batches "
          f"(tolerance {parity.tolerance:.3g}): {'passed' if parity.passed else 'FAILED'}")
    if args.snapshot:
        print(f"  snapshot: {args.snapshot} ({ids.numel()} item rows of dim {rows.shape[1]}, {embedding_version})")
    if args.json:
        from gauss_plugins.train.report import write_json

        write_json(args.json, {"package": result.path, "metadata": result.metadata, "parity": parity.to_dict(),
                               "export_s": result.export_s, "compile_s": result.compile_s})
    return 0


def run_rank(args: argparse.Namespace) -> int:
    from gauss_plugins.export.aoti import PackageError, load_package
    from gauss_plugins.export.predictor import Predictor, RequestFormatError
    from gauss_plugins.export.snapshot import SnapshotError, UnknownItemError, read_snapshot

    try:
        package = load_package(args.package)
        snapshot_path = args.snapshot
        if snapshot_path is None:
            source = package.metadata.get("embedding_source", "")
            if not source.startswith("snapshot:"):
                raise ValueError(f"{args.package} names no snapshot (embedding_source={source!r}): pass --snapshot")
            snapshot_path = source[len("snapshot:"):]
        predictor = Predictor(package, read_snapshot(snapshot_path), batch_size=args.batch_size)
        stream = open(args.input, "r", encoding="utf-8") if args.input else sys.stdin
        try:
            predictor.serve(stream, sys.stdout)
        finally:
            if args.input:
                stream.close()
    except (PackageError, SnapshotError, RequestFormatError, UnknownItemError, ValueError, TypeError,
            FileNotFoundError) as exc:
        return _fail("rank", exc)
    return 0


def run_build_runner(args: argparse.Namespace) -> int:
    from gauss_plugins.export.runner import RunnerBuildError, build_runner, runner_has_redis

    try:
        path = build_runner(args.build_dir, force=args.force, verbose=True)
    except RunnerBuildError as exc:
        return _fail("build-runner", exc)
    redis = "with" if runner_has_redis(path) else "without (install libhiredis-dev and rebuild with --force)"
    print(f"gauss-runner: {path} ({redis} the Redis embedding source)")
    return 0
