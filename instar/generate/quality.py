"""How good the stored data is, in numbers: the quality section of `instar data stats` and of the report card.

    q = quality(store)            # {kind: KindQuality(...)}, computed from stored rows only

Per record kind:
- acceptance: records kept / items tried (records + failures of that kind), and the failures by reason;
- distinct-2: distinct word bigrams / all word bigrams over the records' content (Li et al. 2016's
  distinct-n; ~0.5+ for varied prose, near 0.1 for a model repeating itself);
- near-duplicate rate: share of records whose MinHash signature matches an earlier record's at Jaccard >= 0.8
  (the generator's own filter keeps this at 0 for what it writes; imports and other tools may not);
- length: words per record (min, p10, median, p90, max);
- topics: records per topic and per document file (provenance), so a topic the teacher never wrote about shows.
Simplification: distinct-2 and near duplicates are computed on at most `SAMPLE` records per kind (the first
by id, which is a random order), so stats stay under a second on a large store.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field

from instar.generate import filters

SAMPLE = 2000


@dataclass
class KindQuality:
    kind: str
    records: int
    failures: Counter = field(default_factory=Counter)
    distinct_2: float = 0.0
    near_duplicates: float = 0.0
    words: dict[str, int] = field(default_factory=dict)
    topics: Counter = field(default_factory=Counter)
    documents: Counter = field(default_factory=Counter)

    @property
    def acceptance(self) -> float | None:
        tried = self.records + sum(self.failures.values())
        return self.records / tried if tried else None


def distinct_n(texts: list[str], n: int = 2) -> float:
    grams = [tuple(w[i:i + n]) for w in map(filters.words, texts) for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def near_duplicate_rate(texts: list[str]) -> float:
    index, dups = filters.NearDuplicates(), 0
    for t in texts:
        if index.is_duplicate(t):
            dups += 1
        else:
            index.add(t)
    return dups / len(texts) if texts else 0.0


def percentiles(values: list[int]) -> dict[str, int]:
    """min, p10, median, p90, max (nearest rank); {} for no values."""
    v = sorted(values)
    if not v:
        return {}
    at = {name: v[min(len(v) - 1, int(len(v) * q))] for name, q in (("p10", 0.1), ("median", 0.5), ("p90", 0.9))}
    return {"min": v[0], **at, "max": v[-1]}


def quality(store) -> dict[str, KindQuality]:
    """Quality numbers per record kind, from the records and failures tables."""
    q = store.db.execute
    out: dict[str, KindQuality] = {}
    for kind, n in q("select kind, count(*) from records group by kind order by kind").fetchall():
        texts = [filters.key_text(kind, json.loads(d)) for (d,) in
                 q("select data from records where kind = ? order by id", [kind])]
        sample = texts[:SAMPLE]
        topics = q("select topic, count(*) from records where kind = ? and topic is not null group by 1", [kind])
        files = q("select substr(document, 1, instr(document, '#') - 1), count(*) from records "
                  "where kind = ? and document is not null group by 1", [kind])
        out[kind] = KindQuality(kind, n, distinct_2=distinct_n(sample), near_duplicates=near_duplicate_rate(sample),
                                words=percentiles([len(t.split()) for t in texts]),
                                topics=Counter(dict(topics.fetchall())), documents=Counter(dict(files.fetchall())))
    for kind, reason, n in q("select kind, reason, count(*) from failures where kind is not null "
                             "group by kind, reason").fetchall():
        out.setdefault(kind, KindQuality(kind, 0)).failures[reason] = n
    return out
