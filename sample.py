"""Sampling from CodeGen: a fast cached `generate()`, a command-line sampler, and the
paper's conversational (multi-turn) program synthesis as an interactive chat.

How generation works (one call of `generate`):

  1. Prompts are left-padded to a common length T, rounded up to a multiple of 64 (the
     "bucket"), so prompts of 164 different lengths compile only a handful of times.
     `valid_BT` marks the padding; model.forward gives every real token the position it
     would have without padding and hides padded keys from attention.
  2. Prefill (one jitted call): the whole prompt goes through the model once, filling a
     preallocated KV cache of T + bucket(max_new_tokens) slots, and the first token is picked.
  3. Decode (one jitted call): a `jax.lax.while_loop` feeds the last token through the
     cached model, picks the next one, and writes it into a preallocated output buffer.
     It exits as soon as every row has produced EOS or the step budget is spent, so a
     batch that finishes early stops costing work; rows that are done keep riding along
     (a dense batch cannot drop them) but their output is ignored.
  4. Stop strings are text, and text only exists on the host, so with stop strings the
     decode loop runs in chunks of CHUNK tokens: after each chunk the host decodes the
     rows, marks those whose text contains a stop string as done, and resumes the
     loop where it left off (the cache, buffer and step counter stay on the device).
     The final text is cut just before the first stop string.

Picking a token follows Hugging Face's order: temperature, then top-k, then top-p
(nucleus: keep the smallest set of most likely tokens whose probability sums to >= p).
Only the tokenizer's 50,295 real ids can be picked; the model's head is padded to
51,200 (architecture.md §3) and those extra logits are masked.

Defaults of the CLI are those of the paper's sampling script (CodeGen
`jaxformer/hf/sample.py`: temperature 0.2, top-p 0.95, 128 new tokens, seed 42). The chat
follows the MTPB protocol (paper §3, `benchmark/mtpb_sample.py`): each user line becomes
a `# ...` comment, the model writes code after it, the code is cut with the paper's
`truncate` rules, and the program grows turn by turn.

    python sample.py --init-from out/nano --prompt "def fib(n):" --num-samples 4
    python sample.py --init-from codegen-350M-mono --chat
"""
import argparse
import itertools
import os
import re
import sys
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

import data
import model

BUCKET = 64         # prompt and output lengths are rounded up to a multiple of this
CHUNK = 32          # decode steps between host-side stop-string checks
MTPB_PREFIX = "# Import libraries.\n\nimport numpy as np\n\n"  # benchmark/mtpb_sample.py


def _bucket(n):
    return -(-n // BUCKET) * BUCKET


# ----------------------------------------------------------------------------- picking a token


def filter_logits(logits_BV, top_k=0, top_p=1.0):
    """Set to -inf every logit outside the top-k (0 = off), then outside the top-p nucleus
    of what is left (1 = off). Both may be traced values: one compiled program serves all.

    The nucleus is the smallest set of most likely tokens whose total probability is
    >= top_p: a token stays if the probability of the tokens ranked above it is < top_p,
    so the most likely token always stays. Ties at the boundary all stay.
    """
    sorted_BV = -jnp.sort(-logits_BV, axis=-1)                      # most likely first
    rank_V = jnp.arange(logits_BV.shape[-1])
    sorted_BV = jnp.where((top_k == 0) | (rank_V < top_k), sorted_BV, -jnp.inf)
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)                   # renormalised over the top-k
    mass_before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
    keep_BV = ((mass_before_BV < top_p) | (top_p >= 1)) & (sorted_BV > -jnp.inf)  # p = 1: no rounding losses
    smallest_kept_B1 = jnp.min(jnp.where(keep_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits_BV < smallest_kept_B1, -jnp.inf, logits_BV)


def _mode(temperature, top_k, top_p):
    """The static part of the sampling settings; the values themselves are traced, so a
    new temperature, k or p does not recompile."""
    if temperature == 0:
        return "greedy"
    return "filtered" if top_k or top_p < 1 else "sample"


def _argmax(logits_BV):
    """jnp.argmax (the first index of the maximum) as two plain reductions: XLA:CPU does
    not vectorise argmax's paired (value, index) reduction, which took a quarter of
    `nano`'s batch-8 decode step."""
    top_B1 = logits_BV.max(axis=-1, keepdims=True)
    index_V = jnp.arange(logits_BV.shape[-1], dtype=jnp.int32)
    return jnp.min(jnp.where(logits_BV == top_B1, index_V, logits_BV.shape[-1]), axis=-1)


def _pick(logits_BV, key, knobs, mode):
    """Next token per row; knobs = (temperature, top_k, top_p)."""
    n_real = min(logits_BV.shape[-1], data.VOCAB_SIZE)              # the model pads its head to 51,200
    logits_BV = jnp.where(jnp.arange(logits_BV.shape[-1]) < n_real, logits_BV, -jnp.inf)
    if mode == "greedy":
        return _argmax(logits_BV)
    temperature, top_k, top_p = knobs
    logits_BV = logits_BV / temperature
    if mode == "filtered":
        logits_BV = filter_logits(logits_BV, top_k, top_p)
    return jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)


