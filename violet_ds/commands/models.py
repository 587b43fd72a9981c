"""The model and checkpoint commands: `list-models`, `convert-checkpoint`, `universal-checkpoint`. Each calls
the library (`violet_ds.models`, `violet_ds.models.checkpoint_io`, `violet_ds.engine.universal`) and prints
what it found or wrote."""

from __future__ import annotations

from typing import List, Literal, Optional

from violet_ds.engine import universal

# the models registry is imported inside the commands that use it: it takes seconds (timm, torchvision)


def list_models(names: Optional[List[str]] = None) -> None:
    """List the registered models with their parameter counts per part (in millions).

    Models are built on the meta device, so nothing is allocated or initialised.

    Args:
        names: only these models (default: all registered).
    """
    from violet_ds.models import model_sizes

    for name, parts in model_sizes(names).items():
        total = parts.pop("total")
        detail = ", ".join(f"{part} {count / 1e6:.2f}M" for part, count in parts.items())
        print(f"{name:<20} {total / 1e6:8.2f}M  ({detail})")


def convert_checkpoint(src: str, dst: str, direction: Literal["auto", "to_ours", "to_official"] = "auto",
                       mvm_target: Optional[str] = None, allow_unmatched: bool = False,
                       legacy_position_ids: bool = True, half: bool = False) -> None:
    """Convert an official VIOLET / VIOLETv2 / LAVENDER checkpoint to violet_ds safetensors, or back.

    Args:
        src: input file: an official `.pt`/`.pth` (read with `torch.load(weights_only=True)`) or a
            violet_ds `.safetensors` (keys `model.*`, `heads.*`).
        dst: output file: `.safetensors` for violet_ds weights, `.pt` for the official layout.
        direction: `auto` picks from the input: official keys -> to_ours, violet_ds keys -> to_official.
        mvm_target: name of the official dense MVM decoder (`decoder_<target>`) when writing official keys
            (default: the one recorded when the file was converted to ours, else `pixel`).
        allow_unmatched: keep going (with a report) when official keys have no counterpart.
        legacy_position_ids: add `enc_txt.emb_txt.position_ids` when writing official keys (the
            official code's transformers < 4.31 expects it).
        half: store fp16 in the official file (the released checkpoints' precision).
    """
    from violet_ds.models import checkpoint_io

    print(checkpoint_io.convert_checkpoint(src, dst, direction=direction, mvm_target=mvm_target,
                                           allow_unmatched=allow_unmatched, legacy_position_ids=legacy_position_ids,
                                           half=half))


def _latest_line(done: universal.UniversalConversion) -> str:
    if done.set_latest:
        return (f"moved: {done.previous_latest or '(none)'} -> {done.output.name} (`--run.resume auto` resumes the "
                "converted tag; --set_latest false leaves `latest` alone)")
    return (f"unchanged ({done.previous_latest or 'none'}); resume the converted tag with --run.resume "
            f"{done.output.name}")


def _exact_line(done: universal.UniversalConversion) -> str:
    if done.rng_streams:
        return "exact: the RNG streams of every rank are copied (same world size)"
    if done.target_world != done.source_world:
        return (f"not exact: the RNG streams of {done.source_world} rank(s) cannot move to {done.target_world}; "
                "masking and dropout draws restart from engine.seed (weights, optimizer and data position are exact)")
    return (f"not exact: {done.source.name} has no RNG files to copy; masking and dropout draws restart from "
            "engine.seed (weights, optimizer and data position are exact)")


def universal_checkpoint(run_dir: str, tag: str = "latest", world_size: Optional[int] = None,
                         batch_size: Optional[int] = None, workers: int = 1, set_latest: bool = True,
                         force: bool = False) -> int:
    """Convert a run's checkpoint to DeepSpeed's universal format so it resumes on another number of ranks.

    Writes `<run_dir>/checkpoints/<tag>-universal` (weights, fp32 master copies and optimizer moments
    whole, per parameter) with the data cursor remapped for `world_size` ranks of `batch_size` samples,
    and points `latest` at it: then run the same command again with the new number of ranks and
    `--run.resume auto`. On the same world size the ranks' RNG files are copied (an exact resume); on another
    one the resumed ranks restart their RNG streams from the run seed. Exits non-zero when the cursor cannot
    be remapped exactly.

    Args:
        run_dir: the run directory (runs/<name>), which holds checkpoints/.
        tag: checkpoint tag to convert, or `latest`.
        world_size: number of ranks the run resumes on (default: the checkpoint's).
        batch_size: per-rank micro-batch size of the resumed run (default: the checkpoint's data.batch_size).
        workers: processes for DeepSpeed's shard extraction.
        set_latest: point checkpoints/latest at the converted tag.
        force: replace an existing converted tag.
    """
    done = universal.universal_checkpoint(run_dir, tag=tag, world_size=world_size, batch_size=batch_size,
                                          workers=workers, set_latest=set_latest, force=force)
    resume = "auto" if done.set_latest else done.output.name
    lines = [
        "violet-ds universal-checkpoint done",
        f"  source            {done.source} (step {done.step}, epoch {done.epoch}, {done.source_world} ranks)",
        f"  universal         {done.output} ({done.parameters} parameters)",
        f"  data cursor       {done.micro_in_epoch} micro-batches/rank x {done.source_world} -> {done.new_micro} "
        f"micro-batches/rank x {done.target_world} (sample {done.samples_in_epoch} of epoch {done.epoch})",
        f"  latest            {_latest_line(done)}",
        f"  resume            {_exact_line(done)}",
        f"  resume with       {done.target_world} ranks, --data.batch_size {done.target_batch} --run.resume {resume}",
        f"  time              {done.seconds:.1f} s",
    ]
    print("\n".join(lines), flush=True)
    return 0
