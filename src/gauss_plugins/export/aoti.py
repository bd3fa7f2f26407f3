"""Export the ranker program to an AOTInductor ``.pt2`` package, check it, load it back.

:func:`export_aoti` runs ``torch.export`` on :class:`~gauss_plugins.export.program.RankerProgram`
with dynamic batch, history and candidate dimensions, compiles it with
``torch._inductor.aoti_compile_and_package`` and stores string metadata in the package
(inductor config ``aot_inductor.metadata``; C++ reads it with
``AOTIModelPackageLoader::get_metadata()``, Python with :func:`load_package`):

=====================  ==================================================================
``gauss_format``       ``"1"``
``model_version``      free text naming the trained model (e.g. the checkpoint's run)
``embedding_version``  the version of the embedding rows the model was exported with
``dim``                the embedding dimension ``D``
``head``               the scoring head: ``"retrieval"`` (the training/eval score
                       ``<query, item>``) or ``"mfalcon"`` (target-aware); see
                       :mod:`gauss_plugins.export.program`
``max_seq_len``        the longest history ``N`` the program accepts: the model's ``max_len``
                       (retrieval head), or ``max_len - 1`` (M-FALCON: the candidates take
                       the next position)
``model_max_len``      the model's ``max_len`` (training sequence length)
``embedding_source``   ``"snapshot:<file>"``, ``"redis://host:port/<prefix>"`` or ``""``
``dtype``              ``"float32"``
``input_names``        comma-separated: ``history,history_len,candidates`` (+ ``history_time,
                       candidate_time`` for a model with a time bias)
``output_names``       ``"scores"``
=====================  ==================================================================

The package is compiled under a temporary name beside the target, then the **parity check**
runs the eager program and the compiled package on fresh random inputs (several batch,
history and candidate sizes, empty and full histories) and the package is renamed into
place only if the largest absolute difference is within the tolerance; otherwise
:class:`ParityError` reports it and nothing is left at the target.
"""
from __future__ import annotations

import os
import tempfile
import time
import warnings
import zipfile
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

from gauss_plugins.export.program import HEADS, ExportError, RankerProgram, build_ranker, input_names

__all__ = ["DEFAULT_TOLERANCE", "ExportResult", "LoadedPackage", "PackageError", "ParityError", "ParityReport",
           "export_aoti", "export_ranker", "load_package", "parity_check", "random_inputs"]

GAUSS_FORMAT = "1"
DEFAULT_TOLERANCE = 1e-5  # fp32: eager and the compiled kernels differ by summation order only
OUTPUT_NAMES = ("scores",)


class PackageError(ValueError):
    """A ``.pt2`` file is missing, corrupted, or not a gauss ranker package."""


class ParityError(RuntimeError):
    """The compiled package's scores differ from the eager program's by more than the tolerance."""

    def __init__(self, report: "ParityReport") -> None:
        super().__init__(f"parity check failed: max |eager - compiled| = {report.max_abs_diff:.3g} > tolerance "
                         f"{report.tolerance:.3g} over {report.trials} random batches; the package was not written. "
                         "Retry with a looser --tolerance only if the difference is expected (e.g. reduced precision)")
        self.report = report


@dataclass
class ParityReport:
    max_abs_diff: float
    tolerance: float
    trials: int
    shapes: List[Tuple[int, int, int]] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance

    def to_dict(self) -> Dict[str, object]:
        return {**asdict(self), "passed": self.passed}


@dataclass
class ExportResult:
    path: str
    metadata: Dict[str, str]
    parity: ParityReport
    export_s: float
    compile_s: float