# ----------------------------------------------------------------------------- compiled prefill and decode
# Decode state, all on the device: the KV cache, the output buffer `out_BN` (new tokens,
# EOS after a row is done), `done_B`, and `n`, the number of new tokens so far.
# The random key for new token i is fold_in(key, i), so results do not depend on CHUNK.


@partial(jax.jit, static_argnames=("config", "new_bucket", "mode"))
def _prefill(params, prompt_BT, valid_BT, key, knobs, *, config, new_bucket, mode):
    B, T = prompt_BT.shape
    cache = model.init_cache(config, B, T + new_bucket, params["wte"].dtype)
    # All but the last token only fill the cache: their logits are unused, so XLA drops
    # the (T-1) x vocab head matmul, the largest part of a small model's prefill.
    _, cache = model.forward(params, prompt_BT[:, :-1], config, valid_BT=valid_BT[:, :-1], cache=cache)
    logits_B1V, cache = model.forward(params, prompt_BT[:, -1:], config, cache=cache)  # last token: always real
    tok_B = _pick(logits_B1V[:, 0], jax.random.fold_in(key, 0), knobs, mode)
    out_BN = jnp.full((B, new_bucket), data.EOS, jnp.int32).at[:, 0].set(tok_B)
    return {"cache": cache, "out": out_BN, "done": tok_B == data.EOS, "n": jnp.ones((), jnp.int32)}


@partial(jax.jit, static_argnames=("config", "mode"), donate_argnames=("state",))
def _decode(params, state, limit, key, knobs, *, config, mode):
    """Decode until `n == limit` or every row is done; the state's buffers are reused in place."""
    def not_finished(s):
        return (s["n"] < limit) & ~jnp.all(s["done"])

    def step(s):
        last_B1 = jax.lax.dynamic_slice_in_dim(s["out"], s["n"] - 1, 1, axis=1)
        logits_B1V, cache = model.forward(params, last_B1, config, cache=s["cache"])
        tok_B = _pick(logits_B1V[:, 0], jax.random.fold_in(key, s["n"]), knobs, mode)
        tok_B = jnp.where(s["done"], data.EOS, tok_B)
        out = jax.lax.dynamic_update_slice_in_dim(s["out"], tok_B[:, None], s["n"], axis=1)
        return {"cache": cache, "out": out, "done": s["done"] | (tok_B == data.EOS), "n": s["n"] + 1}

    return jax.lax.while_loop(not_finished, step, state)


# ----------------------------------------------------------------------------- host side


