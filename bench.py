"""Throughput and MFU of training and sampling, side by side with Hugging Face transformers
and CTranslate2.

    python bench.py                          # nano, the default training shape
    python bench.py --size small --markdown  # the README's table rows
    python bench.py --size 350M --batch-size 8 --seq-len 2048   # on an accelerator

One process, one config, one machine, measured in one run, so ratios are fair on a
shared and noisy machine: warm-up excluded, several timed repetitions (every engine and
sampling mode in turn within each, so a busy moment hits them alike), the median shown.

- peak: the best FLOP/s of several large matmuls, measured right before the MFU it divides.
- train: one optimizer step (forward, backward, clip, AdamW) of train.py's jitted step,
  tokens/s, achieved FLOP/s and MFU (model FLOPs per token = 6·N + 12·L·D·T, N without
  the input embedding, see model.flops_per_token).
- sample: prefill ms of a 64-token prompt and decode tokens/s at batch 1 and 8 through
  sample.generate, for each of MODES: greedy, temperature only, top-p, top-k, and the
  paper's protocol (temperature 0.2, top-p 0.95).
- data: tokens/s of the training stream on the standard library, cleaned and not, and of
  its encoder beside the `tokenizers` library's.
With torch and transformers installed, the same training step (CodeGenForCausalLM +
torch.optim.AdamW + clip_grad_norm_) and the same generate() calls (KV cache, same
sampling settings) on the same random weights, loaded from our save_hf. With
ctranslate2 installed, the same generation through ctranslate2.Generator on those weights
converted by its TransformersConverter (what `ct2-transformers-converter` runs), in float32
and int8. Results go to bench.json.
"""
import json
import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

import common
import data
import hf
import model
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
    best = min(median_seconds(lambda: matmul(a).block_until_ready(), 1, warmup=0) for _ in range(runs))
    return 2 * n ** 3 / best


def decode_rates(engines, prompt_len, new_tokens, reps):
    """{engine: {batch: {mode: (prefill ms, decode tokens/s)}}} for each `generate(prompts_BT, n,
    settings)` in `engines`, which returns how many new tokens it produced. Prefill = a 1-token
    generation; decode = the tokens after the first over the time a new_tokens generation takes
    beyond it. Each repetition runs every mode of every engine in turn, so the engines share the
    machine's busy and quiet moments and their ratios hold even when the machine is noisy."""
    out = {name: {} for name in engines}
    for b in (1, 8):
        prompts_BT = np.stack([np.random.default_rng(i).integers(0, 50000, prompt_len) for i in range(b)])
        times = {(name, mode): ([], [], []) for name in engines for mode in MODES}
        for rep in range(reps + 1):                                  # rep 0 compiles and warms up
            for mode, how in MODES.items():
                for name, generate in engines.items():
                    t0 = time.perf_counter()
                    generate(prompts_BT, 1, how)
                    t1 = time.perf_counter()
                    produced = generate(prompts_BT, new_tokens, how)
                    t2 = time.perf_counter()
                    if rep:
                        for record, value in zip(times[name, mode], (t1 - t0, t2 - t1, produced)):
                            record.append(value)
            print(f"decode batch {b}: {'warm-up' if rep == 0 else f'repetition {rep}/{reps}'} done", flush=True)
        for (name, mode), (prefill, full, produced) in times.items():
            prefill, full = statistics.median(prefill), statistics.median(full)
            rate = (statistics.median(produced) - b) / max(full - prefill, 1e-9)
            out[name].setdefault(b, {})[mode] = (prefill * 1e3, rate)
    return out


# ----------------------------------------------------------------------------- ours


def ours_train(config, params, batch_BT1, dtype, reps):
    r = train.Recipe(lr=1e-4, min_lr=1e-5, warmup=10, anneal=100, dtype=dtype)
    step = jax.jit(train.make_train_step(config, r), donate_argnums=0)
    holder = {"state": train.init_state(jax.tree.map(jnp.array, params))}
    batch = jnp.asarray(batch_BT1)[None]

    def run():
        holder["state"], m = step(holder["state"], batch)
        jax.block_until_ready(m)
    return median_seconds(run, reps)


def ours_generate(config, params):
    def generate(prompts_BT, n, how):
        return sum(map(len, sample.generate(params, config, prompts_BT.tolist(), n, **how)))
    return generate


# ----------------------------------------------------------------------------- theirs (transformers, CTranslate2)


def hf_model(config, params):
    import transformers
    with tempfile.TemporaryDirectory() as d:
        hf.save_hf(params, config, d)
        return transformers.CodeGenForCausalLM.from_pretrained(d)


def hf_generate(m):
    import torch
    m.eval()

    def generate(prompts_BT, n, how):
        x = torch.tensor(prompts_BT)
        t = how.get("temperature", 0)
        sampling = dict(do_sample=True, temperature=t, top_p=how.get("top_p", 1.0), top_k=how.get("top_k", 0)) \
            if t else dict(do_sample=False)                          # top_k=0: transformers' default is 50
        with torch.no_grad():
            m.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n, use_cache=True,
                       pad_token_id=data.EOS, **sampling)
        return n * len(prompts_BT)
    return generate


