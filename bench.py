"""Throughput and MFU of training and sampling, side by side with Hugging
Face transformers and CTranslate2.

    python bench.py                          # nano, the default training shape
    python bench.py --size small --markdown  # the rows of docs/performance.md
    python bench.py --size 350M --batch-size 8 --seq-len 2048   # on an accelerator

One process, one config, one machine, measured in one run, so ratios are
fair on a shared and noisy machine: warm-up excluded, several timed
repetitions (every engine and sampling mode in turn within each, so a busy
moment hits them alike), the median shown.

- peak: the best FLOP/s of several large matmuls, measured right before
  the MFU it divides.
- train: one optimizer step (forward, backward, clip, AdamW) of train.py's
  jitted step, tokens/s, achieved FLOP/s and MFU (model FLOPs per token =
  6·N + 12·L·D·T, N without the input embedding, see
  model.flops_per_token).
- sample: prefill ms of a 64-token prompt and decode tokens/s at batch 1
  and 8 through sample.generate, for each of MODES: greedy, temperature
  only, top-p, top-k, and the paper's protocol (temperature 0.2, top-p
  0.95).
- data: tokens/s of the training stream on the standard library, cleaned
  and not, and of its encoder beside the `tokenizers` library's.
With torch and transformers installed, the same training step
(CodeGenForCausalLM + torch.optim.AdamW + clip_grad_norm_) and the same
generate() calls (KV cache, same sampling settings) on the same random
weights, loaded from our save_hf. With ctranslate2 installed, the same
generation through ctranslate2.Generator on those weights converted by its
TransformersConverter (what `ct2-transformers-converter` runs), in float32
and int8. On CPU, our decoding also runs with bfloat16 and int8 weights
(sample.prepare), each beside CTranslate2 int8. Results go to bench.json.
"""
import importlib.util
import json
import os
import statistics
import tempfile
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

import common
import data
import hf
import model
import model_fast
import sample
import train


MODES = {  # name -> sampling settings, as sample.generate takes them
    "greedy": {},
    "t 0.8": dict(temperature=0.8),
    "t 0.8, top-p 0.95": dict(temperature=0.8, top_p=0.95),
    "t 0.8, top-k 40": dict(temperature=0.8, top_k=40),
    "t 0.2, top-p 0.95 (paper)": dict(temperature=0.2, top_p=0.95),
}


def median_seconds(fn, reps, warmup=1):
    """The median wall time of `reps` calls of fn(), after `warmup`
    calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measured_peak(dtype, n=2048, runs=5):
    """The best FLOP/s of `runs` (n x n) @ (n x n) matmuls in `dtype`."""
    a = jnp.ones((n, n), dtype)
    matmul = jax.jit(lambda a: a @ a)
    matmul(a).block_until_ready()

    def run():
        matmul(a).block_until_ready()
    best = min(median_seconds(run, 1, warmup=0) for _ in range(runs))
    return 2 * n ** 3 / best


def decode_rates(engines, prompt_len, new_tokens, reps):
    """{engine: {batch: {mode: (prefill ms, decode tokens/s)}}} for each
    `generate(prompts_BT, n, settings)` in `engines`, which returns how
    many new tokens it produced. Prefill = a 1-token generation; decode =
    the tokens after the first over the time a new_tokens generation
    takes beyond it. Each repetition runs every mode of every engine in
    turn, so the engines share the machine's busy and quiet moments and
    their ratios hold even when the machine is noisy."""
    out = {name: {} for name in engines}
    for b in (1, 8):
        rows = [np.random.default_rng(i).integers(0, 50000, prompt_len)
                for i in range(b)]
        prompts_BT = np.stack(rows)
        times = {}
        for name in engines:
            for mode in MODES:
                times[name, mode] = {"prefill": [], "full": [],
                                     "produced": []}
        for rep in range(reps + 1):          # rep 0 compiles and warms up
            for mode, how in MODES.items():
                for name, generate in engines.items():
                    t0 = time.perf_counter()
                    generate(prompts_BT, 1, how)
                    t1 = time.perf_counter()
                    produced = generate(prompts_BT, new_tokens, how)
                    t2 = time.perf_counter()
                    if rep:
                        times[name, mode]["prefill"].append(t1 - t0)
                        times[name, mode]["full"].append(t2 - t1)
                        times[name, mode]["produced"].append(produced)
            done = f"repetition {rep}/{reps}" if rep else "warm-up"
            print(f"decode batch {b}: {done} done", flush=True)
        for (name, mode), t in times.items():
            prefill = statistics.median(t["prefill"])
            full = statistics.median(t["full"])
            decoded = statistics.median(t["produced"]) - b
            rate = decoded / max(full - prefill, 1e-9)
            out[name].setdefault(b, {})[mode] = (prefill * 1e3, rate)
    return out


# -------------------------------------------------- ours


def ours_train(config, params, batch_BT1, dtype, reps):
    """Median seconds of train.py's jitted step on one batch."""
    r = train.Recipe(lr=1e-4, min_lr=1e-5, warmup=10, anneal=100,
                     dtype=dtype)
    step = jax.jit(train.make_train_step(config, r), donate_argnums=0)
    state = train.init_state(jax.tree.map(jnp.array, params))
    holder = {"state": state}
    batch = jnp.asarray(batch_BT1)[None]

    def run():
        holder["state"], metrics = step(holder["state"], batch)
        jax.block_until_ready(metrics)
    return median_seconds(run, reps)