def _check(config, prompts, max_new_tokens, temperature, top_p, top_k, num_samples):
    """One-line ValueErrors for every input a caller can get wrong."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    room = config.n_ctx - max_new_tokens
    for i, p in enumerate(prompts):
        if not isinstance(p, (list, tuple, np.ndarray)):
            raise ValueError(f"prompts must be a list of token-id lists; prompt {i} is {type(p).__name__}")
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty; give at least one token")
        if len(p) > room:
            raise ValueError(f"prompt {i} has {len(p)} tokens but the context holds {config.n_ctx} and "
                             f"max_new_tokens is {max_new_tokens}: keep prompts <= {max(room, 0)} tokens "
                             f"or lower max_new_tokens")
        if min(p) < 0 or max(p) >= config.vocab_size:
            raise ValueError(f"prompt {i} has a token id outside [0, {config.vocab_size})")


def _first_stop(text, stop):
    """Index of the earliest occurrence of any stop string in `text`, or None."""
    hits = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return min(hits) if hits else None


def _sample(params, config, prompts, max_new_tokens, *, temperature=0.0, top_p=1.0, top_k=0, seed=0,
            num_samples=1, stop=(), dtype=None):
    """New token ids per row (prompt-major), ending before EOS. Rows whose text came to
    contain a stop string were stopped early but are NOT cut: they may run up to CHUNK
    tokens past the stop. `generate` and `complete` do the cutting."""
    _check(config, prompts, max_new_tokens, temperature, top_p, top_k, num_samples)
    if not prompts:
        return []
    if dtype is not None:
        params = model.cast(params, dtype)  # once per call, not per token
    params = model.unstack_layers(params)  # a copy per call, unless the caller split them once
    rows = [p for p in prompts for _ in range(num_samples)]
    T = _bucket(max(len(p) for p in rows))
    prompt_BT = np.zeros((len(rows), T), np.int32)
    valid_BT = np.zeros((len(rows), T), bool)
    for i, p in enumerate(rows):                                   # left padding
        prompt_BT[i, T - len(p):] = p
        valid_BT[i, T - len(p):] = True

    how = dict(config=config, mode=_mode(temperature, top_k, top_p))
    args = (jax.random.PRNGKey(seed), (jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p)))
    state = _prefill(params, prompt_BT, valid_BT, *args, new_bucket=_bucket(max_new_tokens), **how)
    tok = data.get_tokenizer() if stop else None
    chunk = CHUNK if stop else max_new_tokens                      # no stop strings: one call does it all
    while True:
        n, done, out = jax.device_get((state["n"], state["done"], state["out"]))
        if stop:
            done = done | np.array([not d and _first_stop(tok.decode(_before_eos(o[:n])), stop) is not None
                                    for d, o in zip(done, out)])
            state["done"] = jnp.asarray(done)
        if n >= max_new_tokens or done.all():
            return [_before_eos(o[:n]) for o in out]
        state = _decode(params, state, jnp.int32(min(n + chunk, max_new_tokens)), *args, **how)


def _before_eos(ids):
    ids = list(map(int, ids))
    return ids[:ids.index(data.EOS)] if data.EOS in ids else ids


def _ids_before(ids, text, tok):
    """The longest prefix of `ids` whose decoded text is a prefix of `text` (binary search:
    a longer prefix of tokens decodes to a longer prefix of text)."""
    lo, hi = 0, len(ids)                                           # ids[:lo] fits; ids[:hi+1] does not
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if text.startswith(tok.decode(ids[:mid], skip_special_tokens=False)):
            lo = mid
        else:
            hi = mid - 1
    return ids[:lo]


def generate(params, config, prompts, max_new_tokens, temperature=0.0, top_p=1.0, top_k=0, seed=0,
             num_samples=1, stop=(), dtype=None):
    """Sample continuations of token-id prompts.

    Returns len(prompts) * num_samples lists of NEW token ids (all samples of prompt 0,
    then of prompt 1, ...), each ending before EOS and, with `stop` strings, cut to the
    tokens whose text ends before the first stop string (a stop string may begin inside a
    token; that token is dropped — use `complete` for exact text). temperature=0 is
    greedy; the same seed gives the same samples. `dtype` (e.g. jnp.bfloat16) casts the
    weights for this call. Decoding reads per-layer weights (model.unstack_layers); callers
    making many calls should cast and split once: model.unstack_layers(model.cast(params, dtype)).
    """
    rows = _sample(params, config, prompts, max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                   seed=seed, num_samples=num_samples, stop=stop, dtype=dtype)
    if not stop:
        return rows
    tok = data.get_tokenizer()
    cut = []
    for ids in rows:
        text = tok.decode(ids, skip_special_tokens=False)
        end = _first_stop(text, stop)
        cut.append(ids if end is None else _ids_before(ids, text[:end], tok))
    return cut


def complete(params, config, texts, max_new_tokens, *, stop=(), temperature=0.0, top_p=1.0, top_k=0, seed=0,
             num_samples=1, dtype=None):
    """Text in, completion text out (ordered as `generate`), cut exactly before the first
    stop string and before `<|endoftext|>`."""
    tok = data.get_tokenizer()
    prompts = [tok.encode(t).ids for t in texts]
    rows = _sample(params, config, prompts, max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                   seed=seed, num_samples=num_samples, stop=stop, dtype=dtype)
    return [_text_before_stop(ids, stop, tok) for ids in rows]


def _text_before_stop(ids, stop, tok):
    text = tok.decode(ids, skip_special_tokens=False)
    end = _first_stop(text, (*stop, "<|endoftext|>"))
    return text if end is None else text[:end]


def truncate(completion):
    """The paper's cut of one turn's code (CodeGen `hf/sample.py` and `benchmark/mtpb_sample.py`,
    eval.md §4.2): at the 2nd line starting with `print`, then at the 2nd line starting
    with `def`, then at the earliest column-0 `#`, `'''` or `\"\"\"`, `<|endoftext|>`, or
    three newlines in a row."""
    for head in ("print", "def"):
        starts = [m.start() for m in re.finditer(f"^{head}", completion, re.MULTILINE)]
        if len(starts) > 1:
            completion = completion[:starts[1]]
    terminals = ("^#", re.escape("<|endoftext|>"), "^'''", '^"""', "\n\n\n")
    hits = [m.start() for m in (re.search(t, completion, re.MULTILINE) for t in terminals) if m]
    return completion[:min(hits)] if hits else completion


