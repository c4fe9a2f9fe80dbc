"""Multi-turn chat: seconds per turn with the KV cache kept between turns (`oss_jax.session.Session`, what
`oss-jax chat` uses) vs the whole conversation prefilled again every turn (`oss_jax.generate.generate`, and HF
transformers `generate`, which is what a chat loop over HF's API does unless it hands a cache over itself).

The conversation is harmony, rendered by `oss_jax.chat` as `oss-jax chat` renders it: a developer message of
--developer-words words (instructions) and one function tool, then --turns user messages of --user-words words each;
every reply is --new-tokens greedy tokens (stop tokens off, so each turn decodes the same number), parsed back into the
conversation the way `oss-jax chat` does (random weights: an empty final message). The replies come from a first,
untimed pass of the session, which also compiles every shape; the timed pass then runs, turn by turn, the session
and a fresh `generate` of the same prompt (same process, interleaved), and the HF worker (its own process) runs
`generate` on the same prompts. Not part of CI.

    python benchmarks/chat.py --workdir /tmp/genbench   # 20b-shaped 2-layer slice (the checkpoint of generate.py)
    python benchmarks/chat.py --tiny                     # the tiny preset (~1 min)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repository root, not benchmarks/ (see generate.py)

from benchmarks.generate import GiB, LazyParams, Timer, bench_config, hf_model, load, peak_rss  # noqa: E402

WORDS = ("the model reads every message of the conversation again unless its keys and values are kept between "
         "turns so a long chat gets slower with each question asked").split()
TOOL = {"name": "lookup", "description": "Look a term up in the project's glossary.",
        "parameters": {"type": "object", "properties": {"term": {"type": "string"}}, "required": ["term"]}}


def text(n_words: int, seed: int) -> str:
    return " ".join(WORDS[(seed + 7 * i) % len(WORDS)] for i in range(n_words))


def worker_ours(args) -> dict:
    import jax.numpy as jnp

    from oss_jax import cli
    from oss_jax.generate import generate
    from oss_jax.model import model_from_params
    from oss_jax.session import Session

    cfg = bench_config(args.tiny)
    model = model_from_params(cfg, LazyParams(args.ckpt), dtype=jnp.float32)
    header = {"role": "developer", "content": text(args.developer_words, 0)}

    def prompt(messages: list[dict]) -> list[int]:
        return cli.conversation_ids({"messages": [header, *messages], "tools": [TOOL]}, "low", "benchmark")

    session, messages, prompts = Session(model), [], []
    for turn in range(args.turns):  # untimed: builds the conversation and compiles every shape both paths use
        messages.append({"role": "user", "content": text(args.user_words, turn + 1)})
        prompts.append(prompt(messages))
        reply = session.generate(prompts[-1], max_new_tokens=args.new_tokens, stop_tokens=())
        generate(model, [prompts[-1]], max_new_tokens=args.new_tokens, stop_tokens=())
        messages += cli.reply_messages(reply)
    session.reset()
    rows = []
    for p in prompts:
        kept, fresh = Timer(), Timer()
        with kept:
            a = session.generate(p, max_new_tokens=args.new_tokens, stop_tokens=())
        with fresh:
            b = generate(model, [p], max_new_tokens=args.new_tokens, stop_tokens=())[0]
        assert a == b, "the session and a fresh generate disagree"
        rows.append({"prompt": len(p), "prefilled": session.prefilled, "session_s": kept.times[0],
                     "fresh_s": fresh.times[0]})
    return {"turns": rows, "prompts": prompts, "peak_rss": peak_rss()}


def worker_hf(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    model = hf_model(args.ckpt, torch.float32)
    prompts = json.loads(args.prompts.read_text())
    rows = []
    with torch.inference_mode():
        model.generate(torch.tensor([prompts[0][:16]]), max_new_tokens=2, do_sample=False, pad_token_id=0)
        for p in prompts:
            timer = Timer()
            with timer:
                model.generate(torch.tensor([p]), max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                               do_sample=False, eos_token_id=None, pad_token_id=0)
            rows.append({"hf_s": timer.times[0]})
    return {"turns": rows, "peak_rss": peak_rss()}


def run_worker(role: str, args, out: Path, extra: list[str] = ()) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", role, "--out", str(out), "--ckpt", str(args.ckpt),
           "--turns", str(args.turns), "--new-tokens", str(args.new_tokens), "--user-words", str(args.user_words),
           "--developer-words", str(args.developer_words), "--threads", str(args.threads), *extra]
    t0 = time.perf_counter()
    print(f"[{role}] running (load average {load()})", flush=True)
    subprocess.run(cmd + (["--tiny"] if args.tiny else []), check=True)
    res = json.loads(out.read_text())
    print(f"[{role}] done in {time.perf_counter() - t0:.0f} s, peak RSS {res['peak_rss'] / GiB:.2f} GiB, load "
          f"average {load()}", flush=True)
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="the tiny preset instead of the 20b-shaped 2-layer slice")
    p.add_argument("--skip-hf", action="store_true", help="only this project (no torch)")
    p.add_argument("--turns", type=int, default=6)
    p.add_argument("--new-tokens", type=int, default=16, help="tokens generated per reply")
    p.add_argument("--user-words", type=int, default=80, help="words per user message")
    p.add_argument("--developer-words", type=int, default=400, help="words of developer instructions")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    p.add_argument("--workdir", type=Path, default=None, help="keep (and reuse) the random checkpoint here")
    p.add_argument("--json", type=Path, default=None, help="also write the summary here")
    p.add_argument("--worker", choices=["ours", "hf"], help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--ckpt", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--prompts", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        args.out.write_text(json.dumps({"ours": worker_ours, "hf": worker_hf}[args.worker](args)))
        return

    from convert.synthetic import make_checkpoint

    with tempfile.TemporaryDirectory(prefix="oss-jax-chatbench-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        args.ckpt = work / ("hf-tiny" if args.tiny else "hf-20b-slice")
        if not (args.ckpt / "config.json").is_file():
            print(f"writing a random checkpoint to {args.ckpt}", flush=True)
            make_checkpoint(bench_config(args.tiny), args.ckpt, seed=0, overwrite=True)
        ours = run_worker("ours", args, work / "chat-ours.json")
        hf = None
        if not args.skip_hf:
            (work / "chat-prompts.json").write_text(json.dumps(ours["prompts"]))
            hf = run_worker("hf", args, work / "chat-hf.json", ["--prompts", str(work / "chat-prompts.json")])
    rows = [{**o, **(h if hf else {})} for o, h in zip(ours["turns"], hf["turns"] if hf else ours["turns"],
                                                          strict=True)]
    print(f"\n{'20b slice' if not args.tiny else 'tiny'} fp32, {args.new_tokens} new tokens per turn: seconds per turn")
    print(f"{'turn':>4} {'prompt':>7} {'prefilled':>9} {'session':>8} {'fresh':>8}" + (f" {'HF':>8}" if hf else "")
          + f" {'fresh/session':>13}" + (f" {'HF/session':>10}" if hf else ""))
    for i, r in enumerate(rows, 1):
        line = f"{i:>4} {r['prompt']:>7} {r['prefilled']:>9} {r['session_s']:>8.2f} {r['fresh_s']:>8.2f}"
        if hf:
            line += f" {r['hf_s']:>8.2f}"
        line += f" {r['fresh_s'] / r['session_s']:>13.2f}"
        if hf:
            line += f" {r['hf_s'] / r['session_s']:>10.2f}"
        print(line)
    total = {k: sum(r[k] for r in rows) for k in ("session_s", "fresh_s") + (("hf_s",) if hf else ())}
    print("all turns: " + ", ".join(f"{k[:-2]} {v:.1f} s" for k, v in total.items())
          + f"; fresh/session {total['fresh_s'] / total['session_s']:.2f}"
          + (f", HF/session {total['hf_s'] / total['session_s']:.2f}" if hf else ""))
    if args.json:
        args.json.write_text(json.dumps({"turns": rows, "total": total}, indent=2))


if __name__ == "__main__":
    main()