def ours_generate(config, params):
    """generate(prompts_BT, n, how) through sample.generate."""
    def generate(prompts_BT, n, how):
        prompts = prompts_BT.tolist()
        new = sample.generate(params, config, prompts, n, **how)
        return sum(map(len, new))
    return generate


# -------------------------------------------------- theirs (transformers, CTranslate2)


def hf_model(config, params):
    """transformers' CodeGenForCausalLM with our weights (save_hf)."""
    import transformers
    with tempfile.TemporaryDirectory() as d:
        hf.save_hf(params, config, d)
        return transformers.CodeGenForCausalLM.from_pretrained(d)


def hf_generate(m):
    """generate(prompts_BT, n, how) through transformers' generate()."""
    import torch
    m.eval()

    def generate(prompts_BT, n, how):
        x = torch.tensor(prompts_BT)
        t = how.get("temperature", 0)
        if t:
            # top_k=0: transformers' default is 50
            sampling = dict(do_sample=True, temperature=t,
                            top_p=how.get("top_p", 1.0),
                            top_k=how.get("top_k", 0))
        else:
            sampling = dict(do_sample=False)
        with torch.no_grad():
            m.generate(x, attention_mask=torch.ones_like(x),
                       max_new_tokens=n, min_new_tokens=n, use_cache=True,
                       pad_token_id=data.EOS, **sampling)
        return n * len(prompts_BT)
    return generate


def ct2_generators(config, params, workdir):
    """{compute type: ctranslate2.Generator} for float32 and int8,
    converted from our save_hf output (the converter also wants the
    tokenizer, for the vocabulary)."""
    import ctranslate2
    import transformers
    from ctranslate2.converters import TransformersConverter
    hf_dir = os.path.join(workdir, "hf")
    hf.save_hf(params, config, hf_dir)
    eos = "<|endoftext|>"
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=data.get_tokenizer(),
        bos_token=eos, eos_token=eos, unk_token=eos)
    tokenizer.save_pretrained(hf_dir)
    out = {}
    for kind in ("float32", "int8"):
        converted = os.path.join(workdir, kind)
        TransformersConverter(hf_dir).convert(converted, quantization=kind,
                                              force=True)
        out[kind] = ctranslate2.Generator(converted, device="cpu",
                                          compute_type=kind,
                                          intra_threads=os.cpu_count())
    return out


