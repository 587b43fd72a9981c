"""`violet-ds <command>`: one command-line entry point for every user-facing job.

Each command is a plain, fully type-annotated Python function somewhere in the library; this module
only maps command names to those functions and builds a jsonargparse parser from the chosen
function's signature. Only the chosen command's module is imported, so `violet-ds extract-frames`
never pays for importing DeepSpeed.

Every command accepts `--config FILE.yaml` (repeatable; later files and later flags override earlier
ones), dotted overrides such as `--optim.lr 1e-4`, and `--print_config` to show the resolved
configuration and exit. Unknown keys and wrong types are errors that name the key. A command with a
`resolved_config` parameter is handed that resolved configuration as YAML (to record in its run
directory); the parameter is not an option.
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional

# name -> ("module:function", one-line help). Two-word names ("bench data") form groups.
COMMANDS: dict[str, tuple[str, str]] = {
    # training
    "pretrain": ("violet_ds.commands.run:pretrain", "pretrain a model (VIOLET / VIOLETv2 / LAVENDER / VIMPAC) with DeepSpeed"),
    "finetune": ("violet_ds.commands.run:finetune", "finetune on a downstream task from a checkpoint"),
    "evaluate": ("violet_ds.commands.run:evaluate", "evaluate a checkpoint on a task; writes predictions and metrics"),
    "export": ("violet_ds.commands.export:export", "DeepSpeed checkpoint -> one safetensors file of fp32 weights"),
    "predict": ("violet_ds.predict:predict", "answer questions, rank captions, retrieve or caption your own video files"),
    "universal-checkpoint": ("violet_ds.engine.universal:universal_checkpoint", "convert a checkpoint to DeepSpeed's universal format (resume on another world size)"),
    # data
    "extract-frames": ("violet_ds.data.extract:extract_frames", "videos -> N sampled JPEG frames per video -> TSV shards"),
    "extract-images": ("violet_ds.data.extract:extract_images", "images (CC3M style) -> one-frame TSV rows"),
    "build-index": ("violet_ds.data.tsv:build_index_command", "write the .lineidx of a TSV that has none"),
    "validate-tsv": ("violet_ds.data.tsv:validate_command", "check a TSV + .lineidx: every offset starts a row; count rows/frames"),
    "convert-pickle": ("violet_ds.data.convert:convert_pickle", "official frame / VQ pickles -> TSV / .npz (restricted unpickler)"),
    "make-demo-data": ("violet_ds.data.demo:make_demo_data", "generate the synthetic demo videos, annotations, TSVs and vocabulary"),
    "extract-targets": ("violet_ds.targets.extract:extract_targets", "pre-compute an MVM target (teacher output) for a frame TSV"),
    "extract-vq": ("violet_ds.targets.vq:extract_vq", "frame TSVs -> DALL-E dVAE token TSV for VIMPAC (all frames per video)"),
    # models
    "convert-checkpoint": ("violet_ds.models.checkpoint_io:convert_checkpoint", "official VIOLET / VIOLETv2 / LAVENDER checkpoint <-> violet_ds safetensors"),
    "list-models": ("violet_ds.models:print_models", "list registered models with their parameter counts"),
    # benchmarks
    "bench data": ("violet_ds.data.bench:bench_data", "data-loader throughput (clips/s) per JPEG decoder"),
    "bench train": ("violet_ds.commands.bench:bench_train", "forward+backward+step time, samples/s, peak memory, FLOPs"),
    "bench gpu": ("violet_ds.commands.gpu_check:bench_gpu", "one-shot check of every CUDA path (CPU mode for CI): one table"),
    "bench targets": ("violet_ds.targets.bench:bench_targets", "time per clip of each MVM teacher"),
}

_LOCAL_RANK = re.compile(r"^--local[_-]rank(=\d+)?$")


def _strip_launcher_args(argv: list[str]) -> list[str]:
    """Drop the `--local_rank=N` that the DeepSpeed launcher appends (LOCAL_RANK is read from env)."""
    out, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if _LOCAL_RANK.match(arg):
            # `--local_rank 3` form: also drop the value
            skip = "=" not in arg and i + 1 < len(argv) and argv[i + 1].isdigit()
            continue
        out.append(arg)
    return out


def version_text() -> str:
    """`violet-ds --version`: our version and those of the libraries a bug report needs (no imports)."""
    from importlib import metadata

    from violet_ds import __version__

    parts = []
    for package in ("torch", "deepspeed", "transformers"):
        try:
            parts.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            parts.append(f"{package} not installed")
    return f"violet-ds {__version__} (python {sys.version.split()[0]}, {', '.join(parts)})"


def _overview() -> str:
    width = max(map(len, COMMANDS)) + 2
    lines = ["usage: violet-ds <command> [--config FILE.yaml] [--key value ...] [--print_config]",
             "       violet-ds --version", "", "commands:"]
    lines += [f"  {name:<{width}}{help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `violet-ds <command> --help` for the options of one command."]
    return "\n".join(lines)


def resolve(argv: list[str]) -> tuple[str, list[str]]:
    """Split argv into (command name, remaining args); raise SystemExit with help on bad input."""
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_overview())
        raise SystemExit(0)
    if argv[0] in ("--version", "-V"):
        print(version_text())
        raise SystemExit(0)
    name, rest = argv[0], argv[1:]
    groups = {key.split()[0] for key in COMMANDS if " " in key}
    if name in groups:
        sub = [key.split()[1] for key in COMMANDS if key.startswith(name + " ")]
        if not rest or rest[0] not in sub:
            print(f"usage: violet-ds {name} {{{','.join(sub)}}} ...", file=sys.stderr)
            for key in sub:
                print(f"  {key:<10}{COMMANDS[f'{name} {key}'][1]}", file=sys.stderr)
            raise SystemExit(0 if rest and rest[0] in ("-h", "--help") else 2)
        name, rest = f"{name} {rest[0]}", rest[1:]
    if name not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(name, COMMANDS, n=3)
        hint = f" (did you mean: {', '.join(close)}?)" if close else ""
        print(f"violet-ds: unknown command {name!r}{hint}\n\n{_overview()}", file=sys.stderr)
        raise SystemExit(2)
    return name, rest


def load_command(name: str) -> Callable:
    target, _ = COMMANDS[name]
    module_name, func_name = target.split(":")
    return getattr(importlib.import_module(module_name), func_name)


# the parameter through which a command receives its resolved configuration (YAML), never an option
RESOLVED_CONFIG = "resolved_config"


@dataclass
class Invocation:
    """A parsed command line, ready to run: the command function, its arguments, the resolved YAML."""

    func: Callable
    kwargs: dict[str, Any]
    resolved_yaml: str

    def __call__(self):
        return self.func(**self.kwargs)


def _read_field_docstrings() -> None:
    """Make --help show the docstring under each dataclass field (config.py) as that option's help."""
    try:
        from jsonargparse import set_parsing_settings

        set_parsing_settings(docstring_parse_attribute_docstrings=True)
    except ImportError:  # jsonargparse < 4.35
        from jsonargparse import set_docstring_parse_options

        set_docstring_parse_options(attribute_docstrings=True)


