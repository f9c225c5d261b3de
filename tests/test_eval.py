"""Long-context evaluation: sample lengths, needle depths, recoverable answers, RULER's scoring."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from longserve.eval import data, niah, parity, ruler
from longserve.eval.scoring import postprocess, string_match_all, string_match_part
from longserve.models.registry import resolve
from longserve.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(resolve("smollm2-135m"))


@pytest.fixture(scope="module")
def samples(tok) -> dict[str, ruler.Sample]:
    """One sample of every task at 4K, the length the table reports."""
    b = ruler.Builder(tok, seed=42)
    return {name: b.sample(task, 4096, 0) for name, task in ruler.TASKS.items()}


def user_text(s: ruler.Sample) -> str:
    """The last user turn of a prompt (ChatML, the embedded model's template)."""
    return s.prompt.rsplit("<|im_start|>user\n", 1)[1].split("<|im_end|>")[0]


# ---- scoring: RULER's definitions on crafted predictions ----


def test_string_match_all_is_case_insensitive_and_partial():
    refs = [["Apple-Pie", "1234567"], ["w", "x", "y", "z"]]
    preds = ["the apple-pie number is 1234567", "W then y"]
    # sample 1: both found (1.0); sample 2: w, y found of four (0.5) -> mean 75
    assert string_match_all(preds, refs) == 75.0
    assert string_match_all(["APPLE-PIE"], [["apple-pie"]]) == 100.0
    assert string_match_all(["123456"], [["1234567"]]) == 0.0  # a prefix is no match


def test_string_match_part_takes_any_reference():
    refs = [["Paris", "City of Paris"], ["1912"], ["x", "y"]]
    preds = ["city of paris", "In 1913", "x"]
    assert string_match_part(preds, refs) == 66.67  # RULER rounds to 2 decimals
    assert string_match_all(preds, refs) == round(100 * (1 + 0 + 0.5) / 3, 2)


def test_postprocess_turns_control_characters_into_newlines():
    assert postprocess("  7\x001\t5  ") == "7\n1\n5"
    assert string_match_all(["12\x0034"], [["1234"]]) == 0.0


# ---- generated samples ----


def test_samples_have_the_requested_length(tok, samples):
    for name, s in samples.items():
        assert s.length <= 4096, name
        assert s.length >= 0.98 * 4096, (name, s.length)
        # the length is what the model's tokenizer makes of the full chat prompt
        ids = tok.encode(s.prompt, add_special_tokens=False)
        assert ids == s.prompt_token_ids, name
        assert len(ids) + ruler.TASKS[name].max_new_tokens == s.length


def test_answer_prefix_opens_the_assistant_turn(samples):
    for name, s in samples.items():
        head, prefix = s.prompt.rsplit("<|im_start|>assistant\n", 1)
        assert head.endswith("<|im_end|>\n"), name
        assert prefix.startswith(" Answer:") or prefix.startswith(" The special magic"), name


def test_samples_are_deterministic_by_seed(tok):
    t = ruler.TASKS["niah_multikey_2"]
    a = ruler.Builder(tok, seed=1).sample(t, 1024, 3)
    other = ruler.Builder(tok, seed=1)
    for i in range(3):  # a sample does not depend on what was built before it
        other.sample(t, 1024, i)
    b = other.sample(t, 1024, 3)
    c = ruler.Builder(tok, seed=2).sample(t, 1024, 3)
    assert a.prompt_token_ids == b.prompt_token_ids
    assert a.prompt_token_ids != c.prompt_token_ids


def test_niah_needles_sit_at_their_depths(samples):
    for name in ("niah_single_2", "niah_multikey_1", "niah_multivalue", "niah_multiquery"):
        s = samples[name]
        context = user_text(s).split("\n", 1)[1].rsplit("\n", 1)[0]
        found = sorted(
            m.start() / len(context) for m in re.finditer("One of the special magic", context)
        )
        assert len(found) == len(s.depths), name
        for at, want in zip(found, s.depths, strict=True):
            assert abs(at - want) < 0.05, (name, at, want)  # sentence boundaries, ~1 sentence
    for name in ("niah_single_1", "niah_multikey_2"):  # line haystacks: exact line position
        s = samples[name]
        lines = user_text(s).split("\n")[1:-1]
        real = [i for i, ln in enumerate(lines) if any(a in ln for a in s.answers)]
        assert [i / (len(lines) - 1) for i in real] == pytest.approx(s.depths, abs=1e-9)


def test_niah_answers_are_in_their_needles(samples):
    for name, s in samples.items():
        if not name.startswith("niah"):
            continue
        text, question = user_text(s), s.prompt.rsplit("What", 1)[1]
        for value in s.answers:
            (key,) = re.findall(rf"special magic \w+ for (\S+) is: {re.escape(value)}\.", text)
            assert key in question, name
        n_keys = len(re.findall(r"special magic \w+ for \S+ is:", text))
        args = ruler.TASKS[name].args
        if args["haystack"] != "needle":  # distractor haystacks hold more needles by design
            assert n_keys == max(args["num_k"], args["num_q"]) * args["num_v"], name


def test_vt_answer_follows_the_chain(samples):
    s = samples["vt"]
    task = user_text(s).split("Memorize and track")[-1]  # past the in-context example
    value = re.search(r"assigned the value (\d+) in the text above", task).group(1)
    assign = dict(re.findall(r"VAR (\w+) = (\w+(?: \w+)?)", task))
    resolved = {}
    for var in assign:
        v = assign[var]
        while v.startswith("VAR "):
            v = assign[v[4:]]
        resolved[var] = v
    assert sorted(v for v, x in resolved.items() if x == value) == sorted(s.answers)
    assert len(s.answers) == 5


def test_cwe_answer_is_the_most_common_words(samples):
    s = samples["cwe"]
    listing = user_text(s).split("\n")[1]
    counts = Counter(re.findall(r"\d+\. (\S+)", listing))
    top = counts.most_common()
    assert {w for w, _ in top[:10]} == set(s.answers)
    assert top[9][1] > top[10][1]  # no tie at the cut: 30 (or 6) repeats against 3 (or 1)


def test_fwe_answer_is_the_most_frequent_coded_words(samples):
    s = samples["fwe"]
    coded = user_text(s).split("coded words. ", 1)[1].split("\nQuestion:")[0].split()
    counts = Counter(w for w in coded if w != "...")
    assert [w for w, _ in counts.most_common(3)] == s.answers
    assert counts.most_common(4)[2][1] > counts.most_common(4)[3][1]


def test_niah_grid_needle_depth_in_tokens(tok):
    for depth in (0, 25, 50, 75, 100):
        cell = niah.build_cell(tok, 4096, depth, 0)
        assert 0.98 * 4096 <= cell.total <= 4096
        text = tok.decode(cell.prompt_token_ids)
        ctx_start = text.index("afterwards.\n") + len("afterwards.\n")
        ctx_end = text.rindex("\nWhat is the special magic")
        at = text.index("One of the special magic")
        before, context = text[ctx_start:at], text[ctx_start:ctx_end]
        share = len(tok.encode(before)) / len(tok.encode(context))
        assert abs(share - depth / 100) < 0.03, (depth, share)
        assert cell.value in text


def test_sentence_split_keeps_every_word():
    text = data.essay_text(2000)
    sents = data.split_sentences(text)
    assert " ".join(sents).split() == text.split()
    assert all(s[-1] in ".!?\"')]" for s in sents[:-1])


# ---- parity recipes ----


def test_parse_recipe():
    assert parity.parse_recipe("fp8_e4m3:per_head").overrides == {
        "kv_cache_dtype": "fp8_e4m3",
        "kv_scale": "per_head",
    }
    assert parity.parse_recipe("auto").overrides == {}
    assert parity.parse_recipe("chunked_off").overrides == {"enable_chunked_prefill": False}
    r = parity.parse_recipe("max_num_batched_tokens=512,enable_prefix_caching=false")
    assert r.overrides == {"max_num_batched_tokens": 512, "enable_prefix_caching": False}
    with pytest.raises(ValueError):
        parity.parse_recipe("no_such_field=1")


# ---- end to end on the embedded model ----


def test_niah_cells_retrieve_through_the_engine(llm):
    from tests.conftest import assert_no_leaks

    grid = niah.run(llm, [768], [10, 90], samples=1, progress=False)
    assert grid.scores == {768: {10: 100.0, 90: 100.0}}
    assert all(r["answer"] in r["pred"] for r in grid.records)
    assert_no_leaks(llm)
