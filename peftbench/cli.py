"""Command line: ``peftbench run|export|validate|report|plugins|methods|doctor`` and the commands plugins
register (``peftbench smoke``: the GGUF plugin).

Problems the user can fix (PeftbenchError) print as one line and exit with code 2, no traceback.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from contextlib import contextmanager
from pathlib import Path

from rich.markup import escape

from peftbench import __version__
from peftbench.console import console
from peftbench.errors import ERROR_FILE_ENV, PeftbenchError

EXIT_USAGE = 2


def _cmd_run(args) -> int:
    from peftbench.compare.plan import is_comparison_file
    from peftbench.pipeline.distributed import launch, launched_processes
    from peftbench.pipeline.recipe import load_recipe
    from peftbench.pipeline.runner import default_run_dir, prepare_run_dir, run_recipe

    if is_comparison_file(args.recipe):
        return _run_comparison(args)
    if args.jobs is not None or args.search_only:
        flag = "--jobs" if args.jobs is not None else "--search-only"
        raise PeftbenchError(f"{flag} is for comparison recipes, and '{args.recipe}' is a single run.",
                             f"drop {flag}, or pass a comparison recipe (one with base: and methods:).")
    if args.num_processes is not None and args.num_processes < 1:
        raise PeftbenchError(f"--num-processes {args.num_processes} is not a number of processes.", "pass 1 or more.")
    recipe = load_recipe(args.recipe, args.overrides)
    if args.num_processes and args.num_processes != launched_processes():
        if launched_processes() > 1:
            raise PeftbenchError(f"--num-processes {args.num_processes} inside a launch of {launched_processes()} processes.",
                                 "drop --num-processes when starting peftbench with accelerate launch.")
        # A taken run directory is refused here, in one line, rather than from inside the launch;
        # accelerate launch then runs this same command in each process, where it finds itself launched.
        prepare_run_dir(Path(args.output_dir) if args.output_dir else default_run_dir(recipe),
                        resume=args.resume, overwrite=args.overwrite, claim=False)  # the launched main process claims it
        return launch(args.num_processes, args.argv)
    with _sigterm_as_interrupt():
        run_recipe(recipe, Path(args.output_dir) if args.output_dir else None, resume=args.resume, overwrite=args.overwrite)
    return 0


def _run_parser(sub) -> None:
    run = sub.add_parser("run", help="run a recipe: data, baseline, train, evaluate, export, report",
                         description="Run a recipe end to end. Any recipe value can be overridden as key.sub=value.")
    run.add_argument("recipe", help="YAML recipe, e.g. recipes/quickstart.yaml")
    run.add_argument("overrides", nargs="*", metavar="key.sub=value", help="recipe overrides, e.g. method.r=16 trainer.epochs=2")
    run.add_argument("--output-dir", help="run directory (default: the recipe's output_dir, else runs/<recipe name>)")
    existing = run.add_mutually_exclusive_group()
    existing.add_argument("--resume", action="store_true", help="continue an interrupted run from its last checkpoint")
    existing.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    run.add_argument("--num-processes", type=int, metavar="N",
                     help="train data-parallel in N processes, one per GPU, started by `accelerate launch`")
    run.add_argument("--jobs", type=int, metavar="N",
                     help="comparison recipes: run N runs at a time, each its own process (a small model leaves a large "
                          "GPU mostly idle); each run's output goes to <output_dir>/recipes/<run>.out")
    run.add_argument("--search-only", action="store_true",
                     help="comparison recipes with search: stop after the search runs; the same command with --resume "
                          "later runs the chosen settings' seeds and writes the report")
    run.set_defaults(func=_cmd_run)



def _run_comparison(args) -> int:
    """A comparison recipe: every expanded run validated first, each run in its own process, then the report."""
    import shlex

    from peftbench.compare.plan import load_comparison
    from peftbench.compare.run import run_comparison

    comparison = load_comparison(args.recipe, args.overrides, output_dir=args.output_dir)
    command = shlex.join(["peftbench", "run", args.recipe, *args.overrides]
                         + (["--output-dir", args.output_dir] if args.output_dir else []))
    child_args = ["--num-processes", str(args.num_processes)] if args.num_processes else []
    records = run_comparison(comparison, resume=args.resume, overwrite=args.overwrite, command=command,
                             child_args=child_args, jobs=args.jobs or 1, search_only=args.search_only)
    return 0 if all(r["run_info"]["status"] == "success" for r in records) else 1


def _cmd_report(args) -> int:
    import shlex

    from peftbench.compare.report import write_report

    command = shlex.join(["peftbench", "report", *args.runs, "-o", args.output])
    path = write_report(args.runs, args.output, command=command)
    console.print(f"Report written to [bold]{escape(str(path))}[/] (plots beside it)")
    if args.csv or args.json:
        from peftbench.compare.export import write_csv, write_json_folder
        from peftbench.compare.report import load_runs

        runs = load_runs(args.runs)
        if args.csv:
            console.print(f"One row per run written to [bold]{escape(str(write_csv(runs, args.csv)))}[/]")
        if args.json:
            console.print(f"One JSON per run written into [bold]{escape(str(write_json_folder(runs, args.json)))}[/]")
    return 0


def _report_parser(sub) -> None:
    report = sub.add_parser("report", help="compare finished runs: a Markdown table and PNG plots",
                            description="Compare runs side by side: one row per method (mean ± std over seeds), "
                                        "best values in bold, plots written beside the Markdown.")
    report.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories, or folders holding them")
    report.add_argument("-o", "--output", required=True, help="Markdown file to write, e.g. reports/NAME.md")
    report.add_argument("--csv", metavar="FILE", help="also write one row per run (pandas CSV): run, configuration, "
                        "method, seed, grid values, ROUGE-1/2/L/Lsum, n, trainable params, train time, tokens/s, "
                        "peak memory, status")
    report.add_argument("--json", metavar="DIR", help="also write a folder with one JSON per run in the layout of "
                        "huggingface/peft's method_comparison results (run_info / train_info / meta_info, as run.json)")
    report.set_defaults(func=_cmd_report)



@contextmanager
def _sigterm_as_interrupt():
    """Pre-empted VMs and job schedulers send SIGTERM before SIGKILL: treat it like Ctrl-C so the
    run is recorded as interrupted (and resumable) instead of vanishing mid-stage."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _cmd_doctor(args) -> int:
    from peftbench.doctor import exit_code, print_report, run_checks

    checks = run_checks()
    print_report(checks, console)
    return exit_code(checks)


