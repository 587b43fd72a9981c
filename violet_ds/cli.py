"""`violet-ds <command>`: one command-line entry point for every user-facing job.

Each command is a plain, fully type-annotated Python function in `violet_ds/commands/`; this module
only maps command names to those functions and builds a jsonargparse parser from the chosen
function's signature. Only the chosen command's module is imported, so `violet-ds extract-frames`
never pays for importing DeepSpeed.

Every command accepts `--config FILE.yaml` (repeatable; later files and later flags override earlier
ones), dotted overrides such as `--optim.lr 1e-4`, and `--print_config` to show the resolved
configuration and exit. A list-typed option takes its values as separate tokens (`--videos a.mp4
b.mp4`, what a shell glob gives). A parse error is one line naming the key (an unknown option with
the closest valid ones) and a pointer to `--help`, exit code 2. A command with a
`resolved_config` parameter is handed that resolved configuration as YAML (to record in its run
directory); the parameter is not an option.
"""

from __future__ import annotations

import collections.abc
import difflib
import functools
import importlib
import inspect
import json
import os
import re
import signal
import sys
import threading
import traceback
import typing
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Callable, Optional

import yaml

from violet_ds import __version__, errors
from violet_ds.paths import config_argument

# jsonargparse (0.2-0.3 s of imports) is imported where a command's parser is built, so that the overview,
# `--version` and an unknown command answer without it

# heading -> {name -> ("module:function", one-line help)}: the commands grouped by job, in the order
# `violet-ds --help` lists them. Two-word names ("bench data") are called as `violet-ds bench data`.
COMMAND_GROUPS: dict[str, dict[str, tuple[str, str]]] = {
    "prepare data": {
        "make-demo-data": ("violet_ds.commands.data:make_demo_data", "generate the synthetic demo videos, annotations, TSVs and vocabulary"),
        "extract-frames": ("violet_ds.commands.data:extract_frames", "videos -> N sampled JPEG frames per video -> TSV shards"),
        "check-parts": ("violet_ds.commands.data:check_parts", "check the parts of a split extract-frames: all complete, every video once"),
        "extract-images": ("violet_ds.commands.data:extract_images", "images (CC3M style) -> one-frame TSV rows"),
        "build-index": ("violet_ds.commands.data:build_index", "write the .lineidx of a TSV that has none"),
        "validate-tsv": ("violet_ds.commands.data:validate_tsv", "check a TSV + .lineidx: every offset starts a row; count rows/frames"),
        "convert-pickle": ("violet_ds.commands.data:convert_pickle", "official frame / VQ pickles -> TSV / .npz (restricted unpickler)"),
        "extract-targets": ("violet_ds.commands.targets:extract_targets", "pre-compute an MVM target (teacher output) for a frame TSV"),
        "extract-vq": ("violet_ds.commands.targets:extract_vq", "frame TSVs -> DALL-E dVAE token TSV for VIMPAC (all frames per video)"),
    },
    "train": {
        "pretrain": ("violet_ds.commands.train:pretrain", "pretrain a model (VIOLET / VIOLETv2 / LAVENDER / VIMPAC) with DeepSpeed"),
        "finetune": ("violet_ds.commands.train:finetune", "finetune on a downstream task from a checkpoint"),
        "recipes": ("violet_ds.commands.recipes:recipes", "list the packaged training recipes; `recipes show NAME` prints one"),
    },
    "evaluate and predict": {
        "evaluate": ("violet_ds.commands.train:evaluate", "evaluate a checkpoint on a task; writes predictions and metrics"),
        "predict": ("violet_ds.commands.predict:predict", "answer questions, rank captions, retrieve or caption your own video files"),
    },
    "models and checkpoints": {
        "list-models": ("violet_ds.commands.models:list_models", "list registered models with their parameter counts"),
        "export": ("violet_ds.commands.export:export", "DeepSpeed checkpoint -> one safetensors file of fp32 weights"),
        "convert-checkpoint": ("violet_ds.commands.models:convert_checkpoint", "official VIOLET / VIOLETv2 / LAVENDER checkpoint <-> violet_ds safetensors"),
        "universal-checkpoint": ("violet_ds.commands.models:universal_checkpoint", "convert a checkpoint to DeepSpeed's universal format (resume on another world size)"),
    },
    "benchmarks and checks": {
        "bench data": ("violet_ds.commands.bench:bench_data", "data-loader throughput (clips/s) per JPEG decoder"),
        "bench train": ("violet_ds.commands.bench:bench_train", "forward+backward+step time, samples/s, peak memory, FLOPs"),
        "bench gpu": ("violet_ds.commands.bench:bench_gpu", "one-shot check of every CUDA path (CPU mode for CI): one table"),
        "bench targets": ("violet_ds.commands.bench:bench_targets", "time per clip of each MVM teacher"),
    },
}

