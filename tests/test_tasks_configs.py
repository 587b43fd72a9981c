"""The finetuning recipes: all 14 benchmarks of docs/reference.md#6-reported-results, both head styles where the papers have both,
parsed by the real CLI parser, with task options every task accepts."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

CONFIGS = Path(__file__).resolve().parents[1] / "launch" / "configs"
BENCHMARKS = ["tgif_action", "tgif_transition", "msrvtt_mc", "lsmdc_mc", "tgif_frame", "msrvtt_qa", "msvd_qa",
              "lsmdc_fib", "msrvtt_ret", "didemo_ret", "lsmdc_ret", "msvd_ret", "msrvtt_cap", "msvd_cap"]
LAVENDER_ONLY = {"msvd_ret", "msrvtt_cap", "msvd_cap"}
FINETUNE = sorted(CONFIGS.glob("finetune_*.yaml")) + sorted(CONFIGS.glob("demo_*.yaml"))


def test_every_benchmark_has_its_recipes():
    names = {p.stem for p in CONFIGS.glob("finetune_*.yaml")}
    for benchmark in BENCHMARKS:
        assert f"finetune_{benchmark}_lavender" in names
        assert (f"finetune_{benchmark}" in names) == (benchmark not in LAVENDER_ONLY)
    for family in ("qa_mc", "capmc", "qa_oe", "fib", "retrieval", "caption", "action", "multitask"):
        assert (CONFIGS / f"demo_{family}.yaml").is_file()


@pytest.mark.parametrize("path", FINETUNE, ids=lambda p: p.stem)
def test_recipe_parses_and_task_accepts_options(path):
    from violet_ds.cli import build_parser, load_command
    from violet_ds.registry import TASKS
    from violet_ds.tasks.common import parse_options

    parser = build_parser("finetune", load_command("finetune"))
    cfg = parser.parse_args(["--config", str(path)])
    task = cfg.task
    task_class = TASKS.get(task.name)
    parse_options(task.name, task.options, task_class.option_defaults)
    raw = yaml.safe_load(path.read_text())
    if path.stem.startswith("finetune_"):
        style = "mlm" if path.stem.endswith("_lavender") else "head"
        assert task.head_style == style
        assert cfg.data.num_frames == 5 and cfg.data.max_text_len == 25 and cfg.data.image_size == 224
        assert 1.2e-5 <= cfg.optim.lr <= 2e-5 and tuple(cfg.optim.betas) == (0.9, 0.98)
        assert cfg.optim.weight_decay == 1e-3 and cfg.optim.warmup_ratio == 0.1
        assert 6 <= cfg.data.batch_size <= 24 and 8 <= cfg.run.epochs <= 60
    else:
        assert raw["data"]["tokenizer"] == "data/demo/tokenizer"
    for sub in (task.options.get("tasks") or []):
        parse_options(sub["task"], sub.get("options", {}), TASKS.get(sub["task"]).option_defaults)