def _doctor_parser(sub) -> None:
    doctor = sub.add_parser("doctor", help="check Python, torch/CUDA, GPU, bf16, bitsandbytes 4-bit, llama.cpp, disk",
                            description="Check this environment; each line is OK, WARN or FAIL with a fix. "
                                        "Exits 1 when something every run needs fails.")
    doctor.set_defaults(func=_cmd_doctor)



def _cmd_validate(args) -> int:
    from peftbench.compare.plan import is_comparison_file, load_comparison
    from peftbench.pipeline.recipe import load_recipe

    if is_comparison_file(args.recipe):
        comparison = load_comparison(args.recipe, args.overrides)
        then = (f", then the chosen setting of each method per seed ({len(next(iter(comparison.candidates.values())))} runs each)"
                if comparison.search else "")
        console.print(f"[green]ok[/] {args.recipe}: {len(comparison.runs)} {'search ' if comparison.search else ''}runs "
                      f"({', '.join(r.name for r in comparison.runs)}){then} into {comparison.output_dir}, "
                      f"report {comparison.report_path}")
        return 0
    recipe = load_recipe(args.recipe, args.overrides)
    console.print(f"[green]ok[/] {args.recipe}: dataset {recipe.dataset.name}, method {recipe.method.name}, "
                  f"trainer {recipe.trainer.name}, exporters {', '.join(p.name for p, _ in recipe.exporters) or 'none'}")
    return 0


def _validate_parser(sub) -> None:
    validate = sub.add_parser("validate", help="check a recipe (keys, types, plugins, files) without running it")
    validate.add_argument("recipe")
    validate.add_argument("overrides", nargs="*", metavar="key.sub=value")
    validate.set_defaults(func=_cmd_validate)



