"""Throughput and MFU of training and sampling, side by side with Hugging Face transformers.

    python bench.py                          # nano, the default training shape
    python bench.py --size small --markdown  # the README's table rows
    python bench.py --size 350M --batch-size 8 --seq-len 2048   # on an accelerator

One process, one config, one machine, measured in one run, so ratios are fair on a
shared and noisy machine: warm-up excluded, several timed repetitions, the median shown.

- peak: the device's datasheet bf16 peak, or the measured FLOP/s of a large matmul on CPU.
- train: one optimizer step (forward, backward, clip, AdamW) of train.py's jitted step,
  tokens/s, achieved FLOP/s and MFU (model FLOPs per token = 6·N + 12·L·D·T, N without
  the input embedding, see model.flops_per_token).
- sample: prefill ms of a prompt, decode tokens/s at batch 1 and 8 through sample.generate.
- data: tokens/s of the streaming pipeline on the standard library.
With torch and transformers installed, the same training step (CodeGenForCausalLM +
torch.optim.AdamW + clip_grad_norm_) and the same greedy generate() (with its KV cache) on
the same random weights, loaded from our save_hf, and the ratios ours/theirs.
Results go to bench.json.
"""
import argparse
import json
import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

import data
import model
import sample
import tpu
import train


def median_seconds(fn, reps, warmup=1):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


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


def ours_sample(config, params, prompt_len, new_tokens, batch, reps):
    prompts = [list(np.random.default_rng(i).integers(0, 50000, prompt_len)) for i in range(batch)]
    gen = lambda n: sample.generate(params, config, prompts, n)
    prefill = median_seconds(lambda: gen(1), reps)
    out = gen(new_tokens)  # also the warm-up of the timed runs below
    full = median_seconds(lambda: gen(new_tokens), reps, warmup=0)
    produced = sum(len(o) for o in out) / batch  # greedy random weights may still hit EOS
    return prefill, (produced - 1) * batch / (full - prefill)


# ----------------------------------------------------------------------------- theirs (transformers)


def hf_model(config, params):
    import transformers
    with tempfile.TemporaryDirectory() as d:
        model.save_hf(params, config, d)
        return transformers.CodeGenForCausalLM.from_pretrained(d)


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


def hf_sample(m, prompt_len, new_tokens, batch, reps):
    import torch
    m.eval()
    x = torch.tensor(np.stack([np.random.default_rng(i).integers(0, 50000, prompt_len) for i in range(batch)]))

    def gen(n):
        with torch.no_grad():
            m.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                       use_cache=True, pad_token_id=data.EOS)
    prefill = median_seconds(lambda: gen(1), reps)
    full = median_seconds(lambda: gen(new_tokens), reps)
    return prefill, (new_tokens - 1) * batch / (full - prefill)


