"""Curation's whole-set rules on compact keys: exact duplicates, MinHash near-duplicates and the
choice of samples per prompt, as a map (`part_keys`, one teacher part) and reductions (one hash
bucket of the keys each), so no process ever holds the rows of the whole set.

Pure (numpy and datasketch; no Ray, no I/O): `distill.curate` runs `part_keys` in a task per
teacher part and each reduction in a task per bucket; `apply_global_rules` runs them in-process
on a list of rows, which is how the tests pin the rules' meaning.

A row is addressed by its ordinal `part << 32 | row`, the order in which the teacher parts are
read, and "earlier" always means a smaller ordinal. Per row the map keeps 8-byte hashes (prompt
id, prompt+response pair, and with near-dedup one key per LSH band): about 30 bytes a row plus
8 per band, against kilobytes for a row with its top-k.

The rules, applied in this order to the rows that passed every per-row rule:
- exact duplicate: the same (prompt, response) text as an earlier row;
- near duplicate: shares a MinHash LSH band (word 3-shingles, the bands that datasketch's
  `MinHashLSH` picks for the threshold) with an earlier row that is no exact duplicate. Every
  band is grouped on its own, so a row that is close to an earlier near-duplicate is dropped too
  (datasketch's sequential index would keep it when it shares no band with a kept row);
- not selected: with n samples, one row per prompt is kept (`first_correct`: the lowest sample
  index; `shortest_correct`: the fewest tokens, or characters for text-only rows, the earliest
  on ties), or all (`all_correct`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np

from distill import schema as S
from distill.storage import hash64

NUM_PERM = 64  # MinHash permutations: enough for thresholds of 0.5 and above
_BAND_MULT = np.random.default_rng(7).integers(1, 2**63, NUM_PERM, dtype=np.uint64) | np.uint64(1)


@dataclass
class PartKeys:
    """The compact keys of one teacher part (numpy arrays travel through Ray without a copy)."""

    ordinal: np.ndarray  # int64 [n]: part << 32 | row
    alive: np.ndarray  # bool [n]: passed every per-row rule
    prompt: np.ndarray  # uint64 [n]: hash of the prompt id
    sample: np.ndarray  # int32 [n]
    length: np.ndarray  # int32 [n]: output tokens (characters for text-only rows)
    pair: np.ndarray  # uint64 [n]: hash of the normalised prompt+response text
    bands: np.ndarray  # uint64 [n, b]: one LSH key per band (b = 0 without near-dedup)


def pair_text(row: dict[str, Any]) -> str:
    """Prompt and response, lower-cased with white space folded: duplicates are judged on the pair,
    not the response alone (in classification many prompts legitimately share "positive")."""
    prompt = " ".join(m["content"] for m in row[S.MESSAGES])
    return " ".join(f"{prompt} ||| {row[S.TEXT]}".lower().split())


def lsh_bands(threshold: float) -> tuple[int, int]:
    """(bands, rows per band) that datasketch's MinHashLSH chooses for this Jaccard threshold."""
    from datasketch import MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=NUM_PERM)
    return lsh.b, lsh.r


def band_keys(texts: list[str], threshold: float) -> np.ndarray:
    """[n, b] uint64: for each text, one key per LSH band of its MinHash over word 3-shingles.
    Two texts share a band's key when their signatures agree on all of that band's rows."""
    from datasketch import MinHash

    b, r = lsh_bands(threshold)
    sigs = np.zeros((len(texts), b * r), np.uint64)
    for i, text in enumerate(texts):
        words = text.split()
        mh = MinHash(num_perm=NUM_PERM, seed=1)
        mh.update_batch([" ".join(words[j:j + 3]).encode() for j in range(max(1, len(words) - 2))])
        sigs[i] = mh.hashvalues[: b * r]
    mixed = sigs.reshape(len(texts), b, r) * _BAND_MULT[: b * r].reshape(b, r)  # wraps mod 2^64
    return mixed.sum(axis=2, dtype=np.uint64) + np.arange(b, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)


def part_keys(rows: list[dict[str, Any]], alive: Iterable[bool], part: int, near_threshold: float | None) -> PartKeys:
    """The map: compact keys of one part's rows (in their order). `alive` marks the rows that
    passed the per-row rules; only theirs take part in dedup and selection."""
    n = len(rows)
    alive = np.fromiter(alive, bool, count=n)
    pairs = [pair_text(r) for r in rows]
    live = [p for p, a in zip(pairs, alive) if a]
    bands = np.zeros((n, 0), np.uint64)
    if near_threshold is not None:
        bands = np.zeros((n, lsh_bands(near_threshold)[0]), np.uint64)
        if live:
            bands[alive] = band_keys(live, near_threshold)
    return PartKeys(
        ordinal=(np.int64(part) << np.int64(32)) + np.arange(n, dtype=np.int64),
        alive=alive,
        prompt=hash64((r[S.ID] for r in rows), n),
        sample=np.fromiter((r[S.SAMPLE] for r in rows), np.int32, count=n),
        length=np.fromiter((r[S.OUTPUT_TOKENS] if r.get(S.OUTPUT_TOKENS) is not None else len(r[S.TEXT] or "")
                            for r in rows), np.int32, count=n),
        pair=hash64(pairs, n),
        bands=bands,
    )


