"""The ``loramix`` command: ``train``, ``eval``, ``merge``, ``export``, ``add-domain``, ``demo`` and ``bench``."""

from __future__ import annotations

import argparse
import os
import runpy
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from torch import distributed

from loramix import assets
from loramix.config import ConfigError
from loramix.data import DataError
from loramix.demo import run_demo
from loramix.eval import evaluate_adapters, markdown_table
from loramix.export import check_output_dir
from loramix.moa.cli_step import add_domain_to_run
from loramix.runs.recipe import Recipe
from loramix.runs.settings import RecipeError
from loramix.train import train_recipe
from loramix.train.export import export_adapter, load_adapter
from loramix.version import __version__


def _train(args: argparse.Namespace) -> int:
    recipe = Recipe.from_yaml(args.recipe)
    if args.output_dir:
        recipe.output_dir = args.output_dir
    if args.max_steps is not None:
        if args.max_steps < 1:
            raise RecipeError(f"--max-steps {args.max_steps} is invalid: expected an integer >= 1")
        recipe.training.max_steps = args.max_steps
    resume = True if args.resume == "latest" else args.resume or False
    _, state = train_recipe(recipe, resume=resume, overwrite=args.overwrite)
    if int(os.environ.get("RANK", "0")) != 0:  # under a launcher, the main process alone reports
        return 0
    if state.metrics:
        print(markdown_table({recipe.label: state.metrics}))
    print(f"adapter: {Path(recipe.output_dir) / 'adapter'}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    outcome = evaluate_adapters(args.adapter, args.out, split=args.split, plots=not args.no_plots)
    print(markdown_table(outcome["results"]))
    print(f"report: {outcome['markdown']} and {outcome['report']}")
    for plot in outcome["plots"]:
        print(f"plot: {plot}")
    return 0


def _export_or_merge(args: argparse.Namespace, merged: bool) -> int:
    try:  # refuse the output before loading anything
        check_output_dir(args.out, args.overwrite, protect=[args.adapter] if Path(args.adapter).is_dir() else [])
        loaded = load_adapter(args.adapter, base_model=args.base_model)
        task = None if args.all_tasks else args.task
        result = export_adapter(
            loaded,
            args.out,
            task=task,
            merged=merged,
            minimal_rank=getattr(args, "minimal_rank", False),
            overwrite=args.overwrite,
        )
    except (FileExistsError, TypeError, ValueError) as error:
        print(f"loramix {args.command}: error: {error}", file=sys.stderr)
        return 2
    what = "merged model" if merged else "PEFT LoRA adapter"
    if task is None:
        print(f"{what}s of {len(result['tasks'])} tasks: {args.out} (manifest loramix_exports.json)")
    else:
        print(f"{what} for task {args.task!r}: {args.out}")
    rank = result.get("vllm_max_lora_rank") or result.get("vllm", {}).get("max_lora_rank")
    if not merged and rank:
        print(f"vLLM: --enable-lora --max-lora-rank {rank}")
    return 0


def _merge(args: argparse.Namespace) -> int:
    return _export_or_merge(args, merged=True)


def _export(args: argparse.Namespace) -> int:
    return _export_or_merge(args, merged=False)


def _add_domain(args: argparse.Namespace) -> int:
    domain = add_domain_to_run(
        args.adapter,
        args.data,
        args.name,
        args.out,
        replay_per_domain=args.replay,
        expert_steps=args.expert_steps,
        router_steps=args.router_steps,
        learning_rate=args.lr,
        max_length=args.max_length,
    )
    print(f"domain {args.name!r} added as expert {domain}: {Path(args.out) / 'adapter'} (earlier experts unchanged)")
    return 0


BENCHMARKS = {"layer": "layer_bench.py", "more": "more_bench.py", "moa": "moa_bench.py", "e2e": "e2e_bench.py"}


def _bench(args: argparse.Namespace) -> int:
    script = Path(__file__).resolve().parents[2] / "benchmarks" / BENCHMARKS[args.name]
    if not script.is_file():
        raise FileNotFoundError(f"{script} does not exist: the benchmarks ship with the source checkout")
    saved = sys.argv
    sys.argv = [str(script), *args.options]
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv = saved
    return 0


def _assets(args: argparse.Namespace) -> int:
    rows = (
        assets.asset_status()
        if args.check
        else assets.prepare_assets(bigbench=args.bigbench or False, wordnet=args.wordnet or False)
    )
    for row in rows:
        state = "ok" if row.ready else ("missing" if row.required else "absent (optional)")
        print(f"{row.name:26} {state:18} {row.detail}")
    missing = [
        row.name
        for row in rows
        if not row.ready
        and (row.required or (row.name == "bigbench" and args.bigbench) or (row.name == "wordnet" and args.wordnet))
    ]
    if missing:
        print(f"loramix assets: missing {', '.join(missing)}; run `{assets.SETUP_COMMAND}`", file=sys.stderr)
    return 1 if missing else 0


def _demo(args: argparse.Namespace) -> int:
    if args.max_steps is not None and args.max_steps < 1:
        raise RecipeError(f"--max-steps {args.max_steps} is invalid: expected an integer >= 1")
    run_demo(args.recipe, args.out, max_steps=args.max_steps, overwrite=args.overwrite)
    return 0


class OneLineErrorParser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line on stderr (exit status 2), like every other error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``loramix`` command."""
    parser = OneLineErrorParser(
        prog="loramix", description="Multi-task fine-tuning of transformers with mixtures of LoRA experts."
    )
    parser.add_argument("--version", action="version", version=f"loramix {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train the run a YAML recipe describes")
    train.add_argument("recipe", help="the recipe file")
    train.add_argument("--output-dir", help="override the recipe's output_dir")
    train.add_argument("--max-steps", type=int, help="override training.max_steps (and so stages without their own)")
    train.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        help="continue the run in the output directory from its latest checkpoint (or from the one given); "
        "refused when there is no checkpoint or the recipe trains something else than that run",
    )
    train.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run already in the output directory (its adapter, checkpoints, log) with this one",
    )
    train.set_defaults(handler=_train)

    evaluate = commands.add_parser("eval", help="per-task report (Markdown + JSON) and plots of trained adapters")
    evaluate.add_argument("--adapter", action="append", required=True, help="an adapter directory (repeatable)")
    evaluate.add_argument("--out", required=True, help="where the report and plots go")
    evaluate.add_argument("--split", choices=("test", "validation"), help="default: each recipe's eval.split")
    evaluate.add_argument("--no-plots", action="store_true", help="write no PNG plots")
    evaluate.set_defaults(handler=_eval)

    for name, handler, text in (
        ("merge", _merge, "save the base model with one task's adapter folded into its weights"),
        ("export", _export, "write one task's adapter as a standard PEFT LoRA adapter"),
    ):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("--adapter", required=True, help="a saved mixture (loramix train or save_pretrained)")
        sub.add_argument(
            "--base-model", help="the base model's directory or hub id (default: the run's recipe or the config's)"
        )
        which = sub.add_mutually_exclusive_group(required=True)
        which.add_argument("--task", help="the task's name (or id)")
        which.add_argument(
            "--all-tasks", action="store_true", help="every task, one subdirectory each, with a manifest"
        )
        sub.add_argument("--out", required=True, help="the output directory (must be empty or absent)")
        sub.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
        if name == "export":
            sub.add_argument(
                "--minimal-rank",
                action="store_true",
                help="each layer at its own rank via rank_pattern (PEFT only; servers need one rank)",
            )
        sub.set_defaults(handler=handler)

    demo = commands.add_parser("demo", help="shared LoRA vs per-task LoRA vs MoRE on two rules over the same inputs")
    demo.add_argument("--recipe", default=None, help="the demo recipe (default: the packaged demo.yaml)")
    demo.add_argument("--out", default="runs/demo", help="where runs, report and plots go")
    demo.add_argument("--max-steps", type=int, help="override the training steps of every method")
    demo.add_argument("--overwrite", action="store_true", help="replace the runs of an earlier demo in --out")
    demo.set_defaults(handler=_demo)

    setup = commands.add_parser(
        "assets",
        help="install, convert and check the offline models and data (pip packages, SmolLM2 checkpoint, BIG-bench, "
        "WordNet)",
    )
    setup.add_argument(
        "--bigbench",
        nargs="?",
        const=True,
        default=None,
        metavar="ARCHIVE_OR_URL",
        help="also get BIG-bench's task files: from the package index's bigbench 1.0.0 sdist, or from the "
        "archive (path or URL) given, e.g. an archive of the google/BIG-bench repository",
    )
    setup.add_argument(
        "--wordnet",
        nargs="?",
        const=True,
        default=None,
        metavar="SDIST",
        help=f"also get WordNet's database files (the benchmarks' tasks): from the package index's "
        f"{assets.WORDNET_SDIST}, or from a local copy of that file (sha256 checked)",
    )
    setup.add_argument("--check", action="store_true", help="only report what is there and what is missing")
    setup.set_defaults(handler=_assets)

    grow = commands.add_parser(
        "add-domain",
        help="add a domain to a trained MoA run without touching its experts (trains a recipe with init_adapter)",
    )
    grow.add_argument("--adapter", required=True, help="the MoA run's adapter directory")
    grow.add_argument("--data", required=True, help="the new domain's JSON Lines file (text, target)")
    grow.add_argument("--name", required=True, help="the new domain's name")
    grow.add_argument("--out", required=True, help="the new run's directory (the grown adapter goes to OUT/adapter)")
    grow.add_argument("--replay", type=int, default=8, help="examples of each earlier domain replayed (default 8)")
    grow.add_argument("--expert-steps", type=int, default=100, help="steps training the new expert")
    grow.add_argument("--router-steps", type=int, default=50, help="steps retraining the routers")
    grow.add_argument("--lr", type=float, default=1e-3, help="learning rate of both steps")
    grow.add_argument("--max-length", type=int, help="tokens per training row (default: the run's model.max_length)")
    grow.set_defaults(handler=_add_domain)

    bench = commands.add_parser("bench", help="run a benchmark of benchmarks/ (layer, more, moa, e2e)")
    bench.add_argument("name", choices=sorted(BENCHMARKS), help="which benchmark")
    bench.add_argument("options", nargs=argparse.REMAINDER, help="the benchmark's own options, e.g. --quick")
    bench.set_defaults(handler=_bench)
    return _add_debug_option(parser)


DEBUG_ENV = "LORAMIX_DEBUG"
"""Set it (to anything but ``0``) to see the traceback of an error, as ``--debug`` does."""
# Errors of bad input: recipes, data, configs, files, options. Anything else is reported as unexpected.
EXPECTED_ERRORS = (
    RecipeError,
    DataError,
    ConfigError,
    ValueError,
    TypeError,
    KeyError,
    OSError,
    ImportError,
    RuntimeError,
)
# Optional dependencies and the extra that installs each.
OPTIONAL_EXTRAS = {"matplotlib": "assets", "gguf": "assets", "datasets": "hf"}


def _add_debug_option(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``--debug`` on the command and on each subcommand (but ``bench``, whose options go to the script)."""
    text = f"show the traceback of an error instead of one line (or set {DEBUG_ENV}=1)"
    parser.add_argument("--debug", action="store_true", help=text)
    for action in parser._subparsers._group_actions if parser._subparsers else ():
        for name, sub in getattr(action, "choices", {}).items():
            if name != "bench":
                sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=text)
    return parser