# name -> ("module:function", one-line help), every group together
COMMANDS: dict[str, tuple[str, str]] = {
    name: entry for group in COMMAND_GROUPS.values() for name, entry in group.items()
}

# `violet-ds recipes show NAME` is `violet-ds recipes --show NAME`: verbs a command takes as its first word
VERB_OPTIONS: dict[str, tuple[str, ...]] = {"recipes": ("show",)}

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
             "       violet-ds --version"]
    for heading, group in COMMAND_GROUPS.items():
        lines += ["", f"{heading}:"]
        lines += [f"  {name:<{width}}{help_}" for name, (_, help_) in group.items()]
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
        close = difflib.get_close_matches(name, COMMANDS, n=3)
        hint = f" (did you mean: {', '.join(close)}?)" if close else ""
        print(f"violet-ds: unknown command {name!r}{hint}\n\n{_overview()}", file=sys.stderr)
        raise SystemExit(2)
    if name in VERB_OPTIONS and rest and rest[0] in VERB_OPTIONS[name]:
        rest = [f"--{rest[0]}", *rest[1:]]
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


def _list_members(typehint: Any) -> tuple[bool, bool]:
    """(whether a list is accepted, whether only lists or None are) for List/Sequence/Union/Optional types."""
    members = typing.get_args(typehint) if typing.get_origin(typehint) is typing.Union else (typehint,)
    members = [member for member in members if member is not type(None)]
    lists = [typing.get_origin(member) in (list, collections.abc.Sequence, collections.abc.MutableSequence)
             for member in members]
    return any(lists), bool(lists) and all(lists)


def _is_value(token: str) -> bool:
    """A command-line token that is a value, not an option: no leading `-`, `-` alone, or a negative number."""
    if token == "-" or not token.startswith("-"):
        return True
    try:
        float(token)
    except ValueError:
        return False
    return True


def _is_scalar(value: str) -> bool:
    """Whether a value reads as one item, not as a YAML list, mapping or null."""
    try:
        loaded = yaml.safe_load(value)
    except yaml.YAMLError:
        return True
    return not isinstance(loaded, (list, dict)) and loaded is not None


def gather_list_values(parser, argv: list[str]) -> list[str]:
    """Let a list-typed option take its values as separate tokens: `--videos a.mp4 b.mp4`.

    The values are the tokens after the option up to the next option (negative numbers are values;
    `--opt=first more ...` works too); they are handed to jsonargparse as one JSON list. A single
    value is passed on unchanged (a YAML list such as `--captions '[a dog, a cat]'`, `null`, or a value of
    an option that also takes a plain string, like predict's `--videos clips/`), except that one item
    for an option that takes only lists becomes a one-item list (`--names violet-v1`).
    Options that are not list-typed are untouched.
    """
    list_only = {}
    for action in parser._actions:
        accepts_list, only_lists = _list_members(getattr(action, "_typehint", None))
        if action.nargs != 0 and accepts_list:
            list_only.update((option, only_lists) for option in action.option_strings if not option.endswith("+"))
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg == "--":
            out += argv[i - 1:]
            break
        name, eq, inline = arg.partition("=")
        if name not in list_only:
            out.append(arg)
            continue
        values = [inline] if eq else []
        start = i
        while i < len(argv) and argv[i] != "--" and _is_value(argv[i]):
            i += 1
        values += argv[start:i]
        if len(values) > 1 or (values and list_only[name] and _is_scalar(values[0])):
            out += [name, json.dumps(values, ensure_ascii=False)]
        else:
            out += [arg] + argv[start:i]
    return out


def _closest_options(option: str, known: list[str]) -> list[str]:
    """Valid options that `option` was probably meant to be: the same last key under another group
    (`--lr` -> `--optim.lr`), else the closest spellings."""
    leaf = option.lstrip("-").split(".")[-1]
    same_leaf = [candidate for candidate in known if candidate.lstrip("-").split(".")[-1] == leaf]
    if same_leaf:
        return same_leaf[:3]
    scored = sorted(((difflib.SequenceMatcher(None, option, candidate).ratio(), candidate) for candidate in known),
                    reverse=True)
    if not scored or scored[0][0] < 0.6:
        return []
    # the best match, and others only when nearly as close
    return [candidate for ratio, candidate in scored[:3] if ratio >= scored[0][0] - 0.05]