def ct2_generate(generator):
    """generate(prompts_BT, n, how) through a ctranslate2.Generator."""
    tok = data.get_tokenizer()

    def generate(prompts_BT, n, how):
        tokens = [[tok.id_to_token(int(i)) for i in row]
                  for row in prompts_BT]
        t = how.get("temperature", 0)
        generator.generate_batch(tokens, max_length=n, min_length=n,
                                 include_prompt_in_result=False,
                                 sampling_topk=how.get("top_k", 0) if t else 1,
                                 sampling_topp=how.get("top_p", 1.0),
                                 sampling_temperature=t or 1.0)
        return n * len(prompts_BT)
    return generate


def data_rates(reps, chars=12_000_000):
    """Tokens/s of the training stream on the stdlib (scan, read,
    encode, pack; cleaned and not), and of its encoder (data._encode,
    tiktoken) against the `tokenizers` library's encode_batch_fast
    (get_tokenizer()'s, <|endoftext|> as text) on the same documents."""
    from corpus import Cleaning, source_files
    texts = []
    for f in source_files("stdlib", (".py",)):
        for _, text, _ in f.docs(0, lambda d: True, lambda *_: None):
            texts.append(text)
            chars -= len(text)
        if chars < 0:
            break
    groups = [texts[i:i + 64] for i in range(0, len(texts), 64)]
    library = data._build_tokenizer()
    library.encode_special_tokens = True
    # also the encoder's warm-up
    tokens = sum(len(a) - 1 for a in data._encode(texts))

    def ours():
        return [data._encode(g) for g in groups]

    def theirs():
        return [library.encode_batch_fast(g) for g in groups]
    encoders = {"encoder": ours, "tokenizers": theirs}
    times = {name: [] for name in encoders}
    for _ in range(reps):  # interleaved
        for name, run in encoders.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    rates = {name: tokens / statistics.median(t) for name, t in times.items()}
    cleanings = {"cleaned": Cleaning(), "no cleaning": Cleaning.off()}
    for name, how in cleanings.items():
        rates[name] = data.measure_throughput("stdlib", cleaning=how)
    return rates


def hf_train(m, batch_BT1, reps):
    """Median seconds of the same step in torch: AdamW, clipping at 1."""
    import torch
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4, betas=(0.9, 0.999),
                            eps=1e-8, weight_decay=0.1)
    # T inputs, as ours (HF shifts labels inside)
    x = torch.tensor(batch_BT1[:, :-1], dtype=torch.long)
    m.train()

    def run():
        opt.zero_grad(set_to_none=True)
        loss = m(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
    return median_seconds(run, reps)


# -------------------------------------------------- the report


# ----------------------------------------------------------------------------- accuracy

def accuracy(path, n_batches=8, rows=8, seq_len=256, new_tokens=200):
    """What narrow weights change, against float32, for the checkpoint
    at `path`, per dtype of sample.load: perplexity on held-out stdlib
    windows (the validation split: documents training never saw);
    the logits' max and mean error relative to each position's
    largest |logit|, and how often the argmax agrees; and how many
    greedy generations (prompts: the first 32 tokens of `rows`
    windows) equal float32's token for token."""
    batches = data.eval_batches("stdlib", rows, seq_len, n_batches)
    prompts = [[int(t) for t in w[:32]] for w in batches[0]]
    reference = None
    out = {}
    for dtype in common.DECODE_DTYPES:
        config, params = sample.load(path, dtype)
        logits = [_logits(params, config, w[:, :-1]) for w in batches]
        targets = np.stack([w[:, 1:] for w in batches])
        logp = jax.nn.log_softmax(np.stack(logits), -1)
        picked = np.take_along_axis(np.asarray(logp),
                                    targets[..., None], -1)
        row = {"perplexity": float(np.exp(-picked.mean()))}
        greedy = sample.generate(params, config, prompts, new_tokens)
        if reference is None:
            reference = (np.stack(logits), greedy)
        else:
            ref, ref_greedy = reference
            top = np.abs(ref).max(-1, keepdims=True)
            error = np.abs(np.stack(logits) - ref) / top
            same = np.stack(logits).argmax(-1) == ref.argmax(-1)
            equal = [a == b for a, b in zip(greedy, ref_greedy)]
            row.update(max_rel_error=float(error.max()),
                       mean_rel_error=float(error.mean()),
                       argmax_agreement=float(same.mean()),
                       greedy_equal=f"{sum(equal)}/{len(equal)}")
        out[dtype] = row
        print(f"accuracy {dtype:9s} " + ", ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
            for k, v in row.items()), flush=True)
    return out