def error_line(error: BaseException) -> str:
    """One line describing ``error`` for the terminal (no traceback).

    ``KeyError`` loses its quotes, a missing module names the package to install, and an error that is not
    one of :data:`EXPECTED_ERRORS` says its type and how to see the traceback.
    """
    if isinstance(error, KeyError) and len(error.args) == 1 and isinstance(error.args[0], str):
        text = error.args[0]
    else:
        text = str(error)
    if isinstance(error, ImportError) and error.name:
        root = error.name.split(".")[0]
        extra = OPTIONAL_EXTRAS.get(root)
        install = f"pip install 'loramix[{extra}]'" if extra else f"pip install {root}"
        text = f"missing optional dependency {root!r} ({install}): {text}"
    text = " ".join(text.split()) or type(error).__name__
    if not isinstance(error, EXPECTED_ERRORS):
        text = f"unexpected {type(error).__name__}: {text} (rerun with --debug or {DEBUG_ENV}=1 for the traceback)"
    return text


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``loramix`` command.

    Every error prints one line, ``loramix <command>: error: ...``, on stderr and exits with status 2 (as
    argparse does for bad options); ``--debug`` or ``LORAMIX_DEBUG=1`` shows the traceback instead.
    """
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as done:  # --help, or a usage error already printed on one line
        return done.code if isinstance(done.code, int) else 2
    debug = getattr(args, "debug", False) or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"loramix {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if debug:
            raise
        print(f"loramix {args.command}: error: {error_line(error)}", file=sys.stderr)
        return 2
    finally:
        _leave_process_group()


def _leave_process_group() -> None:
    """Destroy the process group a distributed run (``torchrun``/``accelerate launch``) opened, so that the
    interpreter's exit does not tear down gloo's or NCCL's threads under it (that aborts a rank now and then)."""
    if distributed.is_available() and distributed.is_initialized():
        distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