def build_parser(name: str, func: Callable):
    from jsonargparse import ActionConfigFile, ArgumentParser

    _read_field_docstrings()
    parser = ArgumentParser(
        prog=f"violet-ds {name}",
        description=(func.__doc__ or COMMANDS[name][1]).strip(),
        exit_on_error=True,
    )
    parser.add_argument("--config", action=ActionConfigFile, help="YAML config file(s); later ones override earlier")
    parser.add_function_arguments(func, fail_untyped=True, skip={RESOLVED_CONFIG})
    return parser


def parse_command(name: str, argv: list[str]) -> Invocation:
    """Parse argv for command `name`: the function with its arguments and the resolved configuration."""
    func = load_command(name)
    parser = build_parser(name, func)
    cfg = parser.parse_args(argv)
    cfg.pop("config", None)
    # keep None values (e.g. `max_steps: null`): skip_unset=False since jsonargparse 4.49, skip_none before
    try:
        resolved_yaml = parser.dump(cfg, skip_unset=False)
    except (TypeError, ValueError):  # "Unexpected keyword parameters" of older versions
        resolved_yaml = parser.dump(cfg, skip_none=False)
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    kwargs = dict(vars(instantiate(cfg)))
    kwargs.pop("config", None)
    if RESOLVED_CONFIG in inspect.signature(func).parameters:
        kwargs[RESOLVED_CONFIG] = resolved_yaml
    return Invocation(func, kwargs, resolved_yaml)


def run_command(name: str, argv: list[str]):
    """Parse argv for command `name` and call it; returns the function's result."""
    return parse_command(name, argv)()


def main(argv: Optional[list[str]] = None) -> None:
    # from the console (argv None) user errors print one line; a Python caller gets the exception
    from_console = argv is None
    argv = _strip_launcher_args(list(sys.argv[1:] if argv is None else argv))
    if "--debug" in argv:
        import os

        from violet_ds.errors import DEBUG_ENV

        argv = [arg for arg in argv if arg != "--debug"]
        os.environ[DEBUG_ENV] = "1"
    name, rest = resolve(argv)
    result = _run_reporting_user_errors(name, rest) if from_console else run_command(name, rest)
    if isinstance(result, int) and not isinstance(result, bool):
        raise SystemExit(result)


def _run_reporting_user_errors(name: str, rest: list[str]):
    """User errors (violet_ds.errors) end the command with their one-line message and exit code 1."""
    from violet_ds import errors

    try:
        return run_command(name, rest)
    except Exception as error:  # noqa: BLE001 - sorted into user errors and the rest right here
        if not errors.is_user_error(error):
            raise
        errors.report(error, f"violet-ds {name}")
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
