"""``fgattn-tune``: find the fastest correct gather-load kernel variant for every attention shape of a model.

    fgattn-tune --model hunyuan                          # current GPU -> tuned/<gpu-slug>/hunyuan.yaml
    fgattn-tune --model my_model.yaml --gpus 0,1,2,3     # a custom model spec, one worker per GPU
    fgattn-tune --model wan-1.3b --interpret --trials 4  # CPU: the whole pipeline through Triton's interpreter
                                                         # -> tuned-interpret/interpret/wan-1.3b.yaml
    fgattn-tune --model hunyuan --calibrate --samples captured/ --target-error 0.05
                                                         # predictor knobs per layer and head, from q/k/v saved by
                                                         # integrations.capture -> predictor_knobs in the same file

``--calibrate`` (``tune.calibration``) tunes no kernel: it calibrates ``--predictor``'s threshold knob to
``--target-error`` on ``--samples`` (or DiT-like data at the model's shape; with ``--interpret`` a small shape on
the CPU, in torch ops) and writes it beside the file's kernel entries (exit 2 for bad samples or an
unreachable target, naming the layer and head).

Studies are kept in ``<out>/.studies/<gpu-slug>/<model>.journal`` (or ``--storage``): rerunning resumes them,
also after the process was killed (its unfinished trials run again); a damaged journal is reported with
``--repair`` as the way out. ``--out`` defaults to ``tuned/`` and, with ``--interpret``, to
``tuned-interpret/`` (both in the current directory), so a CPU run never writes into the shipped ``tuned/``.
Exit codes: 0 ok; 1 a (shape, density) found no correct variant, or a worker failed; 2 bad arguments (a
one-line message naming the option, variable or file), unknown model, malformed or unreadable model spec,
bad or unreadable ``--storage`` (a damaged journal names ``--repair``), an unwritable ``--out`` or
``FGATTN_CACHE_DIR``, or no CUDA GPU without ``--interpret`` (in these cases no trial runs and no tuned file
is written).

Nothing that defines Triton kernels is imported at the top of this module: ``--interpret`` has to put
``TRITON_INTERPRET=1`` in the environment before kernels are decorated (see ``_use_interpreter``).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

# no torch / Triton import before --interpret sets TRITON_INTERPRET
from .environment import cache_problem, configured_cache_dir, presets_dir, writable_dir_problem
from .tune.options import BACKEND_CHOICES

NO_CUDA = ("no CUDA GPU found; rerun with --interpret for a CPU run of the pipeline on a scaled-down shape "
           "through Triton's interpreter")


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if len(set(values)) != len(values) or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected distinct indices >= 0, got {text!r}")
    return values


def _density_list(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not all(0.0 < d <= 1.0 for d in values):
        raise argparse.ArgumentTypeError(f"densities must be in (0, 1], got {text!r}")
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"densities must be distinct, got {text!r}")
    return values


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"expected a value > 0, got {text!r}")
        return value
    return parse


MAX_SEED = 2**31 - 1  # numpy's RandomState takes seeds below 2**32 (study.trial_seed folds larger ones)


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, {MAX_SEED}], got {text!r}")
    return value


def _error(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a relative error in (0, 1], got {text!r}")
    return value


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line naming the option (argparse adds the whole usage block)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="fgattn-tune",
        description="Find the fastest correct gather-load kernel variant for every attention shape of a model "
                    "and write it to OUT/<gpu-slug>/<model>.yaml.",
        epilog=f"Model presets: {', '.join(sorted(p.stem for p in presets_dir().glob('*.yaml')))}. "
               "Storage: journal:PATH | sqlite:///PATH | postgresql://... | mysql://... "
               "(default: a journal file under OUT/.studies/).")
    parser.add_argument("--model", help="a preset name (e.g. hunyuan) or the path of a model spec YAML (required "
                                        "unless --merge)")
    parser.add_argument("--merge", nargs="+", type=Path, metavar="FILE",
                        help="merge tuned files of the same GPU from several runs (best per entry; gpu, fgattn "
                             "minor, triton, search space, mode and model must match) into "
                             "OUT/<gpu-slug>/<model>.yaml, then exit")
    parser.add_argument("--trials", type=_positive(int), default=40,
                        help="finished trials per (shape, density), counted over reruns and workers (default 40)")
    parser.add_argument("--timeout", type=_positive(float), help="seconds per (shape, density) study and process")
    parser.add_argument("--out", type=Path, help="output root (default: tuned/ in the current directory; with "
                             "--interpret tuned-interpret/, so that CPU runs never write into the shipped tuned/)")
    parser.add_argument("--densities", type=_density_list, help="comma-separated key densities, instead of the model's")
    parser.add_argument("--sampler", choices=("auto", "tpe", "exhaustive"), default="auto",
                        help="auto (default): exhaustive when the valid space has at most --exhaustive-below points "
                             "and --trials covers it, else TPE")
    parser.add_argument("--exhaustive-below", type=_positive(int), default=40, metavar="N",
                        help="auto sampler enumerates spaces of at most N valid variants (default 40)")
    parser.add_argument("--storage", help="Optuna storage URL for the studies")
    parser.add_argument("--gpus", type=_int_list, help="comma-separated CUDA device indices, one worker process each "
                             "(with --interpret: that many CPU worker processes)")
    parser.add_argument("--plot", action="store_true", help="write a search-history PNG per study (needs matplotlib)")
    parser.add_argument("--interpret", action="store_true",
                        help="CPU run through Triton's interpreter on a scaled-down shape (checks the pipeline)")
    parser.add_argument("--backend", choices=BACKEND_CHOICES, default="auto",
                        help="kernels to search: auto (default: Triton, and the CUDA kernel too on an sm_80+ GPU), "
                             "triton, cuda, or all (both in one study, the fastest wins)")
    parser.add_argument("--seed", type=_seed, default=0,
                        help=f"sampler seed in [0, {MAX_SEED}] (default 0); varied per --gpus worker and per trial")
    parser.add_argument("--repair", action="store_true",
                        help="a study journal with a truncated or garbage line: copy it to <journal>.bak-<time> "
                             "and cut it before that line, then resume (trials recorded after it run again)")
    parser.add_argument("--calibrate", action="store_true",
                        help="instead of tuning kernels, calibrate --predictor's threshold knob per layer and head "
                             "to --target-error and write it into the model's tuned file (predictor_knobs)")
    parser.add_argument("--samples", type=Path, metavar="DIR",
                        help="--calibrate on the q/k/v files integrations.capture wrote to DIR (default: DiT-like "
                             "data at the model's shape)")
    parser.add_argument("--target-error", type=_error, default=0.05, metavar="X",
                        help="--calibrate: relative L2 error of each head's output vs dense, in (0, 1] (default 0.05)")
    parser.add_argument("--predictor", choices=("default", "cached_exact"), default="default",
                        help="--calibrate: the predictor whose threshold knob is calibrated (default: default)")
    parser.add_argument("--statistic", choices=("max", "mean"), default="max",
                        help="--calibrate: a head's error over the samples, worst (max, default) or mean")
    parser.add_argument("--worker", type=_seed, help=argparse.SUPPRESS)
    return parser


def _use_interpreter(argv: list[str]) -> None:
    """Set ``TRITON_INTERPRET=1``. Triton picks interpreter or compiler when a kernel is decorated, at import;
    if Triton was already imported (``import fgattn_gen`` imports its kernels), start this command over in
    a fresh interpreter with the variable set."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):  # environment.interpreting()
        return
    os.environ["TRITON_INTERPRET"] = "1"
    if "triton" in sys.modules:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(sys.executable, [sys.executable, "-m", "fgattn_gen.cli", *argv])