def _cmd_plugins(args) -> int:
    from rich.table import Table

    from peftbench.host import get_host

    host = get_host()
    table = Table(title="peftbench plugins")
    for col in ("kind", "name", "from plugin", "version"):
        table.add_column(col)
    for registry in (host.datasets, host.methods, host.trainers, host.exporters, host.commands):
        for name, _ in registry.items():
            origin = registry.origin(name)
            table.add_row(registry.kind, name, origin, _plugin_version(origin))
    console.print(table)
    hooks = Table(title="hooks")
    hooks.add_column("plugin")
    hooks.add_column("implements")
    for plugin_name, plugin in host.pm.list_name_plugin():
        impls = [h.name for h in host.pm.get_hookcallers(plugin) or []]
        hooks.add_row(plugin_name, ", ".join(sorted(impls)))
    console.print(hooks)
    from peftbench.host import broken_plugins

    for name, error in broken_plugins.items():
        console.print(f"[red]broken plugin[/] {name}: {escape(error)}")
    return 0


def _plugins_parser(sub) -> None:
    plugins = sub.add_parser("plugins", help="list installed plugins, what they register, their hooks and versions")
    plugins.set_defaults(func=_cmd_plugins)



def _plugin_version(module_name: str) -> str:
    from importlib import metadata

    top = module_name.split(".")[0]
    if top == "peftbench_plugins":
        return f"peftbench {__version__}"
    for dist in metadata.distributions():
        if top in (dist.read_text("top_level.txt") or "").split() or dist.metadata["Name"].replace("-", "_") == top:
            return f"{dist.metadata['Name']} {dist.version}"
    return "?"


def _cmd_methods(args) -> int:
    from rich.table import Table

    from peftbench.host import get_host

    host = get_host()
    for name, method in host.methods.items():
        caps = method.capabilities
        flags = sorted(caps.names())
        table = Table(title=f"{name}: {', '.join(flags) or 'no capabilities'}" + (f" ({caps.notes})" if caps.notes else ""),
                      title_justify="left")
        for col in ("option", "default", "help"):
            table.add_column(col)
        for field_name, field in method.Options.model_fields.items():
            default = field.default if field.default_factory is None else field.default_factory()
            table.add_row(field_name, repr(default), field.description or "")
        console.print(table)
    return 0


def _methods_parser(sub) -> None:
    methods = sub.add_parser("methods", help="list fine-tuning methods with their capabilities and options")
    methods.set_defaults(func=_cmd_methods)



def _cmd_export(args) -> int:
    import shlex

    from peftbench.pipeline.export_run import exit_code, export_run

    command = shlex.join(["peftbench", "export", *args.argv[1:]])
    # argparse gives `--quant-type Q4_K_M Q8_0 gguf.margin=2` the override too (nargs="+" takes every
    # word up to the next option): a key=value is never a format or a quantisation type, so it goes back.
    to = [t for t in args.to if "=" not in t]
    quant_types = [t for t in args.quant_type or [] if "=" not in t] or None
    overrides = [*args.overrides, *(t for t in [*args.to, *(args.quant_type or [])] if "=" in t)]
    with _sigterm_as_interrupt():
        record = export_run(args.run_dir, to=to or None, quant_types=quant_types, output_dir=args.output_dir,
                            overrides=overrides, command=command)
    return exit_code(record)


def _export_parser(sub) -> None:
    export = sub.add_parser(
        "export", help="export a finished run: merged checkpoint, GGUF (several quantisation types), Ollama Modelfile",
        description="Run the exporters on a finished run (its recipe.yaml and adapter/), on any machine that has the base "
                    "model: the GGUF is smoke-tested with llama.cpp against the run's own HF predictions on the same "
                    "examples. Files go into RUN_DIR/exports (or --output-dir); run.json and report.md gain the exports "
                    "and their scores. Exits 1 when an export fails.")
    export.add_argument("run_dir", metavar="RUN_DIR", help="a finished run directory, e.g. runs/quickstart")
    export.add_argument("overrides", nargs="*", metavar="key=value",
                        help="exporter options as NAME.key=value (gguf.margin=2, ollama.live_check=false, merged.dtype=float16), "
                             "or where the base model/data are on this machine (model.name=..., dataset.path=...)")
    export.add_argument("--to", nargs="+", default=[], metavar="FORMAT",
                        help="exporters to run, e.g. merged, gguf, ollama (`peftbench plugins` lists them; default: those "
                             "that export a finished run by default, gguf; an exporter that reads another's files, as "
                             "ollama reads the GGUF, brings it along)")
    export.add_argument("--quant-type", nargs="+", metavar="TYPE",
                        help="llama.cpp quantisation type(s), e.g. Q4_K_M Q5_K_M Q8_0: each is quantised from one f16 "
                             "conversion and smoke-tested, and a table compares them (default: the run recipe's, else Q4_K_M)")
    export.add_argument("--output-dir", help="write a copy of the run with its exports there instead of into RUN_DIR")
    export.set_defaults(func=_cmd_export)