# ----------------------------------------------------------------------------- the report


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--size", default="nano", choices=list(model.CONFIGS))
    p.add_argument("--batch-size", type=int, default=None, help="training batch (default: train.py's preset)")
    p.add_argument("--seq-len", type=int, default=None, help="training sequence (default: train.py's preset)")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--reps", type=int, default=3, help="timed repetitions (median shown)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--no-hf", action="store_true", help="skip the transformers side")
    p.add_argument("--markdown", action="store_true", help="print the README table rows")
    p.add_argument("--out", default="bench.json")
    args = p.parse_args(argv)

    config = model.CONFIGS[args.size]
    preset = train.PRESETS.get(args.size, {})
    B = args.batch_size or preset["batch_size"]
    T = args.seq_len or preset["seq_len"]
    cpu = jax.default_backend() == "cpu"
    dtype = ("float32" if cpu else "bfloat16") if args.dtype == "auto" else args.dtype
    params = model.init_params(config, jax.random.PRNGKey(0))
    batch = np.random.default_rng(0).integers(0, 50000, (B, T + 1)).astype(np.int32)
    flops = model.flops_per_token(config, T)
    peak, peak_source = tpu.peak_flops()
    device = jax.devices()[0].device_kind
    print(f"{args.size}: {model.param_count(config) / 1e6:.1f}M params, train batch {B}x{T}, {dtype}, on {device}; "
          f"peak {peak / 1e12:.2f} TFLOP/s ({peak_source})")

    res = {"size": args.size, "device": device, "batch": B, "seq_len": T, "dtype": dtype, "peak_flops": peak}
    s = ours_train(config, params, batch, dtype, args.reps)
    res["train"] = {"ms": s * 1e3, "tokens_per_s": B * T / s, "flops_per_s": flops * B * T / s,
                    "mfu": flops * B * T / s / peak}
    print(f"train  ours: {s * 1e3:8.1f} ms/step  {B * T / s:9.0f} tok/s  MFU {100 * res['train']['mfu']:.1f}%")
    sample_params = model.unstack_layers(params if dtype == "float32" else model.cast(params, jnp.bfloat16))
    for b in (1, 8):
        prefill, tps = ours_sample(config, sample_params, args.prompt_len, args.new_tokens, b, args.reps)
        res[f"sample_b{b}"] = {"prefill_ms": prefill * 1e3, "decode_tokens_per_s": tps, "ms_per_token": b / tps * 1e3}
        print(f"sample ours: batch {b}: prefill {prefill * 1e3:7.1f} ms, decode {tps:8.1f} tok/s "
              f"({b / tps * 1e3:.2f} ms/step)")
    weight_bytes = model.param_count(config, embedding=False) * jnp.dtype(dtype).itemsize
    res["sample_b1"]["weight_gb_per_s"] = weight_bytes * res["sample_b1"]["decode_tokens_per_s"] / 1e9
    print(f"       batch 1 reads {weight_bytes / 1e6:.0f} MB of weights per token: "
          f"{res['sample_b1']['weight_gb_per_s']:.1f} GB/s")
    res["data_tokens_per_s"] = data.measure_throughput("stdlib")
    print(f"data   ours: {res['data_tokens_per_s'] / 1e6:.2f} M tok/s (stdlib, tokenize + pack)")

    if not args.no_hf and cpu:
        try:
            import torch
            import transformers  # noqa: F401
        except ImportError:
            print("transformers side skipped: pip install torch==2.13.0 transformers")
        else:
            torch.set_num_threads(os.cpu_count())
            m = hf_model(config, params)
            s = hf_train(m, batch, args.reps)
            res["hf_train"] = {"ms": s * 1e3, "tokens_per_s": B * T / s}
            print(f"train  HF:   {s * 1e3:8.1f} ms/step  {B * T / s:9.0f} tok/s   "
                  f"-> ours/HF {res['train']['tokens_per_s'] / res['hf_train']['tokens_per_s']:.2f}x")
            for b in (1, 8):
                prefill, tps = hf_sample(m, args.prompt_len, args.new_tokens, b, args.reps)
                res[f"hf_sample_b{b}"] = {"prefill_ms": prefill * 1e3, "decode_tokens_per_s": tps}
                print(f"sample HF:   batch {b}: prefill {prefill * 1e3:7.1f} ms, decode {tps:8.1f} tok/s   "
                      f"-> ours/HF {res[f'sample_b{b}']['decode_tokens_per_s'] / tps:.2f}x")

    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    if args.markdown:
        print(markdown(res))


def markdown(r):
    def ratio(ours, key, theirs_key):
        theirs = r.get(theirs_key, {}).get(key)
        return f"{ours[key] / theirs:.2f}x" if theirs else "–"
    rows = [f"| {r['size']} train {r['batch']}x{r['seq_len']} | {r['train']['tokens_per_s']:.0f} tok/s, "
            f"{r['train']['ms']:.0f} ms/step, MFU {100 * r['train']['mfu']:.1f}% | "
            f"{r.get('hf_train', {}).get('tokens_per_s', float('nan')):.0f} tok/s | "
            f"{ratio(r['train'], 'tokens_per_s', 'hf_train')} |"]
    for b in (1, 8):
        ours = r[f"sample_b{b}"]
        theirs = r.get(f"hf_sample_b{b}", {})
        rows.append(f"| {r['size']} decode batch {b} | {ours['decode_tokens_per_s']:.0f} tok/s "
                    f"(prefill {ours['prefill_ms']:.0f} ms) | {theirs.get('decode_tokens_per_s', float('nan')):.0f} "
                    f"tok/s (prefill {theirs.get('prefill_ms', float('nan')):.0f} ms) | "
                    f"{ratio(ours, 'decode_tokens_per_s', f'hf_sample_b{b}')} |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
