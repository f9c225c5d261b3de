"""RULER's synthetic tasks (arXiv 2404.06654): sample generation, batched generation, scoring.

Task definitions follow RULER's scripts/synthetic.yaml, its task templates and answer prefixes
(scripts/data/synthetic/constants.py) and its generators (niah, variable_tracking,
common_words_extraction, freq_words_extraction). A sample is sized as RULER sizes it: prompt
tokens (the model's chat template and the answer prefix included) + the task's new tokens must fit
the target length; the haystack size is the largest that does, found by search. The answer prefix
opens the assistant turn, after the chat template's generation prompt.

qa_1/qa_2 are left out: no registry package carries SQuAD v2 or HotpotQA (they are hub downloads).
"""

from __future__ import annotations

import random
import string
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

from tqdm.auto import tqdm

from longserve.eval import data
from longserve.eval.scoring import METRICS

NIAH_TEMPLATE = (
    "Some special magic {type_needle_v} are hidden within the following text. Make sure to"
    " memorize it. I will quiz you about the {type_needle_v} afterwards.\n{context}\n"
    "What are all the special magic {type_needle_v} for {query} mentioned in the provided text?"
)
NIAH_PREFIX = " The special magic {type_needle_v} for {query} mentioned in the provided text are"
NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
VT_TEMPLATE = (
    "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
    "{context}\nQuestion: Find all variables that are assigned the value {query} in the text above."
)
# "assgined" is RULER's own spelling; kept so that prompts match its definition
VT_PREFIX = (
    " Answer: According to the chain(s) of variable assignment in the text above, {num_v}"
    " variables are assgined the value {query}, they are: "
)
CWE_TEMPLATE = (
    "Below is a numbered list of words. In these words, some appear more often than others."
    " Memorize the ones that appear most often.\n{context}\n"
    "Question: What are the 10 most common words in the above list?"
)
CWE_PREFIX = " Answer: The top 10 words that appear most often in the list are:"
FWE_TEMPLATE = (
    "Read the following coded text and track the frequency of each coded word. Find the three"
    " most frequently appeared coded words. {context}\nQuestion: Do not provide any explanation."
    " Please ignore the dots '....'. What are the three most frequently appeared words in the"
    " above coded text?"
)
FWE_PREFIX = (
    " Answer: According to the coded text above, the three most frequently appeared words are:"
)

# RULER draws essay needle depths from 40 evenly spaced percentages
DEPTHS = [round(100 * i / 39) for i in range(40)]


@dataclass(frozen=True)
class Task:
    """One RULER task: its generator kind, arguments, new-token budget and metric."""

    name: str
    kind: str
    max_new_tokens: int
    args: dict = field(default_factory=dict)
    metric: str = "string_match_all"


def singular(text: str) -> str:
    """RULER's rewording of the NIAH template when one value is asked for."""
    for old, new in (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer")):
        text = text.replace(old, new)
    return text


def _niah(name: str, haystack: str, k: str, v: str, nk: int = 1, nv: int = 1, nq: int = 1) -> Task:
    args = dict(haystack=haystack, type_k=k, type_v=v, num_k=nk, num_v=nv, num_q=nq)
    return Task(name, "niah", 128, args)


TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        _niah("niah_single_1", "noise", "words", "numbers"),
        _niah("niah_single_2", "essay", "words", "numbers"),
        _niah("niah_single_3", "essay", "words", "uuids"),
        _niah("niah_multikey_1", "essay", "words", "numbers", nk=4),
        _niah("niah_multikey_2", "needle", "words", "numbers"),
        _niah("niah_multikey_3", "needle", "uuids", "uuids"),
        _niah("niah_multivalue", "essay", "words", "numbers", nv=4),
        _niah("niah_multiquery", "essay", "words", "numbers", nq=4),
        Task("vt", "vt", 30, dict(num_chains=1, num_hops=4)),
        Task("cwe", "cwe", 120, dict(freq_cw=30, freq_ucw=3, num_cw=10)),
        Task("fwe", "fwe", 50, dict(alpha=2.0)),
    ]
}


@dataclass
class Built:
    """What a generator renders for one haystack size: the chat turns and the answers."""

    user: str
    answer_prefix: str
    answers: list[str]
    history: list[dict] = field(default_factory=list)
    depths: list[float] = field(default_factory=list)


@dataclass
class Sample:
    task: str
    target_length: int
    index: int
    prompt: str
    prompt_token_ids: list[int]
    answers: list[str]
    max_new_tokens: int
    depths: list[float] = field(default_factory=list)

    @property
    def length(self) -> int:
        """RULER's length: prompt tokens + the task's new tokens."""
        return len(self.prompt_token_ids) + self.max_new_tokens


