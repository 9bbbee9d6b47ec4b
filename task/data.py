"""The labelled social-media corpus: where it comes from and how a run reads it.

The ICWSM-2014 sentiment ground truth (Hutto & Gilbert, MIT licence) ships only
inside the *source* distribution of ``vadersentiment==3.3.2``. ``fetch_corpus``
downloads that sdist once with pip (the only network fedpriv ever uses, and only
during ``fedpriv prepare-data``), verifies its SHA-256, and turns the four
ground-truth files into ``corpus.jsonl``. Nothing downloads at import time or
during a run.
"""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator

from fedpriv.core.errors import DataError
from fedpriv.core.files import atomic_open

SDIST_NAME = "vaderSentiment-3.3.2.tar.gz"
SDIST_SHA256 = "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9"
INNER_ARCHIVE = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
DOMAINS = {
    "tweets": "tweets_GroundTruth.txt",
    "amazon": "amazonReviewSnippets_GroundTruth.txt",
    "movies": "movieReviewSnippets_GroundTruth.txt",
    "nyt": "nytEditorialSnippets_GroundTruth.txt",
}
CORPUS_FILE = "corpus.jsonl"


SOURCES_WITHOUT_AUTHORS = ("tweets", "movies")
"""Packaged domains whose source names no author: each of their posts is its own author."""
AUTHOR_PREFIX = {"amazon": "review", "nyt": "editorial"}
"""Packaged domains whose ids are ``<document>_<sentence>``: the document (one review, one editorial) is the author."""


@dataclass(frozen=True)
class Example:
    """One labelled post. ``label`` is 1 (positive) / 0 (negative).

    ``author`` is the region's opaque id of the person who wrote it (the unit of privacy);
    None when the data names no author, so the post is its own author (:func:`author_key`).
    """

    id: str
    text: str
    label: int
    domain: str
    rating: float
    author: str | None = None


def author_key(example: Example) -> str:
    """Whom the post belongs to: its author, or the post itself when no author is named."""
    return example.author if example.author is not None else f"post:{example.id}"


def packaged_author(item_id: str, domain: str) -> str | None:
    """The author of an ICWSM-2014 post: the review / editorial its sentence comes from; None for tweets and movies."""
    prefix = AUTHOR_PREFIX.get(domain)
    if prefix is None:
        return None
    document = item_id.split("-", 1)[-1].split("_", 1)[0]
    return f"{domain}-{prefix}-{document}"


def write_jsonl(path: Path, examples: Iterable[Example]) -> int:
    """Write atomically (temp file + rename) so a crash never leaves half a shard."""
    count = 0
    with atomic_open(path) as fh:
        for ex in examples:
            fh.write(json.dumps(asdict(ex), ensure_ascii=False) + "\n")
            count += 1
    return count


def read_jsonl(path: Path) -> list[Example]:
    """The examples of a fedpriv JSONL file; anything else (random bytes, other JSON) is one :class:`DataError` line."""
    try:
        with path.open(encoding="utf-8") as fh:
            return [_example(json.loads(line)) for line in fh if line.strip()]
    except FileNotFoundError:
        raise DataError(f"data file {path} does not exist: run `fedpriv prepare-data` first") from None
    except PermissionError:
        raise DataError(f"data file {path} is not readable by this user") from None
    except UnicodeDecodeError:
        raise DataError(f"data file {path} is not UTF-8 text: expected fedpriv JSONL (one post per line); "
                        "re-run `fedpriv prepare-data`") from None
    except (ValueError, TypeError) as exc:  # json.JSONDecodeError is a ValueError
        detail = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc).splitlines()[0][:120]
        raise DataError(f"data file {path} is not fedpriv JSONL ({detail}): re-run `fedpriv prepare-data`") from None


def _example(row: object) -> Example:
    if not isinstance(row, dict):
        raise TypeError(f"a line holds a JSON {type(row).__name__}, expected an object")
    return Example(**row)


def label_examples(rows: Iterable[tuple[str, str, float, str]], neutral_band: float = 0.0) -> Iterator[Example]:
    """Rating > 0 → positive, < 0 → negative; |rating| < neutral_band (and exactly 0) is ambiguous and dropped.

    The corpus keeps every non-zero rating; each run applies its own ``neutral-band``
    when it partitions, so the band can change without re-downloading.
    """
    for item_id, text, rating, domain in rows:
        if abs(rating) < neutral_band or rating == 0:
            continue
        yield Example(id=item_id, text=text, label=int(rating > 0), domain=domain, rating=rating,
                      author=packaged_author(item_id, domain))