def _cmd_evaluate(args) -> int:
    import shlex

    from peftbench.pipeline.evaluate_run import evaluate_run

    with _sigterm_as_interrupt():
        evaluate_run(args.run_dir, overrides=args.overrides, command=shlex.join(["peftbench", "evaluate", *args.argv[1:]]))
    return 0


def _evaluate_parser(sub) -> None:
    evaluate = sub.add_parser(
        "evaluate", help="score a finished run's adapter again with other evaluation settings (beams, split, length)",
        description="Score a finished run's adapter again, without training: other decoding (evaluation.num_beams, "
                    "evaluation.max_new_tokens) or another split (evaluation.split=selection to choose a setting, then the "
                    "reported split for the chosen one). The scores go into run.json as eval['finetuned[...]'] and "
                    "report.md; the answers into predictions_finetuned[...].jsonl.")
    evaluate.add_argument("run_dir", metavar="RUN_DIR", help="a finished run directory, e.g. runs/quickstart")
    evaluate.add_argument("overrides", nargs="*", metavar="key=value",
                          help="evaluation.num_beams=4, evaluation.split=selection, evaluation.max_new_tokens=96, ...; "
                               "or where the base model/data are on this machine (model.name=..., dataset.path=...)")
    evaluate.set_defaults(func=_cmd_evaluate)



def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="peftbench",
        description="Fine-tune chat LLMs with parameter-efficient methods and compare them honestly.",
    )
    parser.add_argument("--version", action="version", version=f"peftbench {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in (_run_parser, _validate_parser, _report_parser, _export_parser, _evaluate_parser, _plugins_parser,
                _methods_parser):
        add(sub)
    _plugin_command_parsers(sub)
    _doctor_parser(sub)
    return parser


def _plugin_command_parsers(sub) -> None:
    """Subcommands registered by plugins (``peftbench_register_commands``)."""
    from peftbench.host import get_host

    for name, command in get_host().commands.items():
        if name in sub.choices:
            console.print(f"[yellow]warning:[/] plugin command '{name}' ({get_host().commands.origin(name)}) is "
                          "skipped: a built-in command has that name", soft_wrap=True)
            continue
        parser = sub.add_parser(name, help=command.help, description=command.description or command.help)
        command.add_arguments(parser)
        parser.set_defaults(func=command.run)


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()  # loads the plugins, whose commands it lists
    except PeftbenchError as e:
        return _report_error(e)
    # Overrides may come before or after options (`run R --output-dir D a.b=1`); argparse stops
    # collecting a positional list at the first option, so gather the stragglers here.
    args, extra = parser.parse_known_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)  # what a launcher re-runs in each process
    stray = [x for x in extra if x.startswith("-")]  # a stray 'foo' is reported as an override without '='
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    from peftbench.library_output import send_library_output_to_log
    from peftbench.pipeline.modeling import cache_root

    send_library_output_to_log(cache_root() / "peftbench.log")
    try:
        return args.func(args)
    except PeftbenchError as e:
        return _report_error(e)
    except KeyboardInterrupt:
        console.print("[red]interrupted[/] (resume with --resume)")
        return 130



def _report_error(e: PeftbenchError) -> int:
    """A problem the user can fix: one line, exit code 2."""
    # Messages quote user input: escape it (a '[/x]' in a key would otherwise be rich markup)
    # and keep it on one line.
    problem, fix = (escape(" ".join(str(part).splitlines())) for part in (e.problem, e.fix or ""))
    console.print(f"[bold red]error:[/] {problem}" + (f" [bold]Fix:[/] {fix}" if fix else ""), soft_wrap=True)
    if os.environ.get(ERROR_FILE_ENV):  # a parent (a comparison) records why this run never started
        Path(os.environ[ERROR_FILE_ENV]).write_text(" ".join(str(e).splitlines()), encoding="utf-8")
    return EXIT_USAGE
    sys.exit(main())
