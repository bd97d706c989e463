"""Target passes on disk: what draft training reads, computed once per model and text.

Running the target over the calibration text (``collect.target_pass``) is most of what a
calibration costs. The store keeps what draft training reads of each pass: the tokens, the
final feature, one intermediate layer's feature per position (what the draft is fed after an
exit; the layer is drawn from the sequence's own seed) and the target's next token. It
writes them in shards of ``SHARD`` sequences, each to a temporary name renamed when
complete. So a calibration stopped at any point resumes at the first missing shard, and
every calibration of the same model and text (other epochs, learning rates, vocabularies,
sizes) reads the shards instead of running the target again.

Features are kept as fp16, which halves the disk (4.5 KB a token for SmolLM2); training
reads them back as fp32. Files are safetensors and JSON, read lazily through a memory map,
so a store of many thousand sequences never has to fit in memory.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from specee_compile import resources
from specee_compile.calibrate.collect import target_pass
from specee_compile.calibrate.train import write_atomic

STORE_VERSION = 1
SHARD = 32
INFO = "store.json"


@dataclass
class DraftExample:
    """What draft training needs of one target pass (fp32), without the [L, S, d] stack of every layer."""

    ids: torch.Tensor  # [S]
    final: torch.Tensor  # [S, d]: the last layer's normed feature
    exit: torch.Tensor  # [S, d]: z[l_t, t], with l_t drawn uniformly from [exit_lo, L - 1)
    next_token: torch.Tensor  # [S]: the target's greedy next token
    layers: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [S, d], the store's extra layers


def exit_layers(index: int, length: int, exit_lo: int, num_layers: int, seed: int) -> torch.Tensor:
    """The intermediate layer stored for each position of sequence ``index``: a function of
    the sequence's index and the seed only, so a resumed store equals an uninterrupted one."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + index)
    return torch.randint(exit_lo, max(exit_lo + 1, num_layers - 1), (length,), generator=gen)


def example(p, index: int, exit_lo: int, seed: int, layers: tuple[int, ...] = ()) -> DraftExample:
    """The draft example of one target pass (``collect.TargetPass``), with the features of ``layers``."""
    L, S, _ = p.z.shape
    chosen = exit_layers(index, S, exit_lo, L, seed).clamp(max=L - 1)
    return DraftExample(p.ids, p.z[-1].clone(), p.z[chosen, torch.arange(S)].clone(), p.next_token,
                        {i: p.z[i].clone() for i in layers})