# ---------------------------------------------------------------------- inputs
def random_inputs(program: RankerProgram, batch: int, history: int, candidates: int,
                  generator: torch.Generator, row_std: float = 0.1) -> Tuple[torch.Tensor, ...]:
    """Random rows (``N(0, row_std)``), lengths in ``0..history`` with the first user's history
    full and (when ``batch > 1``) the second's empty, and for a timed program increasing event
    times with candidates at a later request time."""
    d = program.dim
    h = torch.randn(batch, history, d, generator=generator) * row_std
    c = torch.randn(batch, candidates, d, generator=generator) * row_std
    lens = torch.randint(0, history + 1, (batch,), generator=generator)
    lens[0] = history
    if batch > 1:
        lens[1] = 0
    args: Tuple[torch.Tensor, ...] = (h, lens, c)
    if program.timed:
        gaps = torch.randint(1, 10 ** 6, (batch, history), generator=generator)
        times = 10 ** 9 + gaps.cumsum(1)
        request = times[:, -1:] + torch.randint(1, 10 ** 5, (batch, candidates), generator=generator)
        args = args + (times, request)
    return args


def _sample_shapes(program: RankerProgram, generator: torch.Generator, trials: int) -> List[Tuple[int, int, int]]:
    top = program.max_history
    fixed = [(1, top, 1), (3, 1, 7), (8, max(1, top // 2), 33)]
    shapes = fixed[:trials]
    while len(shapes) < trials:
        shapes.append((int(torch.randint(1, 17, (1,), generator=generator)),
                       int(torch.randint(1, top + 1, (1,), generator=generator)),
                       int(torch.randint(1, 65, (1,), generator=generator))))
    return shapes


def parity_check(program: RankerProgram, compiled: Callable[..., torch.Tensor], *, trials: int = 4,
                 tolerance: float = DEFAULT_TOLERANCE, seed: int = 0, row_std: float = 0.1) -> ParityReport:
    """Max ``|eager - compiled|`` over ``trials`` fresh random batches (see :func:`random_inputs`)."""
    if trials < 1:
        raise ValueError(f"trials must be >= 1, got {trials}")
    g = torch.Generator().manual_seed(seed)
    shapes = _sample_shapes(program, g, trials)
    worst = 0.0
    with torch.no_grad():
        for b, n, m in shapes:
            args = random_inputs(program, b, n, m, g, row_std)
            expected = program(*args)
            got = compiled(*args)
            if got.shape != expected.shape:
                raise ParityError(ParityReport(float("inf"), tolerance, trials, shapes))
            worst = max(worst, float((got - expected).abs().max()))
    return ParityReport(worst, float(tolerance), trials, shapes)


# ---------------------------------------------------------------------- export
def export_ranker(program: RankerProgram) -> torch.export.ExportedProgram:
    """``torch.export`` with dynamic batch ``B``, history ``N <= max_history`` and candidates ``M``."""
    if program.max_history < 2:
        raise ExportError(f"max_len {program.max_len} is too short to export with a dynamic history length "
                          "(need max_len >= 3)")
    Dim = torch.export.Dim
    batch, hist, cand = Dim("batch", min=1), Dim("history", min=1, max=program.max_history), Dim("candidates", min=1)
    g = torch.Generator().manual_seed(0)
    # Sizes that differ from each other and from 0/1, so export specialises none of them.
    sample = random_inputs(program, 3, min(7, program.max_history), 5, g)
    shapes: Dict[str, Dict[int, object]] = {"history": {0: batch, 1: hist}, "history_len": {0: batch},
                                            "candidates": {0: batch, 1: cand}}
    if program.timed:
        shapes.update(history_time={0: batch, 1: hist}, candidate_time={0: batch, 1: cand})
    with torch.no_grad():
        return torch.export.export(program, sample, dynamic_shapes=shapes, strict=False)


def package_metadata(program: RankerProgram, model_version: str, embedding_version: str,
                     embedding_source: str) -> Dict[str, str]:
    for name, value in (("model_version", model_version), ("embedding_version", embedding_version),
                        ("embedding_source", embedding_source)):
        if not isinstance(value, str):
            raise TypeError(f"{name} must be a string, got {type(value).__name__}")
    if embedding_source and not (embedding_source.startswith("snapshot:") or embedding_source.startswith("redis://")):
        raise ValueError(f"embedding_source must be '', 'snapshot:<file>' or 'redis://host:port/<prefix>', "
                         f"got {embedding_source!r}")
    return {"gauss_format": GAUSS_FORMAT, "model_version": model_version, "embedding_version": embedding_version,
            "head": program.head, "dim": str(program.dim), "max_seq_len": str(program.max_history),
            "model_max_len": str(program.max_len),
            "embedding_source": embedding_source, "dtype": "float32",
            "input_names": ",".join(input_names(program.timed)), "output_names": ",".join(OUTPUT_NAMES)}


def export_aoti(model_or_program: torch.nn.Module, out: str, *, model_version: str = "",
                embedding_version: str = "", embedding_source: str = "", tolerance: float = DEFAULT_TOLERANCE,
                parity_trials: int = 4, seed: int = 0, row_std: float = 0.1,
                head: Optional[str] = None) -> ExportResult:
    """Export, compile, parity-check and atomically write the ``.pt2`` at ``out``.

    ``head``: the scoring head of a model (``"retrieval"``, the default, or ``"mfalcon"``);
    a :class:`RankerProgram` brings its own.

    Raises :class:`~gauss_plugins.export.program.ExportError` for a model that cannot be
    served this way and :class:`ParityError` when the compiled scores drift; in both cases
    nothing is written at ``out``.
    """
    if not str(out).endswith(".pt2"):
        raise ValueError(f"the package path must end in .pt2 (aoti_compile_and_package requires it), got {out!r}")
    if not (isinstance(tolerance, (int, float)) and tolerance >= 0):
        raise ValueError(f"tolerance must be a non-negative number, got {tolerance!r}")
    if head is not None and head not in HEADS:
        raise ValueError(f"head must be one of {', '.join(HEADS)}, got {head!r}")
    if isinstance(model_or_program, RankerProgram):
        program = model_or_program
        if head is not None and head != program.head:
            raise ValueError(f"head={head!r} but the program was built with head={program.head!r}: pass the model, "
                             "or build the program with the head you want")
    else:
        program = build_ranker(model_or_program, head)
    program.eval()  # dropout off: the served function is the deterministic one
    metadata = package_metadata(program, model_version, embedding_version, embedding_source)
    t0 = time.perf_counter()
    exported = export_ranker(program)
    t1 = time.perf_counter()
    directory = os.path.dirname(os.path.abspath(out))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(out)}.", suffix=".pt2", dir=directory)
    os.close(fd)
    try:
        from torch._inductor import aoti_compile_and_package

        aoti_compile_and_package(exported, package_path=tmp,
                                 inductor_configs={"aot_inductor.metadata": metadata})
        t2 = time.perf_counter()
        loaded = load_package(tmp)
        report = parity_check(program, loaded, trials=parity_trials, tolerance=tolerance, seed=seed, row_std=row_std)
        if not report.passed:
            raise ParityError(report)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return ExportResult(os.path.abspath(out), metadata, report, round(t1 - t0, 2), round(t2 - t1, 2))


# ---------------------------------------------------------------------- load
class LoadedPackage:
    """A loaded ranker package: call it like the program; ``metadata`` holds its strings.

    Calls check the inputs' dtypes and shapes against the metadata first: the compiled code
    trusts them, and a wrong one would otherwise fail deep inside (or read out of bounds)."""

    def __init__(self, compiled, metadata: Dict[str, str], path: str) -> None:
        self._compiled = compiled
        self.metadata = metadata
        self.path = path
        self.dim = int(metadata["dim"])
        self.max_history = int(metadata["max_seq_len"])
        self.input_names = tuple(metadata["input_names"].split(","))
        # Packages written before the head was recorded all scored with M-FALCON.
        self.head = metadata.get("head", "mfalcon")
        self.timed = "history_time" in self.input_names

    def check_inputs(self, *args: torch.Tensor) -> None:
        names = self.input_names
        if len(args) != len(names):
            raise ValueError(f"{self.path} takes {len(names)} inputs ({', '.join(names)}), got {len(args)}")
        for name, t in zip(names, args):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"input {name} must be a torch.Tensor, got {type(t).__name__}")
            want = torch.float32 if name in ("history", "candidates") else torch.int64
            if t.dtype != want:
                raise TypeError(f"input {name} must be {want}, got {t.dtype}")
            if t.device.type != "cpu":
                raise ValueError(f"input {name} is on {t.device}; this package was compiled for the CPU")
        h, lens, c = args[:3]
        if h.dim() != 3 or h.shape[2] != self.dim:
            raise ValueError(f"history must be [B, N, {self.dim}], got {tuple(h.shape)}")
        if c.dim() != 3 or c.shape[2] != self.dim or c.shape[0] != h.shape[0]:
            raise ValueError(f"candidates must be [B={h.shape[0]}, M, {self.dim}], got {tuple(c.shape)}")
        if lens.shape != (h.shape[0],):
            raise ValueError(f"history_len must be [B={h.shape[0]}], got {tuple(lens.shape)}")
        if not 1 <= h.shape[1] <= self.max_history:
            raise ValueError(f"history length N={h.shape[1]} must be in 1..{self.max_history} (max_seq_len of "
                             f"this package); keep the most recent {self.max_history} items")
        if c.shape[1] < 1:
            raise ValueError("candidates must hold at least one candidate per user (M >= 1)")
        if lens.numel() and (int(lens.min()) < 0 or int(lens.max()) > h.shape[1]):
            raise ValueError(f"history_len values must be in 0..N={h.shape[1]}, got {lens.tolist()}")
        if self.timed:
            ht, ct = args[3:]
            if ht.shape != h.shape[:2] or ct.shape != c.shape[:2]:
                raise ValueError(f"history_time must be {tuple(h.shape[:2])} and candidate_time {tuple(c.shape[:2])}, "
                                 f"got {tuple(ht.shape)} and {tuple(ct.shape)}")

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        self.check_inputs(*args)
        return self._compiled(*[a.contiguous() for a in args])


def load_package(path: str) -> LoadedPackage:
    """Load a ``.pt2`` written by :func:`export_aoti`; :class:`PackageError` names the fault."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise PackageError(f"package {path} does not exist: create one with `gauss export`")
    # The loader's own error for a damaged archive is a bare C++ message; checking the zip
    # (every member's CRC) first gives a clear one.
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise PackageError(f"{path} is not a readable .pt2 package ({exc}): it is corrupted or truncated; "
                           "export it again") from None
    if bad is not None:
        raise PackageError(f"{path}: member {bad} fails its CRC check: the package is corrupted; export it again")
    from torch._inductor import aoti_load_package

    try:
        with warnings.catch_warnings():
            # torch warns about its own pytree API while reading the call spec: noise for a user
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
            compiled = aoti_load_package(path)
    except Exception as exc:  # the loader raises RuntimeError (or worse) with a C++ message
        raise PackageError(f"{path} could not be loaded as an AOTInductor package ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else ''}); export it again with this torch "
                           f"({torch.__version__})") from None
    metadata = dict(compiled.get_metadata())
    if metadata.get("gauss_format") != GAUSS_FORMAT:
        raise PackageError(f"{path} is an AOTInductor package but not a gauss ranker (gauss_format="
                           f"{metadata.get('gauss_format')!r}, expected {GAUSS_FORMAT!r})")
    missing = [k for k in ("dim", "max_seq_len", "input_names") if k not in metadata]
    if missing:
        raise PackageError(f"{path}: metadata lacks {missing}; export it again")
    return LoadedPackage(compiled, metadata, path)
