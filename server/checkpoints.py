"""Round checkpoints and the final exported model.

A checkpoint holds only the trainable (travelling) parameters — the frozen rest
is the packaged model, identical everywhere — as safetensors, plus the round
number in its metadata. Only the newest ``keep-checkpoints`` rounds stay on disk
(:func:`prune_checkpoints`): the whole encoder with its server-optimizer moments
is 130 MB a round, so a 150-round run would otherwise leave 20 GB. The final model
is exported with ``save_pretrained`` and the tokenizer, so
``transformers.pipeline("text-classification", model=DIR)`` loads it with no fedpriv code.
"""

from __future__ import annotations

import copy
import os
import re
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file, save
from safetensors import safe_open

from fedpriv.core.files import atomic_write_bytes

CHECKPOINT_DIR = "checkpoints"
FINAL_MODEL_DIR = "final_model"
_NAME = re.compile(r"round-(\d{3,})\.safetensors$")


def save_checkpoint(run_dir: Path, server_round: int, values: "dict[str, np.ndarray]") -> Path:
    path = Path(run_dir) / CHECKPOINT_DIR / f"round-{server_round:03d}.safetensors"
    # atomic: a crash leaves the previous checkpoint intact
    atomic_write_bytes(path, save({k: np.ascontiguousarray(v) for k, v in values.items()}, metadata={"round": str(server_round)}))
    return path


def server_optimizer_path(run_dir: Path, server_round: int) -> Path:
    """Beside the model checkpoint; the name does not match ``round-NNN.safetensors`` on purpose."""
    return Path(run_dir) / CHECKPOINT_DIR / f"round-{server_round:03d}.server-optimizer.safetensors"


def save_server_optimizer_state(run_dir: Path, server_round: int, state: dict) -> Path:
    """The server optimizer's state after ``server_round`` (:meth:`ServerOptimizer.state_dict`).

    Written *before* that round's model checkpoint, so a round that a resumed run
    takes as completed always has its optimizer state too.
    """
    path = server_optimizer_path(run_dir, server_round)
    atomic_write_bytes(path, save({k: np.ascontiguousarray(v) for k, v in state["arrays"].items()},
                                  metadata={"round": str(server_round), "name": str(state["name"]), "steps": str(int(state["steps"]))}))
    return path


def load_server_optimizer_state(run_dir: Path, server_round: int) -> dict | None:
    """The state saved after ``server_round``, or None if there is none."""
    path = server_optimizer_path(run_dir, server_round)
    if not path.is_file():
        return None
    with safe_open(str(path), framework="numpy") as fh:
        meta = fh.metadata() or {}
    return {"name": meta.get("name"), "steps": int(meta.get("steps", 0)), "arrays": dict(load_file(str(path)))}


def latest_checkpoint(run_dir: Path) -> tuple[int, "OrderedDict[str, np.ndarray]"] | None:
    """The last completed round and its parameters, or None if the run has none."""
    found = sorted((int(m.group(1)), p) for p in (Path(run_dir) / CHECKPOINT_DIR).glob("round-*.safetensors")
                   if (m := _NAME.search(p.name)))
    if not found:
        return None
    server_round, path = found[-1]
    with safe_open(str(path), framework="numpy") as fh:
        names = list(fh.keys())
    values = load_file(str(path))
    return server_round, OrderedDict((n, values[n]) for n in names)


def prune_checkpoints(run_dir: Path, keep: int, newest: int) -> list[Path]:
    """Delete the checkpoints (model and server-optimizer state) of rounds <= ``newest - keep``; ``keep = 0``
    keeps all. Call it only once round ``newest`` is complete on both sides (checkpoint *and* report), so the
    round a resumed run would start from (server/resume.py) is never among them. Moved-aside
    ``*.discarded`` files are left for forensics."""
    if keep <= 0:
        return []
    removed = []
    for p in sorted((Path(run_dir) / CHECKPOINT_DIR).glob("round-*.safetensors")):
        digits = p.name[len("round-"):].split(".", 1)[0]
        if digits.isdigit() and int(digits) <= newest - keep:
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def export_model(run_dir: Path, model: torch.nn.Module, tokenizer) -> Path:
    """``save_pretrained`` + tokenizer. A mean-pooling model ships its modeling file (``auto_map``).

    LoRA adapters are folded into their base weights first (on a copy), so the exported
    model is an ordinary checkpoint that loads without ``peft``.
    """
    from fedpriv.task.lora import is_lora, merge_lora

    if is_lora(model):
        model = merge_lora(copy.deepcopy(model))
    out = Path(run_dir) / FINAL_MODEL_DIR
    model.config.id2label = {0: "negative", 1: "positive"}
    model.config.label2id = {"negative": 0, "positive": 1}
    if type(model).__name__ == "MeanPoolingBertForSequenceClassification":
        model.register_for_auto_class("AutoModelForSequenceClassification")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    _give_weights_the_mode_of(out, out / "config.json")
    return out


def _give_weights_the_mode_of(folder: Path, reference: Path) -> None:
    """safetensors' writer creates its files 0600 whatever the umask, so the exported weights were readable by
    their owner only while the ``config.json`` beside them (Python's ``open``) has the mode the operator's umask
    gives. The model is no secret to the people the run is for (it is the DP release's post-processing): give
    the weights that same mode."""
    mode = reference.stat().st_mode & 0o777
    for path in folder.glob("*.safetensors"):
        os.chmod(path, mode)
