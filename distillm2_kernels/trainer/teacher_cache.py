"""The offline teacher cache that `distillm2 score` writes and `distillm2 train --teacher-cache` reads.

A cache is a folder::

    manifest.json             format version, what the cache belongs to, the completed shards
    shard-00000.safetensors   the teacher's sparse distributions of a fixed block of pairs
    ...

For every pair and side ("chosen": the teacher's response row, "rejected": the student's), tokenized exactly as
`train` tokenizes it (`data.tokenize_pairs`: the same tokenizer, chat template and `max_length`), and for every
response token `y_p` at position p ≥ 1 of the row, the teacher's distribution that predicts it (computed at
position p − 1) is stored as K + 1 entries: the teacher's top-K token ids and their temperature-1
log-probabilities, plus the label `y_p` when it is not among them (else the (K+1)-th best token), so the label is
always in the support; and the log of the mass outside those entries, `tail_logprob`.

A shard holds the pairs `[s·P, (s+1)·P)` (P = `pairs_per_shard`) as safetensors tensors:

    ids           int32 [tokens, K+1]   token ids (distinct in each row)
    logprobs      float32 [tokens, K+1] teacher log-probabilities at temperature 1
    tail_logprob  float32 [tokens]      log(1 − Σ exp(logprobs)), the mass of the other tokens (−inf: none)
    labels        int32 [tokens]        the response token each row predicts (checks the alignment)
    rows          int64 [sides, 5]      per pair and side: (pair index, side 0/1, offset, tokens, position of
                                        the first stored label in the tokenized row)

The manifest holds `format_version`, `pairs_sha256` (the pairs file's bytes), `tokenizer_fingerprint`
(`tokenizer_fingerprint`: the vocabulary and special tokens), `top_k`, `vocab_size`, `settings` (what decides
the rows: `max_length`, `chat_template_sha256`, `with_rejected`, `pairs_per_shard`), `num_pairs`, the scoring
`engine`, and `shards` (file, first pair, pairs, tokens), in order; `complete` once every pair is stored.

Writing (`CacheWriter`) is resumable: a shard is written to a temporary file and renamed into place, then the
manifest is replaced the same way (temporary + rename) with the shard listed. A shard is the unit of work, so an
interrupted run loses at most the shard it was writing; on resuming, files the manifest does not list (a shard
renamed just before the kill, temporaries) are removed and the unlisted shards are scored again, with the same
batches, so the resumed cache equals the uninterrupted one.

Reading (`TeacherCache`) memory-maps the shards (`safetensors.safe_open`) and copies out only the rows a
batch needs. `TeacherCache.sparse_teacher(pair_indices, batch)` gives a `SparseTeacher` with ids / logprobs
`[R, T, K+1]` and tail `[R, T]` laid out like the hidden states (unshifted: position j holds the distribution
predicting token j+1); every other position (prompt, padding, the last) holds the one-hot distribution on
token 0 (ids 0..K, log-probs 0, −inf, ..., tail −inf), a valid distribution on a row the loss ignores.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from ..sparse_teacher import SparseTeacher
from .data import IGNORE_INDEX, PairBatch

__all__ = [
    "FORMAT_VERSION", "MANIFEST", "SIDES", "SparseTeacher", "CacheMismatch", "SideScores", "CacheWriter",
    "TeacherCache", "tokenizer_fingerprint", "chat_template_sha256", "label_positions",
]

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SIDES = ("chosen", "rejected")
TENSORS = ("ids", "logprobs", "tail_logprob", "labels", "rows")


class CacheMismatch(ValueError):
    """A teacher cache that does not belong to this run (another pairs file, tokenizer, K or settings)."""


def tokenizer_fingerprint(tokenizer) -> str:
    """SHA-256 of a tokenizer's vocabulary (token → id) and special tokens: equal for tokenizers that give the
    same token ids, whichever folder they were loaded from. (The pad token is left out: `load_tokenizer` sets
    it to EOS when a tokenizer has none, and padding never reaches the loss.)"""
    special = {name: getattr(tokenizer, name, None) for name in ("bos_token", "eos_token", "unk_token")}
    special["additional_special_tokens"] = sorted(getattr(tokenizer, "additional_special_tokens", None) or [])
    text = json.dumps({"vocab": sorted(tokenizer.get_vocab().items()), "special": special}, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def chat_template_sha256(tokenizer) -> str:
    """SHA-256 of the chat template (it decides the prompt tokens, hence where the responses sit)."""
    return hashlib.sha256((tokenizer.chat_template or "").encode("utf-8")).hexdigest()


def label_positions(labels: Sequence[int]) -> tuple[int, list[int]]:
    """`(first position, label tokens)` of a tokenized row: the stored labels are those at positions p ≥ 1
    (position 0 has no predecessor) that are not IGNORE_INDEX, which `tokenize_pairs` makes one contiguous run."""
    positions = [p for p in range(1, len(labels)) if labels[p] != IGNORE_INDEX]
    if not positions:
        return len(labels), []
    first = positions[0]
    if positions[-1] - first + 1 != len(positions):
        raise ValueError("a row's labels are not one contiguous run (not a row of tokenize_pairs)")
    return first, [labels[p] for p in positions]


@dataclass
class SideScores:
    """The sparse teacher of one side of one pair: `tokens` rows of K+1 entries."""

    pair: int
    side: int  # 0 chosen, 1 rejected
    position: int  # position of the first stored label in the tokenized row
    labels: torch.Tensor  # int [tokens]
    ids: torch.Tensor  # int [tokens, K+1]
    logprobs: torch.Tensor  # float32 [tokens, K+1]
    tail_logprob: torch.Tensor  # float32 [tokens]


def _write_atomic(path: Path, write) -> None:
    """`write(temporary path)`, fsync, and rename over `path`."""
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(descriptor)
    try:
        write(Path(temporary))
        with open(temporary, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def _read_manifest(folder: Path) -> Optional[dict]:
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise ValueError(f"{path}: not a teacher-cache manifest ({error})") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: teacher-cache format {manifest.get('format_version')!r}, this version reads "
                         f"{FORMAT_VERSION}; score the pairs again into a new folder")
    return manifest


def _compare(folder: Path, manifest: dict, expected: dict) -> None:
    """CacheMismatch naming every entry of `expected` that the manifest holds otherwise."""
    what = {"pairs_sha256": "the pairs file", "tokenizer_fingerprint": "the tokenizer", "top_k": "K (--top-k)",
            "vocab_size": "the vocabulary size", "num_pairs": "the number of pairs"}
    differences = []
    for key, value in expected.items():
        if key == "settings":
            for name, setting in value.items():
                if manifest["settings"].get(name) != setting:
                    differences.append(f"{name}: cache {manifest['settings'].get(name)!r}, here {setting!r}")
        elif manifest.get(key) != value:
            differences.append(f"{what.get(key, key)}: cache {manifest.get(key)!r}, here {value!r}")
    if differences:
        raise CacheMismatch(f"the teacher cache {folder} belongs to another run ({'; '.join(differences)}): score "
                            "these pairs into a new folder, or use the settings it was made with")


class CacheWriter:
    """Writes a cache shard by shard; `done_shards` are those an earlier (interrupted) run completed."""

    def __init__(self, folder: Union[str, os.PathLike], header: dict):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        manifest = _read_manifest(self.folder)
        if manifest is None:
            manifest = {"format_version": FORMAT_VERSION, **header, "shards": [], "complete": False}
        else:
            # the pairs file may have moved: its bytes (pairs_sha256) identify it
            _compare(self.folder, manifest, {k: v for k, v in header.items() if k not in ("engine", "pairs_file")})
            if manifest.get("engine") != header.get("engine"):
                raise CacheMismatch(f"the teacher cache {self.folder} was scored on {manifest.get('engine')!r}; "
                                    f"resume it with --engine {manifest.get('engine')}, or use a new folder")
        self.manifest = manifest
        listed = {shard["file"] for shard in manifest["shards"]}
        for path in self.folder.iterdir():  # a shard renamed in just before a kill, temporaries
            if path.name != MANIFEST and path.name not in listed and (
                    path.name.startswith(("shard-", ".shard-", f".{MANIFEST}"))):
                path.unlink()
        self._save_manifest()

    @property
    def pairs_per_shard(self) -> int:
        return self.manifest["settings"]["pairs_per_shard"]

    @property
    def num_shards(self) -> int:
        return -(-self.manifest["num_pairs"] // self.pairs_per_shard)

    @property
    def done_shards(self) -> set[int]:
        return {shard["first_pair"] // self.pairs_per_shard for shard in self.manifest["shards"]}

    def shard_pairs(self, index: int) -> range:
        start = index * self.pairs_per_shard
        return range(start, min(start + self.pairs_per_shard, self.manifest["num_pairs"]))

    def write_shard(self, index: int, sides: Sequence[SideScores]) -> int:
        """Store shard `index` (every side of its pairs) and list it in the manifest; returns its tokens."""
        from safetensors.torch import save_file

        expected = {(p, s) for p in self.shard_pairs(index) for s in range(1 + self.manifest["settings"]["with_rejected"])}
        if {(side.pair, side.side) for side in sides} != expected or len(sides) != len(expected):
            raise ValueError(f"shard {index} needs every side of pairs {self.shard_pairs(index)} once")
        width = self.manifest["top_k"] + 1
        rows, offset = [], 0
        for side in sides:
            if side.ids.shape != (len(side.labels), width):
                raise ValueError(f"pair {side.pair}: ids of shape {tuple(side.ids.shape)}, expected "
                                 f"({len(side.labels)}, {width})")
            rows.append([side.pair, side.side, offset, len(side.labels), side.position])
            offset += len(side.labels)
        id_dtype = torch.int32 if self.manifest["vocab_size"] < 2**31 else torch.int64
        tensors = {
            "ids": torch.cat([side.ids for side in sides]).to(id_dtype).reshape(offset, width).contiguous(),
            "logprobs": torch.cat([side.logprobs for side in sides]).float().reshape(offset, width).contiguous(),
            "tail_logprob": torch.cat([side.tail_logprob for side in sides]).float().reshape(offset).contiguous(),
            "labels": torch.cat([side.labels for side in sides]).to(id_dtype).reshape(offset).contiguous(),
            "rows": torch.tensor(rows, dtype=torch.int64).reshape(len(rows), 5),
        }
        name = _shard_name(index)
        _write_atomic(self.folder / name, lambda path: save_file(tensors, str(path), metadata={"format_version": "1"}))
        pairs = self.shard_pairs(index)
        self.manifest["shards"] = sorted(
            [s for s in self.manifest["shards"] if s["file"] != name]
            + [{"file": name, "first_pair": pairs.start, "pairs": len(pairs), "tokens": offset}],
            key=lambda s: s["first_pair"],
        )
        self.manifest["complete"] = len(self.manifest["shards"]) == self.num_shards
        self._save_manifest()
        return offset

    def _save_manifest(self) -> None:
        text = json.dumps(self.manifest, indent=1) + "\n"
        _write_atomic(self.folder / MANIFEST, lambda path: path.write_text(text, encoding="utf-8"))


class TeacherCache:
    """A complete teacher cache, opened for training; `check(...)` refuses one of another run."""

    def __init__(self, folder: Union[str, os.PathLike]):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"teacher cache {self.folder}: no such folder (write it with `distillm2 score`)")
        manifest = _read_manifest(self.folder)
        if manifest is None:
            raise FileNotFoundError(f"teacher cache {self.folder}: no {MANIFEST} (write it with `distillm2 score`)")
        if not manifest.get("complete"):
            done = sum(shard["pairs"] for shard in manifest["shards"])
            raise ValueError(f"teacher cache {self.folder} is incomplete ({done} of {manifest['num_pairs']} pairs "
                             "scored): rerun the same `distillm2 score` command to finish it")
        self.manifest = manifest
        self._handles: dict[str, object] = {}
        self._index: Optional[dict[tuple[int, int], tuple[str, int, int, int]]] = None

    @property
    def top_k(self) -> int:
        return self.manifest["top_k"]

    @property
    def vocab_size(self) -> int:
        return self.manifest["vocab_size"]

    @property
    def tokenizer_fingerprint(self) -> str:
        return self.manifest["tokenizer_fingerprint"]

    def check(self, *, pairs_sha256: str, tokenizer, max_length: int, num_pairs: int, need_rejected: bool) -> None:
        """CacheMismatch unless this cache was scored from the pairs file with these bytes, with a tokenizer of
        this fingerprint and chat template, at this `max_length`, for `num_pairs` pairs (and their rejected
        sides when `need_rejected`)."""
        _compare(self.folder, self.manifest, {
            "pairs_sha256": pairs_sha256, "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
            "num_pairs": num_pairs,
            "settings": {"max_length": max_length, "chat_template_sha256": chat_template_sha256(tokenizer)},
        })
        if need_rejected and not self.manifest["settings"]["with_rejected"]:
            raise CacheMismatch(f"the teacher cache {self.folder} holds the chosen sides only (scored with "
                                "--chosen-only); this loss needs the rejected ones too")

    def _shard(self, name: str):
        from safetensors import safe_open

        if name not in self._handles:
            path = self.folder / name
            if not path.is_file():
                raise FileNotFoundError(f"teacher cache {self.folder}: shard {name} is missing; score again")
            self._handles[name] = safe_open(str(path), framework="pt")  # memory-mapped
        return self._handles[name]

    def _lookup(self, pair: int, side: int) -> tuple[str, int, int, int]:
        if self._index is None:
            self._index = {}
            for shard in self.manifest["shards"]:
                for row in self._shard(shard["file"]).get_tensor("rows").tolist():
                    self._index[(row[0], row[1])] = (shard["file"], row[2], row[3], row[4])
        try:
            return self._index[(pair, side)]
        except KeyError:
            raise CacheMismatch(f"the teacher cache {self.folder} holds no {SIDES[side]} side of pair {pair}") from None

    def side(self, pair: int, side: int) -> SideScores:
        """The stored rows of one pair's side (read from the memory-mapped shard)."""
        name, offset, length, position = self._lookup(pair, side)
        shard = self._shard(name)
        rows = slice(offset, offset + length)
        return SideScores(
            pair, side, position, shard.get_slice("labels")[rows].long(), shard.get_slice("ids")[rows].long(),
            shard.get_slice("logprobs")[rows], shard.get_slice("tail_logprob")[rows],
        )

    def sparse_teacher(self, pair_indices: Sequence[int], batch: PairBatch) -> SparseTeacher:
        """The batch's teacher: ids / logprobs `[R, T, K+1]`, tail `[R, T]` on the CPU, unshifted like the
        hidden states (layout in the module docstring). Rows: the chosen sides of `pair_indices`, then their
        rejected sides when the batch has them. Each row's labels must be the stored ones (CacheMismatch)."""
        rows, length = batch.input_ids.shape
        width = self.top_k + 1
        ids = torch.arange(width, dtype=torch.long).expand(rows, length, width).clone()
        logprobs = torch.full((rows, length, width), float("-inf"))
        logprobs[..., 0] = 0.0
        tail = torch.full((rows, length), float("-inf"))
        sides = [(pair, 0) for pair in pair_indices]
        if batch.has_student_responses:
            sides += [(pair, 1) for pair in pair_indices]
        if len(sides) != rows:
            raise ValueError(f"{len(pair_indices)} pairs for a batch of {rows} rows")
        labels = batch.labels.cpu()
        for r, (pair, side) in enumerate(sides):
            stored = self.side(pair, side)
            first, row_labels = label_positions(labels[r].tolist())
            if first != stored.position or row_labels != stored.labels.tolist():
                raise CacheMismatch(
                    f"the teacher cache {self.folder} does not match the {SIDES[side]} side of pair {pair} as "
                    f"tokenized now (response tokens at {first}..{first + len(row_labels)}, cached at "
                    f"{stored.position}..{stored.position + len(stored.labels)}, equal: "
                    f"{row_labels == stored.labels.tolist()}): score the pairs again"
                )
            span = slice(first - 1, first - 1 + len(row_labels))
            ids[r, span] = stored.ids
            logprobs[r, span] = stored.logprobs
            tail[r, span] = stored.tail_logprob
        return SparseTeacher(ids, logprobs, tail)