def parse_ground_truth(content: str, domain: str) -> Iterator[tuple[str, str, float, str]]:
    """Rows of ``id<TAB>mean rating<TAB>text`` (CRLF line ends in the original)."""
    for line in content.splitlines():
        parts = line.rstrip("\r").split("\t")
        if len(parts) < 3:
            continue
        try:
            rating = float(parts[1])
        except ValueError:
            continue
        yield f"{domain}-{parts[0]}", "\t".join(parts[2:]).strip(), rating, domain


def download_sdist(cache_dir: Path) -> Path:
    """Fetch the sdist once with pip and verify its checksum; reuse the cached copy afterwards."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / SDIST_NAME
    if not target.exists():
        with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                   "--disable-pip-version-check", "-q", "-d", tmp, "vadersentiment==3.3.2"]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            found = list(Path(tmp).glob("*.tar.gz"))
            if proc.returncode != 0 or not found:
                last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                raise DataError(f"could not download vadersentiment==3.3.2 source distribution with pip: {last}")
            found[0].replace(target)
    digest = hashlib.sha256(target.read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        target.unlink()
        raise DataError(f"{SDIST_NAME} has SHA-256 {digest}, expected {SDIST_SHA256}; deleted it, retry")
    return target


def extract_ground_truth(sdist: Path) -> dict[str, str]:
    """Read the four ground-truth files from the archive inside the sdist, in memory."""
    with tarfile.open(sdist) as outer:
        inner_bytes = outer.extractfile(INNER_ARCHIVE).read()  # type: ignore[union-attr]
    texts: dict[str, str] = {}
    with tarfile.open(fileobj=io.BytesIO(inner_bytes)) as inner:
        for member in inner.getmembers():
            name = Path(member.name).name
            for domain, filename in DOMAINS.items():
                if name == filename:
                    texts[domain] = inner.extractfile(member).read().decode("utf-8", errors="replace")  # type: ignore[union-attr]
    missing = set(DOMAINS) - set(texts)
    if missing:
        raise DataError(f"{sdist.name} lacks ground-truth files for {sorted(missing)}")
    return texts


def fetch_corpus(data_dir: Path, neutral_band: float = 0.0) -> tuple[Path, dict[str, int]]:
    """Download (once), verify and write ``data_dir/corpus.jsonl``; returns its path and per-domain counts."""
    texts = extract_ground_truth(download_sdist(data_dir / "cache"))
    examples: list[Example] = []
    for domain in DOMAINS:
        examples.extend(label_examples(parse_ground_truth(texts[domain], domain), neutral_band))
    path = data_dir / CORPUS_FILE
    write_jsonl(path, examples)
    counts = {d: sum(1 for e in examples if e.domain == d) for d in DOMAINS}
    authors = {d: len({e.author for e in examples if e.domain == d and e.author is not None}) for d in AUTHOR_PREFIX}
    meta = {"source": f"vadersentiment==3.3.2 sdist ({SDIST_NAME})", "sha256": SDIST_SHA256,
            "neutral_band": neutral_band, "counts": counts, "licence": "MIT (C.J. Hutto)",
            "authors": {**authors, **{d: "none named: each post is its own author" for d in SOURCES_WITHOUT_AUTHORS}}}
    (data_dir / "corpus.meta.json").write_text(json.dumps(meta, indent=2))
    return path, counts


def load_corpus(data_dir: Path) -> list[Example]:
    path = data_dir / CORPUS_FILE
    if not path.exists():
        raise DataError(f"no prepared data in {data_dir}: run `fedpriv prepare-data` first")
    if not jsonl_names_authors(path):
        raise DataError(f"{path} was prepared before posts carried their author: re-run `fedpriv prepare-data`")
    return read_jsonl(path)


def jsonl_names_authors(path: Path) -> bool:
    """Whether a JSONL corpus has the ``author`` field (null is allowed: that post is its own author).

    Anything unreadable answers True: :func:`read_jsonl` then says in one line what is wrong with it.
    """
    try:
        with path.open(encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    row = json.loads(line)
                    return not isinstance(row, dict) or "author" in row
    except (OSError, UnicodeDecodeError, ValueError):
        return True
    return True
