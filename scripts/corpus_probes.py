"""Build 4-way multiple-choice probes for the HER-Stream corpus (used by build_corpus.py).

Each builder gets the domain's documents with their split ("seen" for train
documents, "unseen" for test documents) and returns probe dicts:
{"id", "domain", "kind", "split", "prompt", "choices" (4), "answer"}. The
model scores ``prompt + " " + choice``; choices never start with a space.
Distractors are drawn near the answer's length so that "always pick the
longest choice" stays near chance, and names from the prompt are masked in the
choices so that "pick the choice sharing most words with the prompt" does too.
"""

from __future__ import annotations

import random
import re
from collections import Counter, defaultdict
from pathlib import Path

from corpus_sources import Doc, module_docstrings

CAP = 200  # items per (kind, split): enough for +-3.5 pt standard error, cheap to score
CONT_CAP = 150


def words(text: str) -> list[str]:
    """Lower-cased word tokens (the shingle and overlap unit)."""
    return re.findall(r"\w+", text.lower())


def shorten(text: str, limit: int = 220) -> str:
    """Cut text at a word boundary so that choices stay short to score."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0] + " ..."


def mask(text: str, name: str) -> str:
    """Replace each word of ``name`` (case-insensitive) in ``text`` by ``___``."""
    for w in sorted(set(words(name)), key=len, reverse=True):
        if len(w) > 2:
            text = re.sub(rf"\b{re.escape(w)}\w*", "___", text, flags=re.I)
    return text


def make_item(rng: random.Random, prompt: str, answer: str, pool: list[str],
              hard: bool = False) -> dict | None:  # fmt: skip
    """Pick 3 distractors close to the answer's length from ``pool``; shuffle the 4 choices.

    ``hard`` picks, among the 60 nearest in length, the three sharing most words with
    the prompt, so that word overlap with the prompt stops pointing at the answer.
    """
    cands = sorted({c for c in pool if c != answer and c.strip()})
    if len(cands) < 3:
        return None
    rng.shuffle(cands)
    cands.sort(key=lambda c: abs(len(c) - len(answer)))
    if hard:
        pw = set(words(prompt))
        near = cands[:60]
        near.sort(key=lambda c: len(pw & set(words(c))), reverse=True)  # stable: random ties
        distractors = near[:3]
    else:
        distractors = rng.sample(cands[: max(6, len(cands) // 20)][:12], 3)
    choices = [answer, *distractors]
    rng.shuffle(choices)
    return {"prompt": prompt, "choices": choices, "answer": choices.index(answer)}


def finish(domain: str, kind: str, items: list[tuple[str, dict | None]], cap: int) -> list[dict]:
    """Keep up to ``cap`` well-formed items per split and give them stable ids."""
    out, count = [], Counter()
    for split, item in items:
        if item is None or count[split] >= cap or len(set(item["choices"])) != 4:
            continue
        count[split] += 1
        out.append({"id": f"{domain}/{kind}/{split}/{count[split]:04d}", "domain": domain,
                    "kind": kind, "split": split, **item})  # fmt: skip
    return out


# ----------------------------------------------------------------------------- per-domain kinds


def continuation(domain: str, docs: list[tuple[str, Doc]], seed: int) -> list[dict]:
    """A line's first half -> its true second half vs three second halves from the same domain."""
    rng = random.Random(seed)
    units: dict[str, list[str]] = defaultdict(list)
    for split, doc in docs:
        for line in doc.text.split("\n"):
            for sent in re.split(r"(?<=[.!?;])\s+", line.strip()) if len(line) > 160 else [line]:
                if 50 <= len(sent) <= 160 and len(sent.split()) >= 8:
                    units[split].append(sent.strip())
    items = []
    for split in ("seen", "unseen"):
        cut = [u.split() for u in units[split]]
        halves = [(" ".join(w[: len(w) // 2]), " ".join(w[len(w) // 2 :])) for w in cut]
        pool = [h[1] for h in halves]
        rng.shuffle(halves)
        for first, second in halves[: CONT_CAP * 2]:
            items.append((split, make_item(rng, first, second, pool, hard=True)))
    return finish(domain, "continuation", items, CONT_CAP)


def sotu_president(docs: list[tuple[str, Doc]], seed: int) -> list[dict]:
    """A paragraph of a speech -> the president who gave it."""
    rng = random.Random(seed)
    names = sorted({d.meta["president"] for _, d in docs})
    items = []
    for split, doc in docs:
        paras = [p for p in doc.text.split("\n\n") if 200 <= len(p) <= 600]
        for p in rng.sample(paras, min(len(paras), 3 if split == "seen" else 40)):
            prompt = f'From a State of the Union address:\n"{p}"\nThe president who said this was'
            items.append((split, make_item(rng, prompt, doc.meta["president"], names)))
    rng.shuffle(items)
    return finish("sotu", "president", items, CAP)


def pycode_docstring(docs: list[tuple[str, Doc]], seed: int) -> list[dict]:
    """``module.name`` -> its first docstring paragraph (name masked in the choices)."""
    rng = random.Random(seed)
    # mask every part of the dotted name: module words give the answer away too
    entries = [(s, n, shorten(mask(d, n))) for s, doc in docs
               for n, d in module_docstrings(doc) if len(d) >= 30]  # fmt: skip
    pool = [e[2] for e in entries]
    rng.shuffle(entries)
    items = [
        (s, make_item(rng, f"Python: the docstring of {n} begins:", d, pool)) for s, n, d in entries
    ]
    return finish("pycode", "docstring", items, CAP)


def austen_character(docs: list[tuple[str, Doc]], seed: int) -> list[dict]:
    """A character named (>= 8 times) in one novel only -> that novel."""
    rng = random.Random(seed)
    books = sorted({d.meta["book"] for _, d in docs})
    where: dict[str, Counter] = defaultdict(Counter)
    in_train: set[str] = set()
    pat = r"\b(?:Mr|Mrs|Miss|Lady|Sir|Colonel|Captain|Dr|Admiral)\.? [A-Z][a-z]+|\b[A-Z][a-z]{3,}\b"
    for split, doc in docs:
        for name in re.findall(pat, doc.text):
            where[name][doc.meta["book"]] += 1
            if split == "seen":
                in_train.add(name)
    # capitalised words that also occur in lower case ("Though", "Chapter") are not names
    common = {w for _, d in docs for w in re.findall(r"\b[a-z]+\b", d.text)} | {"chapter"}
    items = []
    for name in sorted(where):
        (book, n), *rest = where[name].most_common()
        if rest or n < 8 or name.lower() in common:
            continue
        prompt = f"In the novels of Jane Austen, the character {name} appears in"
        split = "seen" if name in in_train else "unseen"
        items.append((split, make_item(rng, prompt, book, books)))
    rng.shuffle(items)
    return finish("austen", "character", items, CAP)


def lookup(
    domain: str, kind: str, rows: list[tuple[str, str, str]], template: str, seed: int
) -> list[dict]:
    """Generic term -> definition item: rows are (split, term, definition); term masked in choices."""
    rng = random.Random(seed)
    rows = [(s, t, shorten(mask(d, t))) for s, t, d in rows if len(d) >= 15]
    pool = [r[2] for r in rows]
    rng.shuffle(rows)
    items = [(s, make_item(rng, template.format(term=t), d, pool)) for s, t, d in rows]
    return finish(domain, kind, items, CAP)


def wordnet_definition(docs: list[tuple[str, Doc]], seed: int) -> list[dict]:
    """Lemma -> its gloss; distractors from the same lexicographer file."""
    rng = random.Random(seed)
    by_lex: dict[str, list[str]] = defaultdict(list)
    for _, d in docs:
        by_lex[d.meta["lexfile"]].append(shorten(d.meta["gloss"]))
    picks = [(s, d) for s, d in docs if len(d.meta["gloss"]) >= 20]
    rng.shuffle(picks)
    items = []
    for split, d in picks[:20000]:
        lemma, gloss = d.meta["lemma"], shorten(d.meta["gloss"])
        item = make_item(rng, f'In WordNet, "{lemma}" means:', gloss, by_lex[d.meta["lexfile"]])
        if item and not any(w in words(" ".join(item["choices"])) for w in words(lemma)):
            items.append((split, item))
    return finish("wordnet", "definition", items, CAP)


def pgdocs_items(docs: list[tuple[str, Doc]], seed: int) -> list[dict]:
    """SQL command -> purpose (command masked); error code -> condition name."""
    rows = [(s, d.meta["command"], d.meta["purpose"]) for s, d in docs if "command" in d.meta]
    out = lookup(
        "pgdocs", "sql-purpose", rows, "In PostgreSQL, the SQL command {term} is used to", seed
    )
    rng = random.Random(seed + 1)
    codes = [(s, c, n) for s, d in docs for c, n in d.meta.get("errcodes", [])]
    names = [n for _, _, n in codes]
    items = []
    rng.shuffle(codes)
    for split, code, name in codes:
        same_class = [n for _, c, n in codes if c[:2] == code[:2]]
        pool = same_class if len(set(same_class)) >= 4 else names
        items.append((split, make_item(rng, f"PostgreSQL error code {code} is named", name, pool)))
    return out + finish("pgdocs", "errcode", items, CAP * 2)


def kjv_book(docs: list[tuple[str, Doc]], seed: int) -> list[dict]:
    """A verse -> its book."""
    rng = random.Random(seed)
    books = sorted({d.meta["chapter"].rsplit(" ", 1)[0] for _, d in docs})
    items = []
    for split, doc in docs:
        verses = [v.split(" ", 1)[1] for v in doc.text.split("\n")[1:] if len(v) > 60]
        book = doc.meta["chapter"].rsplit(" ", 1)[0]
        for v in rng.sample(verses, min(len(verses), 1 if split == "seen" else 6)):
            items.append(
                (split, make_item(rng, f'The verse "{v}" is from the book of', book, books))
            )
    rng.shuffle(items)
    return finish("kjv", "book", items, CAP)


def shakespeare_play(docs: list[tuple[str, Doc]], seed: int) -> list[dict]:
    """A speaker (tag used in one play only) and the opening of a speech -> the play."""
    rng = random.Random(seed)
    plays = sorted({d.meta["play"] for _, d in docs if d.meta["is_play"]})
    speeches = []
    for split, doc in docs:
        for m in re.finditer(r"\n\n([A-Z][A-Za-z]+(?: [A-Z][A-Za-z]+)?\.)\n([^\n]{30,})", doc.text):
            speeches.append((split, m.group(1), m.group(2), doc.meta["play"]))
    tag_plays: dict[str, set] = defaultdict(set)
    for _, tag, _, play in speeches:
        tag_plays[tag].add(play)
    rng.shuffle(speeches)
    items = []
    for split, tag, line, play in speeches:
        named = set(words(tag)) & set(words(play))  # "Timon." -> Timon Of Athens: a giveaway
        if len(tag_plays[tag]) == 1 and play in plays and not named:
            prompt = f"{tag}\n{line}\n\nThis speech is from Shakespeare's play"
            items.append((split, make_item(rng, prompt, play, plays)))
    return finish("shakespeare", "play", items, CAP)


# ----------------------------------------------------------------------------- general sanity quiz

QUIZ = {  # file: (question field, answer field, template)
    "africa": (0, 1, "The capital of {q} is"), "america": (0, 1, "The capital of {q} is"),
    "asia": (0, 1, "The capital of {q} is"), "europe": (0, 1, "The capital of {q} is"),
    "province": (0, 1, "The capital of the Canadian province {q} is"),
    "state": (0, 1, "The capital of the US state {q} is"),
    "elements": (0, 3, "The chemical element with the symbol {q} is"),
    "pres": (0, 3, "As President of the United States, {q} was succeeded by"),
    "sexes": (0, 1, "The female counterpart of a {q} is a"),
    "babies": (1, 0, "The young of a {q} is called a"),
    "collectives": (0, 1, "A group of {q} is called a"),
    "latin": (0, 1, "The Latin word '{q}' means"), "greek": (0, 1, "The Greek word '{q}' means"),
    "posneg": (0, 1, "The opposite of '{q}' is"), "murders": (0, 1, "{q} was murdered by"),
    "flowers": (0, 1, "In the language of flowers, {q} means"),
}  # fmt: skip


def quiz_canonical(field: str) -> str:
    """bsdgames quiz syntax -> one canonical answer: {opt} kept, [a|b] and a|b -> a."""
    prev = None
    while prev != field:  # innermost groups first, until nothing changes
        prev = field
        field = re.sub(r"\[([^\[\]{}|]*)(?:\|[^\[\]{}]*)?\]", r"\1", field)
        field = re.sub(r"\{([^{}\[\]|]*)(?:\|[^{}\[\]]*)?\}", r"\1", field)
    field = re.sub(r"[\[\]{}]", "", field)  # unbalanced leftovers
    return " ".join(field.split("|")[0].split())


def general_quiz(quiz_dir: Path, seed: int) -> list[dict]:
    """General-knowledge sanity items from Debian bsdgames quiz files."""
    rng = random.Random(seed)
    out = []
    for name, (qi, ai, template) in QUIZ.items():
        text = (quiz_dir / name).read_text(encoding="latin-1").replace("\\\n", "")
        rows = [ln.split(":") for ln in text.split("\n") if ln.strip() and not ln.startswith("#")]
        rows = [
            (quiz_canonical(r[qi]), quiz_canonical(r[ai])) for r in rows if len(r) > max(qi, ai)
        ]
        rows = [(q, a) for q, a in rows if q and a and a.lower() != "gok"]
        rows = [(q, a) for q, a in rows if not set(words(q)) & set(words(a))]  # "Mexico City"
        pool = [a for _, a in rows]
        items = [("general", make_item(rng, template.format(q=q), a, pool)) for q, a in rows]
        out += finish("general", name, items, 60)
    return out


def shortcut_baselines(items: list[dict]) -> dict[str, dict[str, float]]:
    """Accuracy of 'longest choice' and 'most word overlap with the prompt' per kind/split."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for it in items:
        groups[f"{it['kind']}/{it['split']}"].append(it)
    out = {}
    for key, group in sorted(groups.items()):
        longest = overlap = 0
        for it in group:
            lens = [len(c) for c in it["choices"]]
            longest += lens.index(max(lens)) == it["answer"]
            pw = set(words(it["prompt"]))
            ov = [len(pw & set(words(c))) for c in it["choices"]]
            overlap += ov.index(max(ov)) == it["answer"]
        n = len(group)
        out[key] = {"n": n, "longest": round(longest / n, 4), "overlap": round(overlap / n, 4)}
    return out