# ----------------------------------------------------------------------------- chat

# Texts at which `truncate` is sure to cut at or before, so a turn can stop generating
# there. The cut itself is done by `truncate` on the raw text generated so far, which
# gives exactly what it gives on the full max_new_tokens continuation.
TURN_STOPS = ("\n#", "\n\n\n", "\n'''", '\n"""', "<|endoftext|>")

CHAT_HELP = """\
Type what the program should do next, one line per turn; the model writes the code.
  :show        print the whole program      :run         run it in the sandbox (10 s)
  :undo        drop the last turn           :save FILE   write the program to FILE
  :help        this text                    :quit        end (so does end of input)"""


def chat(write_turn, lines, say=print):
    """The multi-turn loop of the paper's MTPB protocol, driven by `lines` (user input).

    The program starts as MTPB's prefix; a user line L appends `# L\\n`, then
    `write_turn(program)` returns the model's raw continuation, which is cut with
    `truncate` and appended with two newlines. Each turn's code is shown as it is added.
    Returns the final program.
    """
    turns = []                                                     # (comment, code) pairs

    def program():
        return MTPB_PREFIX + "".join(f"{c}{code}\n\n" for c, code in turns)

    for line in lines:
        line = line.strip()
        if not line:
            continue
        command, _, arg = line.partition(" ")
        if command in (":quit", ":exit", ":q"):
            break
        elif command == ":help":
            say(CHAT_HELP)
        elif command == ":show":
            say(program().rstrip("\n"))
        elif command == ":undo":
            say(f"(dropped: {turns.pop()[0].strip()})" if turns else "(nothing to undo)")
        elif command == ":save":
            if not arg.strip():
                say("(usage: :save FILE)")
                continue
            try:
                with open(arg.strip(), "w") as f:
                    f.write(program())
                say(f"(saved {len(program().splitlines())} lines to {arg.strip()})")
            except OSError as e:
                say(f"(could not save: {e.strerror}: {arg.strip()})")
        elif command == ":run":
            import sandbox  # only needed here
            result = sandbox.run(program(), timeout=10)
            for name, text in (("stdout", result.stdout), ("stderr", result.stderr)):
                if text.strip():
                    say(f"--- {name}\n{text.rstrip()}")
            say(f"({result.status}{': ' + result.reason if result.reason else ''}; {result.seconds:.2f} s)")
        elif command.startswith(":"):
            say(f"(unknown command {command}; :help lists them)")
        else:
            comment = f"# {line}\n"
            try:
                code = truncate(write_turn(program() + comment))
            except ValueError as e:                                # e.g. the program outgrew the context
                say(f"(turn not added: {e})")
                continue
            turns.append((comment, code))
            say(f"{comment}{code}\n")
    return program()