def _in_bucket(keys: np.ndarray, bucket: int, buckets: int) -> np.ndarray:
    return keys % np.uint64(buckets) == np.uint64(bucket)


def _later_in_group(group: np.ndarray, ordinal: np.ndarray) -> np.ndarray:
    """The ordinals that are not the earliest of their group, sorted and unique."""
    order = np.lexsort((ordinal, group))
    g = group[order]
    later = np.zeros(len(g), bool)
    later[1:] = g[1:] == g[:-1]
    return np.unique(ordinal[order][later])


def _candidates(parts: list[PartKeys], excluded: np.ndarray) -> list[np.ndarray]:
    """Per part, the rows alive after the per-row rules and not in `excluded` (sorted ordinals)."""
    return [p.alive & ~np.isin(p.ordinal, excluded, assume_unique=True) for p in parts]


def exact_drops(parts: list[PartKeys], bucket: int = 0, buckets: int = 1) -> np.ndarray:
    """Reduction 1: ordinals of exact duplicates whose pair hash falls in this bucket."""
    ordinal = np.concatenate([np.zeros(0, np.int64)] + [p.ordinal[p.alive] for p in parts])
    pair = np.concatenate([np.zeros(0, np.uint64)] + [p.pair[p.alive] for p in parts])
    mine = _in_bucket(pair, bucket, buckets)
    return _later_in_group(pair[mine], ordinal[mine])


def near_drops(parts: list[PartKeys], excluded: np.ndarray, bucket: int = 0, buckets: int = 1) -> np.ndarray:
    """Reduction 2: ordinals of near duplicates among the rows not `excluded`, from the band keys
    that fall in this bucket (a row dropped in any bucket is dropped)."""
    keep = _candidates(parts, excluded)
    keys = np.concatenate([np.zeros(0, np.uint64)] + [p.bands[k].ravel() for p, k in zip(parts, keep)])
    ordinal = np.concatenate([np.zeros(0, np.int64)] + [np.repeat(p.ordinal[k], p.bands.shape[1])
                                                        for p, k in zip(parts, keep)])
    mine = _in_bucket(keys, bucket, buckets)
    return _later_in_group(keys[mine], ordinal[mine])


def selection_drops(parts: list[PartKeys], excluded: np.ndarray, rule: str, bucket: int = 0,
                    buckets: int = 1) -> tuple[np.ndarray, dict[str, int]]:
    """Reduction 3, over the prompts whose id hash falls in this bucket: the ordinals of rows not
    selected, and the bucket's prompt counts ({prompts, kept_prompts})."""
    prompts = np.concatenate([np.zeros(0, np.uint64)] + [p.prompt for p in parts])
    keep = _candidates(parts, excluded)
    prompt = np.concatenate([np.zeros(0, np.uint64)] + [p.prompt[k] for p, k in zip(parts, keep)])
    ordinal = np.concatenate([np.zeros(0, np.int64)] + [p.ordinal[k] for p, k in zip(parts, keep)])
    second = np.concatenate([np.zeros(0, np.int32)] + [(p.length if rule == "shortest_correct" else p.sample)[k]
                                                       for p, k in zip(parts, keep)])
    mine = _in_bucket(prompt, bucket, buckets)
    prompt, ordinal, second = prompt[mine], ordinal[mine], second[mine]
    counts = {"prompts": len(np.unique(prompts[_in_bucket(prompts, bucket, buckets)])),
              "kept_prompts": len(np.unique(prompt))}
    if rule in ("all_correct", "majority"):  # majority votes were taken per part, before dedup
        return np.zeros(0, np.int64), counts
    order = np.lexsort((ordinal, second, prompt))
    p = prompt[order]
    later = np.zeros(len(p), bool)
    later[1:] = p[1:] == p[:-1]
    return np.sort(ordinal[order][later]), counts


def global_drops(parts: list[PartKeys], dedup_exact: bool, near_threshold: float | None, select: str) -> dict[str, Any]:
    """The three reductions in order, in-process over one bucket (what the stage runs as tasks)."""
    exact = exact_drops(parts) if dedup_exact else np.zeros(0, np.int64)
    near = near_drops(parts, exact) if near_threshold is not None else np.zeros(0, np.int64)
    chosen, counts = selection_drops(parts, np.union1d(exact, near), select)
    return {"duplicate": exact, "near_duplicate": near, "not_selected": chosen, **counts}


def apply_global_rules(rows: list[dict[str, Any]], cfg) -> list[str | None]:
    """Reasons after dedup and per-prompt selection, for rows that passed the per-row rules
    (`cfg`: a CurationConfig); None = kept."""
    keys = part_keys(rows, [True] * len(rows), 0, cfg.near_threshold if cfg.dedup_near else None)
    drops = global_drops([keys], cfg.dedup_exact, cfg.near_threshold if cfg.dedup_near else None, cfg.select)
    reasons: list[str | None] = [None] * len(rows)
    for reason in ("duplicate", "near_duplicate", "not_selected"):
        for ordinal in drops[reason]:
            reasons[int(ordinal) & 0xFFFFFFFF] = reason
    return reasons