def ct2_generators(config, params, workdir):
    """{compute type: ctranslate2.Generator} for float32 and int8, converted from our save_hf
    output (the converter also wants the tokenizer, for the vocabulary)."""
    import ctranslate2
    import transformers
    from ctranslate2.converters import TransformersConverter
    hf_dir = os.path.join(workdir, "hf")
    hf.save_hf(params, config, hf_dir)
    eos = "<|endoftext|>"
    transformers.PreTrainedTokenizerFast(tokenizer_object=data.get_tokenizer(), bos_token=eos, eos_token=eos,
                                         unk_token=eos).save_pretrained(hf_dir)
    out = {}
    for kind in ("float32", "int8"):
        TransformersConverter(hf_dir).convert(os.path.join(workdir, kind), quantization=kind, force=True)
        out[kind] = ctranslate2.Generator(os.path.join(workdir, kind), device="cpu", compute_type=kind,
                                          intra_threads=os.cpu_count())
    return out


def ct2_generate(generator):
    tok = data.get_tokenizer()

    def generate(prompts_BT, n, how):
        tokens = [[tok.id_to_token(int(i)) for i in row] for row in prompts_BT]
        t = how.get("temperature", 0)
        generator.generate_batch(tokens, max_length=n, min_length=n, include_prompt_in_result=False,
                                 sampling_topk=how.get("top_k", 0) if t else 1, sampling_topp=how.get("top_p", 1.0),
                                 sampling_temperature=t or 1.0)
        return n * len(prompts_BT)
    return generate


def data_rates(reps, chars=12_000_000):
    """Tokens/s of the training stream on the stdlib (scan, read, encode, pack; cleaned and
    not), and of its encoder (data._encode, tiktoken) against the `tokenizers` library's
    encode_batch_fast (get_tokenizer()'s, <|endoftext|> as text) on the same documents."""
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
    tokens = sum(len(a) - 1 for a in data._encode(texts))  # also the encoder's warm-up
    encoders = {"encoder": lambda: [data._encode(g) for g in groups],
                "tokenizers": lambda: [library.encode_batch_fast(g) for g in groups]}
    times = {name: [] for name in encoders}
    for _ in range(reps):  # interleaved
        for name, run in encoders.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    rates = {name: tokens / statistics.median(t) for name, t in times.items()}
    for name, how in (("cleaned", Cleaning()), ("no cleaning", Cleaning.off())):
        rates[name] = data.measure_throughput("stdlib", cleaning=how)
    return rates