def chat_text(tok, built: Built) -> str:
    """The prompt: the model's chat template over the turns, then the answer prefix."""
    msgs = [*built.history, {"role": "user", "content": built.user}]
    head = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return head + built.answer_prefix


def count_tokens(tok, text: str) -> int:
    return len(tok.encode(text, add_special_tokens=False))


def fit(count: Callable[[int], int], budget: int, guess: int) -> int:
    """Largest n >= 1 with count(n) <= budget (count grows with n): a proportional first step
    from the guess, then gallop and bisect."""
    if count(1) > budget:
        raise ValueError(f"even the smallest haystack is over {budget} tokens: raise the length")
    n = max(1, guess)
    n = max(1, int(n * budget / count(n)))
    step = max(1, n // 512)
    if count(n) <= budget:
        lo = n
        while count(lo + step) <= budget:
            lo, step = lo + step, step * 2
        hi = lo + step
    else:
        hi = n
        while hi - step > 1 and count(hi - step) > budget:
            hi, step = hi - step, step * 2
        lo = max(1, hi - step)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if count(mid) <= budget else (lo, mid)
    return lo


# ---- generators: each draws a sample's random content, then renders it for a haystack size ----


def _insert(lines: list[str], items: Sequence[str], rng: random.Random) -> list[float]:
    """Insert items at random line positions (as RULER does); return their depths (0..1)."""
    n = len(lines)
    positions = sorted(rng.sample(range(max(n, len(items))), len(items)), reverse=True)
    for pos, item in zip(positions, items, strict=True):
        lines.insert(pos, item)
    return [p / n for p in positions]


def insert_at_depths(text: str, items: Sequence[str], depths: Sequence[float]) -> str:
    """Insert items into prose between sentences, each at the boundary at its depth (0..100)."""
    sents = data.split_sentences(text)
    cuts = sorted(int(len(sents) * d / 100) for d in depths)
    parts, last = [], 0
    for cut, item in zip(cuts, items, strict=True):
        parts += [*sents[last:cut], item]
        last = cut
    return " ".join(parts + sents[last:])


def niah(task: Task, rng: random.Random, target: int) -> Callable[[int], Built]:
    a = task.args
    type_v = a["type_v"]
    num_k = max(a["num_k"], a["num_q"])
    keys = [data.random_value(a["type_k"], rng) for _ in range(num_k)]
    values = [[data.random_value(type_v, rng) for _ in range(a["num_v"])] for _ in keys]
    needles = [
        NEEDLE.format(type_needle_v=type_v, key=k, value=v)
        for k, vs in zip(keys, values, strict=True)
        for v in vs
    ]
    rng.shuffle(needles)
    queried = rng.sample(range(num_k), a["num_q"])
    answers = [v for i in queried for v in values[i]]
    qs = [keys[i] for i in queried]
    query = ", ".join(qs[:-1]) + ", and " + qs[-1] if len(qs) > 1 else qs[0]
    template, prefix, shown_v = NIAH_TEMPLATE, NIAH_PREFIX, type_v
    if a["num_q"] * a["num_v"] == 1:
        template, prefix, shown_v = singular(template), singular(prefix), type_v[:-1]
    sub_seed = rng.getrandbits(64)

    def render(n: int) -> Built:
        r = random.Random(sub_seed)
        if a["haystack"] == "essay":
            depths = r.sample(DEPTHS, len(needles))
            context = insert_at_depths(data.essay_text(n), needles, depths)
            depths = sorted(d / 100 for d in depths)
        else:
            if a["haystack"] == "noise":
                lines = [data.NOISE] * n
            else:  # distractor needles, drawn in order so that size n+1 extends size n
                lines = [
                    NEEDLE.format(
                        type_needle_v=type_v,
                        key=data.random_value(a["type_k"], r),
                        value=data.random_value(type_v, r),
                    )
                    for _ in range(n)
                ]
            depths = sorted(_insert(lines, needles, random.Random(sub_seed + n)))
            context = "\n".join(lines)
        fill = dict(type_needle_v=shown_v, query=query)
        return Built(
            template.format(context=context, **fill), prefix.format(**fill), answers, [], depths
        )

    return render


def _vt_chains(rng: random.Random, num_chains: int, num_hops: int, k: int, value: str | None):
    names: list[str] = []
    while len(names) < num_chains * (num_hops + 1):
        v = data.random_var(rng, k)
        if v not in names:
            names.append(v)
    chains, groups = [], []
    for c in range(num_chains):
        vs = names[c * (num_hops + 1) : (c + 1) * (num_hops + 1)]
        first = value if value is not None else str(rng.randint(10000, 99998))
        chains.append(
            [f"VAR {vs[0]} = {first}"]
            + [f"VAR {vs[j + 1]} = VAR {vs[j]} " for j in range(num_hops)]
        )
        groups.append(vs)
    return groups, chains


def _vt_text(chains: list[list[str]], n: int, rng: random.Random) -> str:
    lines = [data.NOISE] * n
    for chain in chains:
        positions = sorted(rng.sample(range(max(len(lines), len(chain))), len(chain)))
        for j, (pos, line) in enumerate(zip(positions, chain, strict=True)):
            lines.insert(pos + j, line)
    return "\n".join(lines).replace(". \n", ".\n")


def vt_example(tok, task: Task, seed: int) -> str:
    """RULER's in-context example: a ~500-token chain task with 3-letter names and value 12345,
    written out without chat markup, answer appended."""
    hops = min(10, task.args["num_hops"])
    groups, chains = _vt_chains(random.Random(seed), task.args["num_chains"], hops, 3, "12345")

    def text(n: int) -> str:
        ctx = _vt_text(chains, n, random.Random(seed + n))
        return VT_TEMPLATE.format(context=ctx, query="12345") + VT_PREFIX.format(
            num_v=hops + 1, query="12345"
        )

    n = fit(lambda n: count_tokens(tok, text(n)), 500, 5)
    return text(n) + " " + " ".join(groups[0]) + "\n"


def vt(task: Task, rng: random.Random, target: int, example: str) -> Callable[[int], Built]:
    hops = task.args["num_hops"]
    groups, chains = _vt_chains(rng, task.args["num_chains"], hops, 5, None)
    value = chains[0][0].split("=")[-1].strip()
    # RULER renames the example's answer variables and value for every sample
    for old in example.strip().split()[-(hops + 1) :]:
        example = example.replace(old, data.random_var(rng, len(old)))
    example = example.replace("12345", str(rng.randint(10000, 99998)))
    sub_seed = rng.getrandbits(64)

    def render(n: int) -> Built:
        ctx = _vt_text(chains, n, random.Random(sub_seed + n))
        user = example + "\n" + VT_TEMPLATE.format(context=ctx, query=value)
        return Built(user, VT_PREFIX.format(num_v=hops + 1, query=value), groups[0])

    return render


def _cwe_list(rng: random.Random, n: int, common: int, uncommon: int, num_cw: int):
    words = data.common_words()
    if n > len(words):
        raise ValueError(f"cwe needs {n} distinct words; the word list has {len(words)}")
    picked = rng.sample(words, n)
    seq = picked[:num_cw] * common + picked[num_cw:] * uncommon
    rng.shuffle(seq)
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(seq)), picked[:num_cw]