def _logits(params, config, tokens_BT):
    """model_fast.forward's float32 logits (B, T, V) on a fresh cache
    of the weights' dtype, as sample.generate's prefill makes it."""
    B, T = tokens_BT.shape
    dtype = params["wte"].dtype
    cache = model_fast.init_cache(config, B, T, dtype)
    logits, _ = model_fast.forward(params, jnp.asarray(tokens_BT),
                                   config, cache=cache)
    return np.asarray(logits, np.float32)


def build_parser():
    """bench.py's command line, every flag with its default."""
    p = common.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="nano", choices=list(model.CONFIGS))
    p.add_argument("--batch-size", type=int, default=None,
                   help="training batch (default: train.py's preset)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="training sequence (default: train.py's preset)")
    p.add_argument("--prompt-len", type=int, default=64, help="sampling prompt tokens")
    p.add_argument("--new-tokens", type=int, default=128, help="sampling new tokens")
    p.add_argument("--reps", type=int, default=3,
                   help="timed repetitions (median shown)")
    p.add_argument("--dtype", default="auto",
                   choices=["auto", "float32", "bfloat16"],
                   help="auto: float32 on CPU, bfloat16 on accelerators")
    p.add_argument("--no-train", action="store_true",
                   help="skip training and the data pipeline")
    p.add_argument("--no-hf", action="store_true",
                   help="skip transformers and CTranslate2")
    p.add_argument("--markdown", action="store_true",
                   help="print the rows of docs/performance.md's tables")
    p.add_argument("--out", default="bench.json", help="results file")
    p.add_argument("--accuracy", metavar="DIR",
                   help="instead: what bfloat16 and int8 decoding change "
                        "against float32 for the checkpoint DIR "
                        "(perplexity on held-out stdlib, logits, greedy)")
    return p


def bench_train(config, params, batch_BT1, dtype, reps, res):
    """Our train step, the peak it is measured against, and the data
    pipeline, into `res` (and printed)."""
    B = batch_BT1.shape[0]
    T = batch_BT1.shape[1] - 1
    flops = model.flops_per_token(config, T) * B * T
    s = ours_train(config, params, batch_BT1, dtype, reps)
    cpu = jax.default_backend() == "cpu"
    peak = measured_peak(jnp.dtype(dtype), 2048 if cpu else 8192)
    res.update(batch=B, seq_len=T, peak_flops=peak)
    res["train"] = {"ms": s * 1e3, "tokens_per_s": B * T / s,
                    "flops_per_s": flops / s, "mfu": flops / s / peak}
    if res["train"]["mfu"] <= 1:
        mfu = f"MFU {100 * res['train']['mfu']:.1f}%"
    else:
        mfu = ("MFU n/a (the load changed between the step and the "
               "peak; run again)")
    print(f"train  ours: batch {B}x{T}: {s * 1e3:8.1f} ms/step  "
          f"{B * T / s:9.0f} tok/s  {flops / s / 1e9:.1f} GFLOP/s of a "
          f"measured peak {peak / 1e9:.1f}: {mfu}")
    rates = data_rates(reps)
    res["data"] = rates
    encoder_ratio = rates["encoder"] / rates["tokenizers"]
    print(f"data   stream (stdlib): {rates['cleaned'] / 1e6:.2f} M tok/s "
          f"cleaned, {rates['no cleaning'] / 1e6:.2f} M tok/s not; "
          f"encoder alone: ours {rates['encoder'] / 1e6:.2f} M tok/s, "
          f"tokenizers library {rates['tokenizers'] / 1e6:.2f} "
          f"-> {encoder_ratio:.2f}x")


def installed(*packages):
    """Whether every one of `packages` can be imported."""
    return all(importlib.util.find_spec(p) for p in packages)


def their_engines(config, params, batch_BT1, reps, res):
    """transformers' train step (into `res`) and the makers of their
    engines' `generate` (transformers, CTranslate2), those installed."""
    engines = {}
    if not installed("torch", "transformers"):
        print("transformers side skipped: "
              "pip install torch==2.13.0 transformers")
        return engines
    import torch
    torch.set_num_threads(os.cpu_count())
    m = hf_model(config, params)
    if batch_BT1 is not None:
        s = hf_train(m, batch_BT1, reps)
        tokens = batch_BT1.shape[0] * (batch_BT1.shape[1] - 1)
        res["hf_train"] = {"ms": s * 1e3, "tokens_per_s": tokens / s}
        ratio = res["train"]["tokens_per_s"] / res["hf_train"]["tokens_per_s"]
        print(f"train  HF:   {s * 1e3:8.1f} ms/step  {tokens / s:9.0f} tok/s"
              f"   -> ours/HF {ratio:.2f}x")
    engines["transformers"] = lambda: hf_generate(m)
    if not installed("ctranslate2"):
        print("CTranslate2 side skipped: pip install ctranslate2")
        return engines
    # the Generators hold the weights once converted
    with tempfile.TemporaryDirectory(prefix="bench-ct2-") as workdir:
        generators = ct2_generators(config, params, workdir)
    engines["ct2 fp32"] = lambda: ct2_generate(generators["float32"])
    engines["ct2 int8"] = lambda: ct2_generate(generators["int8"])
    return engines


def bench_decode(engines, prompt_len, new_tokens, reps):
    """decode_rates of the engines, as {"batch B, mode": {engine:
    {"prefill_ms", "tokens_per_s"}}}, printed with ours/theirs ratios."""
    made = {name: make() for name, make in engines.items()}
    rates = decode_rates(made, prompt_len, new_tokens, reps)
    decode = {}
    for name, by_batch in rates.items():
        for b, modes in by_batch.items():
            for mode, (prefill_ms, tps) in modes.items():
                row = decode.setdefault(f"batch {b}, {mode}", {})
                row[name] = {"prefill_ms": prefill_ms, "tokens_per_s": tps}
    for row, by_name in decode.items():
        for name, r in by_name.items():
            tps = r["tokens_per_s"]
            ratio = ""
            if name in THEIRS:
                ours = by_name["ours"]["tokens_per_s"]
                ratio = f"   -> ours/{name} {ours / tps:.2f}x"
            if name in NARROW and "ct2 int8" in by_name:
                ct2 = by_name["ct2 int8"]["tokens_per_s"]
                ratio = f"   -> {name}/ct2 int8 {tps / ct2:.2f}x"
            print(f"decode {name:13s} {row:35s} prefill "
                  f"{r['prefill_ms']:7.1f} ms, {tps:8.1f} tok/s{ratio}",
                  flush=True)
    return decode


THEIRS = ("transformers", "ct2 fp32", "ct2 int8")   # engines, README order
# our decoding with narrower weights (sample.prepare), beside ct2 int8
NARROW = ("ours bfloat16", "ours int8")


def narrow_markdown(r):
    """docs/performance.md rows: our decoding in float32, bfloat16 and
    int8 weights, each as tokens/s and its ratio to CTranslate2 int8."""
    rows = []
    for row, engines in r["decode"].items():
        if "ct2 int8" not in engines:
            continue
        ct2 = engines["ct2 int8"]["tokens_per_s"]
        cells = []
        for e in ("ours", *NARROW):
            rate = engines[e]["tokens_per_s"]
            cells.append(f"{rate:.0f} ({rate / ct2:.2f}x)")
        rows.append(f"| {r['size']} {row} | {' | '.join(cells)} | "
                    f"{ct2:.0f} |")
    return "\n".join(rows)


def markdown(r):
    """README rows: training, then one row per batch and sampling mode,
    every engine side by side."""
    rows = []
    if "train" in r:
        ours = r["train"]["tokens_per_s"]
        hf_rate = r.get("hf_train", {}).get("tokens_per_s")
        theirs = "–"
        ratio = "–"
        if hf_rate:
            theirs = f"{hf_rate:.0f} tok/s"
            ratio = f"{ours / hf_rate:.2f}x"
        rows.append(f"| {r['size']} train {r['batch']}x{r['seq_len']} | "
                    f"{ours:.0f} tok/s, MFU {100 * r['train']['mfu']:.1f}% | "
                    f"{theirs} | – | – | {ratio} |")
    for row, engines in r["decode"].items():
        ours = engines["ours"]["tokens_per_s"]
        cells = []
        ratios = []
        for e in THEIRS:
            if e in engines:
                rate = engines[e]["tokens_per_s"]
                cells.append(f"{rate:.0f}")
                ratios.append(f"{ours / rate:.2f}x")
            else:
                cells.append("–")
                ratios.append("–")
        rows.append(f"| {r['size']} decode {row} | {ours:.0f} tok/s | "
                    f"{' | '.join(cells)} | {' / '.join(ratios)} |")
    return "\n".join(rows)


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if args.accuracy:
        res = {"accuracy": accuracy(args.accuracy)}
        return common.write_json(args.out, res)
    for flag in ("batch_size", "seq_len", "prompt_len", "new_tokens", "reps"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            p.error(f"{common.flag_names([flag])} must be >= 1, got {value}")
    config = model.CONFIGS[args.size]
    if args.prompt_len + args.new_tokens > config.n_ctx + 1:
        p.error(f"--prompt-len {args.prompt_len} + --new-tokens "
                f"{args.new_tokens} exceed {args.size}'s context of "
                f"{config.n_ctx} (+1)")
    preset = train.preset(args.size)
    B = args.batch_size or preset.batch_size
    T = args.seq_len or preset.seq_len
    cpu = jax.default_backend() == "cpu"
    dtype = args.dtype
    if dtype == "auto":
        dtype = "float32" if cpu else "bfloat16"
    params = model.init_params(config, jax.random.PRNGKey(0))
    device = jax.devices()[0].device_kind
    n_params = model.param_count(config) / 1e6
    print(f"{args.size}: {n_params:.1f}M params, {dtype}, on {device}")
    res = {"size": args.size, "device": device, "dtype": dtype,
           "prompt_len": args.prompt_len, "new_tokens": args.new_tokens}
    batch_BT1 = None
    if not args.no_train:
        rng = np.random.default_rng(0)
        batch_BT1 = rng.integers(0, 50000, (B, T + 1)).astype(np.int32)
        bench_train(config, params, batch_BT1, dtype, args.reps, res)

    def ours():
        return ours_generate(config, sample.prepare(params, dtype))
    engines = {"ours": ours}
    for narrow in NARROW:          # laptop decoding: on CPU only
        if cpu:
            prepared = sample.prepare(params, narrow.split()[1])
            engines[narrow] = partial(ours_generate, config, prepared)
    if not args.no_hf and cpu:
        engines.update(their_engines(config, params, batch_BT1, args.reps, res))
    res["decode"] = bench_decode(engines, args.prompt_len, args.new_tokens,
                                 args.reps)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    if args.markdown:
        print(markdown(res))
        print(narrow_markdown(res))


if __name__ == "__main__":
    common.run_main(main)
