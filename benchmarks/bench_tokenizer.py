"""Batch-encode the WMT22 English and German lines with t5kit and transformers in the same run.

    python benchmarks/bench_tokenizer.py [--rounds 5]

Prints the median time of each and the ratio (transformers time / t5kit time; > 1 means t5kit is faster).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _time(fn, rounds: int) -> float:
    fn()  # warm up
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    import transformers

    import t5kit

    transformers.logging.set_verbosity_error()
    wmt = SHARED / "eval" / "wmt22"
    lines = [l for f in ("generaltest2022.en-de.src.en", "generaltest2022.en-de.ref.A.de")
             for l in (wmt / f).read_text(encoding="utf-8").split("\n")[:2037]]
    source = SHARED / "flan-t5-small-tokenizer"
    ours = t5kit.AutoTokenizer.from_pretrained(source)
    ref = transformers.AutoTokenizer.from_pretrained(source)
    assert ours(lines)["input_ids"] == ref(lines).input_ids, "the tokenizers disagree"
    for name, kwargs in (("lists", {}), ("padded pt tensors", dict(padding=True, return_tensors="pt"))):
        t_ours = _time(lambda: ours(lines, **kwargs), args.rounds)
        t_ref = _time(lambda: ref(lines, **kwargs), args.rounds)
        print(f"{len(lines)} lines, {name:18s}: t5kit {t_ours * 1000:7.1f} ms   transformers {t_ref * 1000:7.1f} ms   "
              f"ratio {t_ref / t_ours:.2f}x")


if __name__ == "__main__":
    main()