def _usage_error(message: str) -> int:
    print(f"fgattn-tune: error: {' '.join(str(message).split())}", file=sys.stderr)
    return 2


def _output_problem(out: Path) -> str | None:
    """Why ``--out`` cannot take the tuned files (nothing is created to find out)."""
    problem = writable_dir_problem(out, create=True)
    return None if problem is None else f"--out {out}: {problem}"


def _cache_problem() -> str | None:
    """Why the kernel cache cannot be written (``FGATTN_CACHE_DIR``)."""
    root = configured_cache_dir()
    problem = cache_problem(root)
    if problem is None:
        return None
    which = "FGATTN_CACHE_DIR" if os.environ.get("FGATTN_CACHE_DIR") else "FGATTN_CACHE_DIR unset, the default"
    return (f"FGATTN_CACHE_DIR: the kernel cache directory {root} ({which}) cannot be written ({problem}); "
            f"set FGATTN_CACHE_DIR to a writable directory")


def _merge(args: argparse.Namespace) -> int:
    """``--merge FILE ... [--out DIR]``: exit 0 with the merged file written, 2 (nothing written) for files
    that cannot be read or merged, naming the file and the key."""
    from .tune.merge import MergeError, merge_files

    out = args.out if args.out is not None else Path("tuned")
    problem = _output_problem(out)
    if problem:
        return _usage_error(problem)
    try:
        path, merged = merge_files(args.merge, out)
    except MergeError as exc:
        return _usage_error(str(exc))
    print(f"merged {len(args.merge)} file(s), {len(merged['entries'])} entries -> {path}")
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    """``--calibrate``: exit 0 with the file written, 2 (nothing written) for bad settings or samples, or a
    target no knob value reaches."""
    import torch

    from rich.console import Console

    from .models import ModelSpecError, load_model
    from .tune.calibration import calibrate_model
    from .tune.device import detect_device, search_backends
    from .tune.space import EmptySpaceError, build_space

    if args.samples is not None and not args.samples.is_dir():
        return _usage_error(f"--samples {args.samples}: not a directory")
    if not args.interpret and not torch.cuda.is_available():
        return _usage_error(NO_CUDA)
    try:
        model = load_model(args.model)
        device = detect_device(args.interpret)
        space = build_space(search_backends("triton" if args.interpret else args.backend, device), dtype=model.dtype,
                            head_dim=model.head_dim, block_m=model.block_m, block_n=model.block_n,
                            smem_limit=device.smem_limit)
        calibrate_model(model, device, space, out=args.out, samples_dir=args.samples, target_error=args.target_error,
                        predictor=args.predictor, statistic=args.statistic, console=Console())
    except (ModelSpecError, EmptySpaceError, ValueError) as exc:
        return _usage_error(f"--calibrate: {exc}" if not str(exc).startswith("--") else str(exc))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``fgattn-tune``; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse has printed the usage error
        return int(exc.code or 0)
    if args.merge:
        return _merge(args)
    if args.model is None:
        return _usage_error("the following arguments are required: --model (or --merge FILE ...)")
    missing = [name for name in ("optuna", "rich") if importlib.util.find_spec(name) is None]
    if missing:
        return _usage_error(f"tuning needs {' and '.join(missing)}: pip install 'fgattn[tune]'")
    if args.interpret and args.backend in ("cuda", "all"):
        return _usage_error(f"--backend {args.backend}: the CUDA kernel needs a GPU; the interpreter runs Triton only")
    if args.out is None:
        args.out = Path("tuned-interpret" if args.interpret else "tuned")
    for problem in (_output_problem(args.out), _cache_problem()):
        if problem:
            return _usage_error(problem)
    if args.calibrate:
        return _calibrate(args)
    if args.samples is not None:
        return _usage_error("--samples: only with --calibrate")
    if args.interpret:
        _use_interpreter(argv)

    import torch

    from .models import ModelSpecError, load_model, preset_names
    from .tune.plot import require_matplotlib
    from .tune.storage import StorageError, parse_storage

    try:
        model = load_model(args.model)
        if args.storage:
            parse_storage(args.storage)
        if args.plot:
            require_matplotlib()
    except (ModelSpecError, StorageError, ImportError) as exc:
        return _usage_error(str(exc))
    if not args.interpret:
        if not torch.cuda.is_available():
            return _usage_error(NO_CUDA)
        if args.gpus:
            from .tune.workers import check_gpus

            try:
                check_gpus(args.gpus)
            except ValueError as exc:
                return _usage_error(str(exc))

    from rich.console import Console

    from .tune.options import TuneOptions
    from .tune.runner import tune_model
    from .tune.space import EmptySpaceError

    options = TuneOptions(
        model=args.model if args.model in preset_names() else str(Path(args.model).resolve()),
        trials=args.trials, timeout=args.timeout, out=args.out, densities=args.densities, sampler=args.sampler,
        exhaustive_below=args.exhaustive_below, storage=args.storage, gpus=args.gpus, plot=args.plot,
        interpret=args.interpret, seed=args.seed, worker=args.worker, backend=args.backend, repair=args.repair,
    )
    console = Console()
    try:
        return tune_model(options, console)
    except EmptySpaceError as exc:  # raised before anything is written
        return _usage_error(f"model {model.name}: {exc}")
    except StorageError as exc:  # a damaged journal, a database that cannot be opened: before any trial
        return _usage_error(str(exc))
    except RuntimeError as exc:  # a failed worker, or a CUDA error that poisons this process
        console.print(f"[red]fgattn-tune: {model.name}: {exc}[/red]\nrerun the same command to resume the studies")
        return 1
    except KeyboardInterrupt:
        console.print("[yellow]fgattn-tune: interrupted[/yellow]; rerun the same command to resume the studies")
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