class FeatureStore:
    """The draft examples of one model over one list of token sequences, sequence i in shard i // SHARD."""

    def __init__(self, root: Path, layers: tuple[int, ...] = ()):
        self.root = Path(root)
        self.layers = tuple(layers)  # layers whose features are kept besides the final and exit ones
        self._open: dict[int, object] = {}

    @classmethod
    def locate(cls, model_key: str, source: object, exit_lo: int, seed: int,
               layers: tuple[int, ...] = ()) -> "FeatureStore":
        """The store of a model (a hash of its weights) over a text source (anything JSON that
        names it: the file's hash, the truncation). A shard is used only if its tokens are
        the sequences asked for, so one store serves every size of calibration."""
        blob = json.dumps([STORE_VERSION, source, exit_lo, seed, list(layers)])
        return cls(resources.cache_dir() / "features" / f"{model_key}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}",
                   layers)

    def shard(self, i: int) -> Path:
        return self.root / f"shard-{i:05d}.safetensors"

    def missing(self, sequences: list[list[int]]) -> int:
        """How many of ``sequences`` have no pass on disk yet."""
        return sum(min(SHARD, len(sequences) - i * SHARD) for i in range(-(-len(sequences) // SHARD))
                   if not self._has(i, sequences))

    def fill(self, target, sequences: list[list[int]], exit_lo: int, seed: int, progress: bool = True,
             desc: str = "target passes (draft)") -> None:
        """Run the target over every sequence whose shard is missing, and write those shards.

        A shard holds the sequences ``[i * SHARD, (i + 1) * SHARD)`` of ``sequences``; a last,
        shorter shard is written as it is (the store of more sequences writes it again).
        """
        self.root.mkdir(parents=True, exist_ok=True)
        info = self.root / INFO
        if not info.is_file():
            write_atomic(info, lambda tmp: Path(tmp).write_text(json.dumps(
                {"version": STORE_VERSION, "shard": SHARD, "exit_lo": exit_lo, "seed": seed}) + "\n"))
        shards = [i for i in range(-(-len(sequences) // SHARD)) if not self._has(i, sequences)]
        todo = sum(min(SHARD, len(sequences) - i * SHARD) for i in shards)
        bar = tqdm(total=len(sequences), initial=len(sequences) - todo, desc=desc, unit="seq",
                   disable=not progress)
        for i in shards:
            rows = []
            for k in range(i * SHARD, min((i + 1) * SHARD, len(sequences))):
                rows.append(example(target_pass(target, sequences[k]), k, exit_lo, seed, self.layers))
                bar.update()
            self._write(i, rows)
        bar.close()

    def read(self, count: int) -> "StoredExamples":
        """The first ``count`` examples (all must be on disk), read lazily."""
        return StoredExamples(self, count)

    def _has(self, i: int, sequences: list[list[int]]) -> bool:
        """Shard i is on disk and holds passes over sequences[i * SHARD:] (a longer shard,
        written for a larger calibration, serves a smaller one)."""
        if not self.shard(i).is_file():
            return False
        wanted = sequences[i * SHARD:(i + 1) * SHARD]
        try:
            f, starts = self._handle(i)
            if len(starts) - 1 < len(wanted):
                return False
            ids = f.get_slice("ids")[: int(starts[len(wanted)])]
        except (OSError, ValueError, RuntimeError, SafetensorError):  # a damaged shard is computed again
            return False
        return ids.tolist() == [t for seq in wanted for t in seq]

    def _write(self, i: int, rows: list[DraftExample]) -> None:
        tensors = {
            "lengths": torch.tensor([r.ids.numel() for r in rows], dtype=torch.int64),
            "ids": torch.cat([r.ids for r in rows]).to(torch.int64),
            "final": torch.cat([r.final for r in rows]).to(torch.float16),
            "exit": torch.cat([r.exit for r in rows]).to(torch.float16),
            "next_token": torch.cat([r.next_token for r in rows]).to(torch.int64),
            **{f"z.{i}": torch.cat([r.layers[i] for r in rows]).to(torch.float16) for i in self.layers},
        }
        write_atomic(self.shard(i), lambda tmp: save_file(tensors, tmp))
        self._open.pop(i, None)

    def _handle(self, i: int):
        if i not in self._open:
            f = safe_open(self.shard(i), "pt")
            lengths = f.get_tensor("lengths")
            starts = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
            self._open[i] = (f, starts)
        return self._open[i]

    def get(self, k: int) -> DraftExample:
        f, starts = self._handle(k // SHARD)
        j = k % SHARD
        a, b = int(starts[j]), int(starts[j + 1])
        return DraftExample(f.get_slice("ids")[a:b], f.get_slice("final")[a:b].float(),
                            f.get_slice("exit")[a:b].float(), f.get_slice("next_token")[a:b],
                            {i: f.get_slice(f"z.{i}")[a:b].float() for i in self.layers})


class StoredExamples:
    """A list-like view of a store's first ``count`` examples."""

    def __init__(self, store: FeatureStore, count: int):
        self.store, self.count = store, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, k: int) -> DraftExample:
        if not 0 <= k < self.count:
            raise IndexError(k)
        return self.store.get(k)

    def __iter__(self):
        return (self.store.get(k) for k in range(self.count))

    def next_tokens(self) -> torch.Tensor:
        """Every example's next tokens, concatenated (the features are not read)."""
        out = []
        for i in range(-(-self.count // SHARD)):
            f, starts = self.store._handle(i)
            out.append(f.get_slice("next_token")[: int(starts[min(SHARD, self.count - i * SHARD)])])
        return torch.cat(out)