def hf_train(m, batch_BT1, reps):
    import torch
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    x = torch.tensor(batch_BT1[:, :-1], dtype=torch.long)  # T inputs, as ours (HF shifts labels inside)
    m.train()

    def run():
        opt.zero_grad(set_to_none=True)
        loss = m(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
    return median_seconds(run, reps)


# ----------------------------------------------------------------------------- the report


def build_parser():
    """bench.py's command line, every flag with its default."""
    p = common.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="nano", choices=list(model.CONFIGS))
    p.add_argument("--batch-size", type=int, default=None, help="training batch (default: train.py's preset)")
    p.add_argument("--seq-len", type=int, default=None, help="training sequence (default: train.py's preset)")
    p.add_argument("--prompt-len", type=int, default=64, help="sampling prompt tokens")
    p.add_argument("--new-tokens", type=int, default=128, help="sampling new tokens")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions (median shown)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="auto: float32 on CPU, bfloat16 on accelerators")
    p.add_argument("--no-train", action="store_true", help="skip training and the data pipeline")
    p.add_argument("--no-hf", action="store_true", help="skip transformers and CTranslate2")
    p.add_argument("--markdown", action="store_true", help="print the README table rows")
    p.add_argument("--out", default="bench.json", help="results file")
    return p


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    for flag in ("batch_size", "seq_len", "prompt_len", "new_tokens", "reps"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    config = model.CONFIGS[args.size]
    if args.prompt_len + args.new_tokens > config.n_ctx + 1:
        p.error(f"--prompt-len {args.prompt_len} + --new-tokens {args.new_tokens} exceed {args.size}'s context "
                f"of {config.n_ctx} (+1)")
    preset = train.preset(args.size)
    B = args.batch_size or preset.batch_size
    T = args.seq_len or preset.seq_len
    cpu = jax.default_backend() == "cpu"
    dtype = ("float32" if cpu else "bfloat16") if args.dtype == "auto" else args.dtype
    params = model.init_params(config, jax.random.PRNGKey(0))
    device = jax.devices()[0].device_kind
    print(f"{args.size}: {model.param_count(config) / 1e6:.1f}M params, {dtype}, on {device}")
    res = {"size": args.size, "device": device, "dtype": dtype, "prompt_len": args.prompt_len,
           "new_tokens": args.new_tokens}

    if not args.no_train:
        batch = np.random.default_rng(0).integers(0, 50000, (B, T + 1)).astype(np.int32)
        flops = model.flops_per_token(config, T) * B * T
        s = ours_train(config, params, batch, dtype, args.reps)
        peak = measured_peak(jnp.dtype(dtype), 2048 if cpu else 8192)
        res.update(batch=B, seq_len=T, peak_flops=peak)
        res["train"] = {"ms": s * 1e3, "tokens_per_s": B * T / s, "flops_per_s": flops / s, "mfu": flops / s / peak}
        mfu = f"MFU {100 * res['train']['mfu']:.1f}%" if res["train"]["mfu"] <= 1 else \
            "MFU n/a (the load changed between the step and the peak; run again)"
        print(f"train  ours: batch {B}x{T}: {s * 1e3:8.1f} ms/step  {B * T / s:9.0f} tok/s  {flops / s / 1e9:.1f} "
              f"GFLOP/s of a measured peak {peak / 1e9:.1f}: {mfu}")
        res["data"] = data_rates(args.reps)
        print(f"data   stream (stdlib): {res['data']['cleaned'] / 1e6:.2f} M tok/s cleaned, "
              f"{res['data']['no cleaning'] / 1e6:.2f} M tok/s not; encoder alone: ours "
              f"{res['data']['encoder'] / 1e6:.2f} M tok/s, tokenizers library {res['data']['tokenizers'] / 1e6:.2f}"
              f" -> {res['data']['encoder'] / res['data']['tokenizers']:.2f}x")

    engines = {"ours": lambda: ours_generate(config, sample.prepare(params, dtype))}
    if not args.no_hf and cpu:
        try:
            import torch
            import transformers  # noqa: F401
        except ImportError:
            print("transformers side skipped: pip install torch==2.13.0 transformers")
        else:
            torch.set_num_threads(os.cpu_count())
            m = hf_model(config, params)
            if not args.no_train:
                s = hf_train(m, batch, args.reps)
                res["hf_train"] = {"ms": s * 1e3, "tokens_per_s": B * T / s}
                print(f"train  HF:   {s * 1e3:8.1f} ms/step  {B * T / s:9.0f} tok/s   "
                      f"-> ours/HF {res['train']['tokens_per_s'] / res['hf_train']['tokens_per_s']:.2f}x")
            engines["transformers"] = lambda: hf_generate(m)
            try:
                import ctranslate2  # noqa: F401
            except ImportError:
                print("CTranslate2 side skipped: pip install ctranslate2")
            else:
                with tempfile.TemporaryDirectory(prefix="bench-ct2-") as workdir:  # Generators hold the weights
                    generators = ct2_generators(config, params, workdir)
                engines["ct2 fp32"] = lambda: ct2_generate(generators["float32"])
                engines["ct2 int8"] = lambda: ct2_generate(generators["int8"])
    res["decode"] = {}
    for name, rates in decode_rates({name: make() for name, make in engines.items()}, args.prompt_len,
                                    args.new_tokens, args.reps).items():
        for b, modes in rates.items():
            for mode, (prefill_ms, tps) in modes.items():
                res["decode"].setdefault(f"batch {b}, {mode}", {})[name] = {"prefill_ms": prefill_ms,
                                                                             "tokens_per_s": tps}
                ours = res["decode"][f"batch {b}, {mode}"]["ours"]["tokens_per_s"]
                print(f"decode {name:12s} batch {b}, {mode:26s} prefill {prefill_ms:7.1f} ms, {tps:8.1f} tok/s"
                      + (f"   -> ours/{name} {ours / tps:.2f}x" if name != "ours" else ""), flush=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    if args.markdown:
        print(markdown(res))


def markdown(r):
    """README rows: training, then one row per batch and sampling mode, every engine side by side."""
    rows = []
    if "train" in r:
        ours, hf = r["train"]["tokens_per_s"], r.get("hf_train", {}).get("tokens_per_s")
        theirs, ratio = (f"{hf:.0f} tok/s", f"{ours / hf:.2f}x") if hf else ("–", "–")
        rows.append(f"| {r['size']} train {r['batch']}x{r['seq_len']} | {ours:.0f} tok/s, MFU "
                    f"{100 * r['train']['mfu']:.1f}% | {theirs} | – | – | {ratio} |")
    for row, engines in r["decode"].items():
        ours = engines["ours"]["tokens_per_s"]
        cell = lambda e: f"{engines[e]['tokens_per_s']:.0f}" if e in engines else "–"
        ratio = lambda e: f"{ours / engines[e]['tokens_per_s']:.2f}x" if e in engines else "–"
        rows.append(f"| {r['size']} decode {row} | {ours:.0f} tok/s | {cell('transformers')} | {cell('ct2 fp32')} | "
                    f"{cell('ct2 int8')} | {ratio('transformers')} / {ratio('ct2 fp32')} / {ratio('ct2 int8')} |")
    return "\n".join(rows)


if __name__ == "__main__":
    common.run_main(main)