# ----------------------------------------------------------------------------- command line


def _die(message):
    """A mistake of the user's: one line on stderr, exit status 2."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def main(argv=None):
    p = argparse.ArgumentParser(description="Sample code from a CodeGen checkpoint, or write a program "
                                "turn by turn with --chat.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--init-from", default=os.path.join("out", "nano"),
                   help="checkpoint directory (Hugging Face CodeGen or written by train.py)")
    p.add_argument("--prompt", default="def helloworld():", help="prompt text")
    p.add_argument("--prompt-file", help="read the prompt from this file instead of --prompt")
    p.add_argument("--num-samples", type=int, default=1, help="completions per prompt")
    p.add_argument("--max-new-tokens", type=int, default=128, help="new tokens per completion (per turn in --chat)")
    p.add_argument("--temperature", type=float, default=0.2, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass; 1 = off")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens; 0 = off")
    p.add_argument("--seed", type=int, default=42, help="random seed (chat turn k uses seed + k)")
    p.add_argument("--stop", action="append", default=[],
                   help=r"stop string, repeatable; \n and \t mean newline and tab (e.g. --stop '\ndef')")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="weights while decoding")
    p.add_argument("--chat", action="store_true", help="multi-turn program synthesis from lines on stdin")
    args = p.parse_args(argv)
    args.stop = [s.replace("\\n", "\n").replace("\\t", "\t") for s in args.stop]

    if not os.path.isdir(args.init_from):
        _die(f"no checkpoint at {args.init_from!r}; run `python train.py` first or pass --init-from DIR")
    try:
        config, params = model.load_hf(args.init_from)
    except (ValueError, OSError) as e:
        _die(e)
    params = model.unstack_layers(model.cast(params, jnp.dtype(args.dtype)))  # once, not per call
    how = dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    tok = data.get_tokenizer()

    if args.chat:
        seeds = itertools.count(args.seed)                         # a fresh draw per turn, replayable

        def write_turn(program):  # raw continuation, ended early at a TURN_STOPS text but not cut there
            prompt = tok.encode(program).ids
            if len(prompt) + args.max_new_tokens > config.n_ctx:
                raise ValueError(f"the program is {len(prompt)} tokens and a turn may add {args.max_new_tokens}, "
                                 f"more than the context of {config.n_ctx}; :undo, :save and start over, "
                                 f"or lower --max-new-tokens")
            ids = _sample(params, config, [prompt], args.max_new_tokens, stop=TURN_STOPS, seed=next(seeds), **how)[0]
            return tok.decode(ids, skip_special_tokens=False)
        interactive = sys.stdin.isatty()
        if interactive:
            print(CHAT_HELP + "\n\n" + MTPB_PREFIX.rstrip("\n"))

        def lines():
            while True:
                try:
                    yield input("> ") if interactive else next(sys.stdin)
                except (EOFError, StopIteration):
                    return
        try:
            chat(write_turn, lines())
        except KeyboardInterrupt:                                  # Ctrl-C ends the session quietly
            print()
        return

    if args.prompt_file:
        try:
            with open(args.prompt_file) as f:
                args.prompt = f.read()
        except OSError as e:
            _die(f"cannot read --prompt-file: {e.strerror}: {args.prompt_file}")
    prompt = tok.encode(args.prompt).ids
    t0 = time.perf_counter()
    try:
        rows = _sample(params, config, [prompt], args.max_new_tokens, stop=args.stop, seed=args.seed,
                       num_samples=args.num_samples, **how)
    except ValueError as e:
        _die(e)
    seconds = time.perf_counter() - t0
    for i, ids in enumerate(rows):
        print(f"{'-' * 30} sample {i + 1}/{len(rows)}")
        print(args.prompt + _text_before_stop(ids, args.stop, tok))
    n_new = sum(map(len, rows))  # tokens generated, including any past a stop string
    print(f"{'-' * 30}\nprompt tokens {len(prompt)}, new tokens {n_new}, {seconds:.2f} s "
          f"(compilation included), {n_new / seconds:.1f} tokens/s")


if __name__ == "__main__":
    main()