def cwe(task: Task, rng: random.Random, target: int) -> Callable[[int], Built]:
    a = task.args
    # RULER's short-context setting: lighter repeats below 4K, a smaller in-context example
    (ex_n, ex_c, ex_u), (c, u) = (
        ((20, 3, 1), (6, 1)) if target < 4096 else ((40, 10, 3), (a["freq_cw"], a["freq_ucw"]))
    )
    ex_ctx, ex_ans = _cwe_list(rng, ex_n, ex_c, ex_u, a["num_cw"])
    shot = " ".join(f"{i + 1}. {w}" for i, w in enumerate(ex_ans))
    history = [
        {"role": "user", "content": CWE_TEMPLATE.format(context=ex_ctx)},
        {"role": "assistant", "content": CWE_PREFIX + " " + shot},
    ]
    sub_seed = rng.getrandbits(64)

    def render(n: int) -> Built:
        ctx, ans = _cwe_list(random.Random(sub_seed), n + a["num_cw"], c, u, a["num_cw"])
        return Built(CWE_TEMPLATE.format(context=ctx), CWE_PREFIX, ans, history)

    return render


def _zeta(s: float, n: int = 1000) -> float:
    """Riemann zeta by direct sum plus the Euler-Maclaurin tail (exact to ~1e-9 for s=2)."""
    return sum(k**-s for k in range(1, n)) + n ** (1 - s) / (s - 1) + 0.5 * n**-s