def short_parse_error(parser, message: str) -> str:
    """One line for a jsonargparse error: the unknown option with its closest valid ones, or the key at fault."""
    if message.startswith("unrecognized arguments:"):
        tokens = message.split(":", 1)[1].split()
        options = list(dict.fromkeys(token.split("=", 1)[0] for token in tokens if not _is_value(token)))
        if not options:
            plural = "s" if len(tokens) > 1 else ""
            return f"unexpected value{plural} {' '.join(tokens)} (every value follows its --option)"
        known = [option for option in parser._option_string_actions
                 if option.startswith("--") and not option.endswith("+")]
        named = []
        for option in options:
            close = _closest_options(option, known)
            named.append(f"{option} (did you mean {' or '.join(close)}?)" if close else option)
        return f"unknown option{'s' if len(named) > 1 else ''} {', '.join(named)}"
    required = re.match(r"the following arguments are required: (.*)", message)
    if required:
        names = [name if name.startswith("-") else f"--{name}" for name in map(str.strip, required.group(1).split(","))]
        return f"missing required option{'s' if len(names) > 1 else ''} {', '.join(names)}"
    key = re.match(r'Parser key "([^"]+)":\s*(.*)', message, re.DOTALL)
    if key:
        message = f"--{key.group(1)}: {key.group(2)}"
    message = re.sub(r"<class '([\w.]+)'>", r"\1", message).replace("typing.", "")
    return " ".join(line.strip() for line in message.splitlines() if line.strip())


@functools.lru_cache(maxsize=None)
def _parser_class():
    """jsonargparse's ArgumentParser whose errors are one line plus a pointer to --help (no usage dump)."""
    from jsonargparse import ArgumentParser

    class CommandParser(ArgumentParser):
        def error(self, message: str, ex: Optional[Exception] = None):
            # inner parsers (exit_on_error=False) raise for jsonargparse to handle; --debug shows everything
            if not self.exit_on_error or errors.debug_enabled():
                super().error(message, ex)
            prog = self.prog.replace(" [options]", "")
            sys.stderr.write(f"{prog}: error: {short_parse_error(self, message)}\n"
                             f"run '{prog} --help' for all options\n")
            sys.stderr.flush()
            self.exit(2)

    return CommandParser


def build_parser(name: str, func: Callable):
    from jsonargparse import ActionConfigFile

    _read_field_docstrings()
    parser = _parser_class()(
        prog=f"violet-ds {name}",
        description=(func.__doc__ or COMMANDS[name][1]).strip(),
        exit_on_error=True,
    )
    parser.add_argument("--config", action=ActionConfigFile, help="YAML config file(s); later ones override earlier")
    parser.add_function_arguments(func, fail_untyped=True, skip={RESOLVED_CONFIG})
    return parser


def expand_config_values(argv: list[str]) -> list[str]:
    """Every `--config VALUE` as jsonargparse will read it (`violet_ds.paths.config_argument`): a file as
    given, a run directory as its configuration (paths as they are now), else a packaged recipe name."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--config" and i + 1 < len(argv):
            out += [arg, config_argument(argv[i + 1])]
            i += 2
            continue
        if arg.startswith("--config="):
            arg = "--config=" + config_argument(arg[len("--config="):])
        out.append(arg)
        i += 1
    return out


def parse_command(name: str, argv: list[str]) -> Invocation:
    """Parse argv for command `name`: the function with its arguments and the resolved configuration."""
    func = load_command(name)
    parser = build_parser(name, func)
    cfg = parser.parse_args(gather_list_values(parser, expand_config_values(argv)))
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
        argv = [arg for arg in argv if arg != "--debug"]
        os.environ[errors.DEBUG_ENV] = "1"
    name, rest = resolve(argv)
    if from_console:
        try:
            result = _run_reporting_user_errors(name, rest)
        except BrokenPipeError:  # `violet-ds recipes | head`: the reader left; stop quietly
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise SystemExit(0) from None
    else:
        result = run_command(name, rest)
    if isinstance(result, int) and not isinstance(result, bool):
        raise SystemExit(result)


def _run_reporting_user_errors(name: str, rest: list[str]):
    """User errors (violet_ds.errors) end the command with their one-line message and exit code 1."""
    try:
        return run_command(name, rest)
    except KeyboardInterrupt as error:
        # Ctrl-C: exit code 130 and one line, never a traceback (a run saves on the first one and logs that)
        if errors.debug_enabled():
            traceback.print_exc()
        if not isinstance(error, errors.Interrupted):
            sys.stderr.write(f"violet-ds {name}: interrupted{': ' + str(error) if str(error) else ''}\n")
            sys.stderr.flush()
        # another Ctrl-C while the interpreter shuts down ends it at once, without a traceback
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, lambda number, frame: os._exit(130))
        raise SystemExit(130) from None
    except Exception as error:  # noqa: BLE001 - sorted into user errors and the rest right here
        if not errors.is_user_error(error):
            raise
        errors.report(error, f"violet-ds {name}")
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