def fwe(task: Task, rng: random.Random, target: int) -> Callable[[int], Built]:
    alpha = task.args["alpha"]
    size = max(4, target // 50)  # RULER's vocabulary size
    vocab: set[str] = set()
    while len(vocab) < size:
        vocab.add("".join(rng.choices(string.ascii_lowercase, k=6)))
    words = sorted(vocab)
    rng.shuffle(words)
    words[0] = "..."  # the most frequent "word" is noise
    z = _zeta(alpha)
    sub_seed = rng.getrandbits(64)

    def render(n: int) -> Built:
        seq = [w for k, w in enumerate(words, 1) for _ in range(int(n * k**-alpha / z))]
        random.Random(sub_seed).shuffle(seq)
        return Built(FWE_TEMPLATE.format(context=" ".join(seq)), FWE_PREFIX, words[1:4])

    return render


# ---- building and running ----


class Builder:
    """Makes samples for one tokenizer: deterministic in (seed, task, length, index)."""

    def __init__(self, tok, seed: int = 42) -> None:
        self.tok, self.seed = tok, seed
        self._vt_example: str | None = None

    def sample(self, task: Task, target: int, index: int) -> Sample:
        rng = random.Random(f"{self.seed}:{task.name}:{target}:{index}")
        if task.kind == "vt":
            if self._vt_example is None:
                self._vt_example = vt_example(self.tok, task, self.seed)
            render = vt(task, rng, target, self._vt_example)
        else:
            render = {"niah": niah, "cwe": cwe, "fwe": fwe}[task.kind](task, rng, target)
        budget = target - task.max_new_tokens
        count = lambda n: count_tokens(self.tok, chat_text(self.tok, render(n)))  # noqa: E731
        # the search starts from the tokens per unit of a small haystack, so that the size found
        # depends on nothing but the sample
        n = fit(count, budget, int(budget * 64 / count(64)))
        built = render(n)
        prompt = chat_text(self.tok, built)
        ids = self.tok.encode(prompt, add_special_tokens=False)
        return Sample(
            task.name, target, index, prompt, ids, built.answers, task.max_new_tokens, built.depths
        )


def select_tasks(names: str | Sequence[str]) -> list[Task]:
    if isinstance(names, str):
        names = list(TASKS) if names == "all" else names.split(",")
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise ValueError(f"unknown RULER tasks {unknown}: choose from {', '.join(TASKS)} or all")
    return [TASKS[n] for n in names]


@dataclass
class Result:
    """Scores per task and length (percent), their average, and what the run cost."""

    scores: dict[str, dict[int, float]]
    average: dict[int, float]
    samples: int
    wall_s: dict[int, float]
    samples_per_s: dict[int, float]
    records: list[dict]

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("records")
        return d


def run(
    llm,
    tasks: Sequence[Task],
    lengths: Sequence[int],
    samples: int,
    seed: int = 42,
    progress: bool = True,
) -> Result:
    """Build every sample, generate greedily one length at a time (all tasks batched), score."""
    from longserve import SamplingParams

    builder = Builder(llm.get_tokenizer(), seed)
    scores: dict[str, dict[int, float]] = {t.name: {} for t in tasks}
    average, wall, rate, records = {}, {}, {}, []
    for length in tqdm(lengths, desc="lengths", disable=not progress):
        todo = [(t, i) for t in tasks for i in range(samples)]
        batch = [
            builder.sample(t, length, i)
            for t, i in tqdm(todo, desc=f"build {length}", disable=not progress, leave=False)
        ]
        t0 = time.perf_counter()
        outs = llm.generate(
            [{"prompt_token_ids": s.prompt_token_ids} for s in batch],
            [SamplingParams(temperature=0, max_tokens=s.max_new_tokens) for s in batch],
            use_tqdm=progress,
        )
        wall[length] = round(time.perf_counter() - t0, 2)
        rate[length] = round(len(batch) / wall[length], 4)
        for t in tasks:
            metric = METRICS[t.metric]
            got = [(s, o) for s, o in zip(batch, outs, strict=True) if s.task == t.name]
            per = [metric(o.outputs[0].text, s.answers) for s, o in got]
            scores[t.name][length] = round(100 * sum(per) / len(per), 2)
            records += [
                dict(
                    task=s.task,
                    length=s.target_length,
                    index=s.index,
                    prompt_tokens=len(s.prompt_token_ids),
                    answers=s.answers,
                    pred=o.outputs[0].text,
                    score=p,
                )
                for (s, o), p in zip(got, per, strict=True)
            ]
        average[length] = round(sum(scores[t.name][length] for t in tasks) / len(tasks), 2)
    return Result(scores, average, samples, wall, rate, records)


def markdown(result: Result, lengths: Sequence[int]) -> str:
    """Tasks as rows, lengths as columns, the average last."""
    head = (
        "| task | "
        + " | ".join(f"{n // 1024}K" if n % 1024 == 0 else str(n) for n in lengths)
        + " |"
    )
    rows = [head, "|---" * (len(lengths) + 1) + "|"]
    for task, by_len in result.scores.items():
        rows.append(f"| {task} | " + " | ".join(f"{by_len[n]:.1f}" for n in lengths) + " |")
    rows.append(
        "| **average** | " + " | ".join(f"**{result.average[n]:.1f}**" for n in lengths) + " |"
    )
    return "\n".join(rows)
