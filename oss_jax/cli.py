"""The `oss-jax` command line: convert, export, make-checkpoint, parity, plan, generate, chat, train, demo."""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

# Parity bounds of the Foundations issue (float32 vs each reference; bf16 KL vs the reference's own bf16 KL).
MAX_ABS_BOUND = 1e-4
KL_RATIO_BOUND = 1.5
EXPERTS = ("packed", "bf16")  # --experts: MXFP4 kept packed on device, or dequantized to dense weights
EXPERTS_HELP = ("packed: MXFP4 experts stay 4-bit on device, decoded inside the step; bf16: dequantized to dense "
                "weights in --dtype (default: packed when the checkpoint stores MXFP4 experts)")


def _config(name_or_path: str):
    from configs import preset_path
    from oss_jax.config import ModelConfig

    return ModelConfig.from_file(preset_path(name_or_path))


DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
CHILD_ENV = "OSS_JAX_DEVICES_CHILD"  # set in a re-run with more host devices: that re-run must not re-run again


def _with_device_count(flags: str, n: int) -> str:
    """XLA_FLAGS with the host device count set to `n` (any earlier count removed)."""
    rest = re.sub(rf"{DEVICE_COUNT_FLAG}=\S*", "", flags).split()
    return " ".join([*rest, f"{DEVICE_COUNT_FLAG}={n}"])


def _provide_host_devices(n: int) -> bool:
    """Give this process `n` (fake) host CPU devices unless jax's backends have started; True when it has `n`."""
    import jax  # importing is fine: the device count is read when the backends start (first jax.devices() or op)

    flags = os.environ.get("XLA_FLAGS", "")
    found = re.search(rf"{DEVICE_COUNT_FLAG}=(\d+)", flags)
    current = jax.config.jax_num_cpu_devices
    if current is None or current < 1:
        current = int(found.group(1)) if found else 1
    if current < n:
        try:
            jax.config.update("jax_num_cpu_devices", n)  # raises once the backends are running
            os.environ["XLA_FLAGS"] = _with_device_count(flags, n)
        except RuntimeError:  # keep the devices there are; the caller re-runs in a fresh process
            pass
    return max(len(jax.devices()), len(jax.devices("cpu"))) >= n


def _run_with_devices(argv: list[str], n: int) -> subprocess.CompletedProcess:
    """Run `oss-jax ARGV` in a fresh process with `n` host devices (jax here started with fewer), output captured."""
    if os.environ.get(CHILD_ENV):
        import jax

        raise ValueError(f"the mesh needs {n} devices and only {len(jax.devices('cpu'))} host devices could be made")
    env = dict(os.environ, XLA_FLAGS=_with_device_count(os.environ.get("XLA_FLAGS", ""), n), **{CHILD_ENV: "1"})
    return subprocess.run([sys.executable, "-m", "oss_jax.cli", *argv], env=env, capture_output=True, text=True)


def _mesh_size(spec: str) -> int:
    from oss_jax.sharding import parse_mesh

    return math.prod(parse_mesh(spec).values())


def cmd_make_checkpoint(args: argparse.Namespace) -> int:
    from convert.synthetic import make_checkpoint

    cfg = _config(args.config)
    t0 = time.perf_counter()
    out = make_checkpoint(cfg, args.out_dir, layout=args.layout, seed=args.seed, packed=not args.dequantized,
                          overwrite=args.overwrite)
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"wrote a random {args.layout}-layout checkpoint ({cfg.num_hidden_layers} layers, {cfg.num_experts} "
          f"experts, {size / 1e6:.1f} MB) to {out} in {time.perf_counter() - t0:.1f}s")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from convert.streaming import convert_checkpoint

    summary = convert_checkpoint(args.src, args.dst, experts=args.experts, dtype=args.dtype,
                                 overwrite=args.overwrite, progress=not args.quiet)
    print(f"converted {args.src} -> {args.dst}: {summary}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from convert.streaming import export_checkpoint

    summary = export_checkpoint(args.src, args.dst, max_shard_bytes=int(args.max_shard_gb * 1e9),
                                overwrite=args.overwrite, progress=not args.quiet)
    print(f"exported {args.src} -> {args.dst} (HF layout): {summary}")
    return 0


def add_convert_parser(sub) -> None:
    """`convert SRC DST` (shared by `oss-jax convert` and `python -m convert`)."""
    c = sub.add_parser("convert", help="safetensors checkpoint (HF or original/ layout) -> Orbax checkpoint")
    c.add_argument("src", type=Path, help="HF-layout directory (a Hub download) or an original/ directory")
    c.add_argument("dst", type=Path, help="output directory (Orbax params + config + tokenizer files)")
    c.add_argument("--experts", choices=("packed", "bf16", "fp32"), default="packed",
                   help="store experts as shipped (MXFP4 blocks+scales, lossless; default) or dequantized")
    c.add_argument("--dtype", choices=("bf16", "fp32"), default=None,
                   help="cast the other weights (default: keep the checkpoint's dtype)")
    c.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    c.set_defaults(func=cmd_convert)


def parity_verdict(report: dict) -> list[str]:
    """The bounds a parity report violates (empty when it passes)."""
    failures = []
    for ref in ("vs_openai_ref", "vs_hf"):
        if report[ref]["max_abs"] > MAX_ABS_BOUND:
            failures.append(f"{ref}: max |Δlogit| {report[ref]['max_abs']:.3g} > {MAX_ABS_BOUND:g}")
        if report[ref]["top1"] < 1.0:
            failures.append(f"{ref}: top-1 agreement {report[ref]['top1']:.4f} < 1")
    bf16 = report.get("bf16")
    if bf16 and bf16["kl_ours"] > KL_RATIO_BOUND * bf16["kl_ref"]:
        failures.append(f"bf16: KL ours {bf16['kl_ours']:.3g} > {KL_RATIO_BOUND} x KL ref {bf16['kl_ref']:.3g}")
    return failures


def _print_parity(report: dict) -> None:
    s = report["shape"]
    mesh = ", ".join(f"{k}={v}" for k, v in report.get("mesh", {}).items())
    print(f"parity on batch {s['batch']} x {s['seq_len']} tokens, {s['layers']} layers, {s['experts']} experts "
          f"({report.get('experts', 'bf16')}), "
          f"vocab {s['vocab']} (reference logit std {report['logit_std']:.2f}), float32"
          f"{f', ours sharded on mesh {mesh}' if mesh else ''}:")
    for key, label in (("vs_openai_ref", "ours vs OpenAI reference"), ("vs_hf", "ours vs HF transformers"),
                       ("hf_vs_openai_ref", "HF vs OpenAI reference (their own gap)")):
        r = report[key]
        print(f"  {label:<40} max |Δlogit| {r['max_abs']:.3e}   top-1 {100 * r['top1']:.1f}%")
    if "bf16" in report:
        b = report["bf16"]
        print(f"  bf16: KL(ref fp32 || ours bf16) {b['kl_ours']:.3e}  vs  KL(ref fp32 || ref bf16) {b['kl_ref']:.3e}")


def _parity_argv(args: argparse.Namespace) -> list[str]:
    """The command line of this parity run (for a re-run with more host devices)."""
    argv = ["parity", "--ckpt", str(args.ckpt)] if args.ckpt else ["parity", "--config", args.config]
    argv += ["--seed", str(args.seed), "--batch", str(args.batch), "--mesh", args.mesh]
    argv += ["--seq-len", str(args.seq_len)] if args.seq_len else []
    argv += ["--experts", args.experts] if args.experts else []
    return argv + ["--no-bf16"] * args.no_bf16 + ["--json"] * args.json


def cmd_parity(args: argparse.Namespace) -> int:
    mesh = None
    if args.mesh:
        n = _mesh_size(args.mesh)
        if not _provide_host_devices(n):
            child = _run_with_devices(_parity_argv(args), n)
            sys.stdout.write(child.stdout)
            sys.stderr.write(child.stderr)
            return child.returncode
        from oss_jax.plan import mesh_devices
        from oss_jax.sharding import make_mesh, parse_mesh

        mesh = make_mesh(parse_mesh(args.mesh), mesh_devices(n))
    from oss_jax.parity import run_parity

    config = None if args.ckpt else _config(args.config)
    report = run_parity(config=config, ckpt=args.ckpt, seed=args.seed, batch=args.batch, seq_len=args.seq_len,
                        bf16=not args.no_bf16, mesh=mesh, experts=args.experts)
    failures = parity_verdict(report)
    report["pass"] = not failures
    if args.json:
        print(json.dumps(report))
    else:
        _print_parity(report)
        print("PASS" if not failures else "FAIL:\n  " + "\n  ".join(failures))
    return 0 if not failures else 1


def _plan_argv(args: argparse.Namespace) -> list[str]:
    """The command line of this plan (for a re-run with more host devices), asking for JSON."""
    argv = ["plan", "--model", args.model, "--mesh", args.mesh, "--seq-len", str(args.seq_len), "--dtype",
            args.dtype, "--step", args.step, "--experts", args.experts, "--json"]
    return argv + (["--batch", str(args.batch)] if args.batch else [])


def cmd_plan(args: argparse.Namespace) -> int:
    from oss_jax import plan

    step = "train" if args.train else args.step
    plan.step_builder(step)  # a step that does not exist yet fails here, before any device or compile
    cfg = _config(args.model)
    n = _mesh_size(args.mesh)
    if not _provide_host_devices(n):  # jax already started with fewer devices: plan in a fresh process
        child = _run_with_devices(_plan_argv(args), n)
        sys.stderr.write(child.stderr)
        if child.returncode:
            return child.returncode
        result = json.loads(child.stdout)
    else:
        from oss_jax.sharding import make_mesh, parse_mesh

        mesh = make_mesh(parse_mesh(args.mesh), plan.mesh_devices(n))
        result = plan.plan(cfg, mesh, step=step, batch=args.batch, seq_len=args.seq_len, dtype=args.dtype,
                           experts=args.experts).as_dict()
    result = {"model": args.model, **result}
    print(json.dumps(result) if args.json else plan.format_plan(result, args.model))
    return 0


def cli_mesh(spec: str | None):
    """The mesh a --mesh flag names (host devices made up as needed), or None without one."""
    if not spec:
        return None
    from oss_jax.sharding import make_mesh, parse_mesh

    n = _mesh_size(spec)
    if not _provide_host_devices(n):
        raise ValueError(f"mesh {spec!r} needs {n} devices; jax already started with fewer")
    return make_mesh(parse_mesh(spec))


def load_model(ckpt: Path, mesh_spec: str | None = None, dtype: str = "fp32", experts: str | None = None):
    """A converted (Orbax) or safetensors checkpoint directory -> the model, sharded on the mesh when one is named.

    `experts`: 'packed' (MXFP4 kept on device) or 'bf16' (dequantized, dense in `dtype`); default packed when the
    checkpoint stores MXFP4 experts.
    """
    import jax.numpy as jnp

    mesh = cli_mesh(mesh_spec)
    jdtype = jnp.bfloat16 if dtype == "bf16" else jnp.float32
    t0 = time.perf_counter()
    if (Path(ckpt) / "params").is_dir():
        from oss_jax.checkpoint import load, stores_packed

        experts = experts or ("packed" if stores_packed(ckpt) else "bf16")
        print(f"loading {ckpt} (Orbax, experts {experts}){' onto mesh ' + mesh_spec if mesh_spec else ''} ...",
              file=sys.stderr)
        model = load(ckpt, mesh=mesh, dtype=jdtype, experts=experts)
    else:
        model = _load_safetensors(ckpt, mesh, jdtype, experts, mesh_spec)
    print(f"loaded in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return model


def _load_safetensors(ckpt: Path, mesh, dtype, experts: str | None, mesh_spec: str | None):
    """A safetensors checkpoint -> the model (read on the host in float32, then placed; packed: MXFP4 re-packed)."""
    from convert.reader import CheckpointReader, load_params
    from oss_jax.model import model_from_params
    from oss_jax.packed import pack_params, shard_packed
    from oss_jax.sharding import shard_model

    stored_packed = CheckpointReader(ckpt).packed
    experts = experts or ("packed" if stored_packed else "bf16")
    if experts == "packed" and not stored_packed:
        raise ValueError(f"{ckpt}: experts are stored dequantized; --experts packed needs MXFP4 experts")
    print(f"loading {ckpt} (safetensors, experts {experts}){' onto mesh ' + mesh_spec if mesh_spec else ''} ...",
          file=sys.stderr)
    cfg, params = load_params(ckpt)
    packed = experts == "packed"
    model = model_from_params(cfg, pack_params(params) if packed else params, dtype=dtype, packed_experts=packed)
    if mesh is not None:
        shard_model(model, mesh)
        shard_packed(model, mesh)
    return model


def _stop_string_watcher(tok, n: int, stop_strings: list[str]):
    """on_token callback: stop a row once its decoded text contains one of `stop_strings`."""
    texts = [""] * n

    def watch(new, done):
        for i in range(n):
            if not done[i]:
                texts[i] += tok.decode([int(new[i])], skip_special_tokens=False)
        return np.array([any(s in t for s in stop_strings) for t in texts])
    return watch


def run_generate(model, ckpt: Path, labels: list[str], chat_ids: list[list[int]] | None, *, max_new_tokens: int,
                 sampling, stream: bool = False, stop_strings: list[str] | None = None) -> list[dict]:
    """Generate from harmony prompt ids (`chat_ids`, one per label), or from the labels as raw text when `chat_ids`
    is None; decode, and parse chat completions into channels and tool calls. One dict per prompt."""
    from oss_jax import chat
    from oss_jax.generate import STOP_TOKENS, generate
    from oss_jax.tokenizer import load_tokenizer

    tok = load_tokenizer(ckpt)
    raw = chat_ids is None
    ids = [tok.encode(p, add_special_tokens=False).ids for p in labels] if raw else chat_ids
    watch = _stop_string_watcher(tok, len(ids), stop_strings) if stop_strings else None
    on_token = watch
    if stream and len(ids) == 1:
        def on_token(new, done):
            if not done[0]:
                print(tok.decode([int(new[0])], skip_special_tokens=False), end="", flush=True)
            return watch(new, done) if watch else None
    outs = generate(model, ids, max_new_tokens=max_new_tokens, sampling=sampling,
                    stop_tokens=() if raw else STOP_TOKENS, on_token=on_token)
    if on_token is not None:
        print()
    results = []
    for label, prompt_ids, new in zip(labels, ids, outs, strict=True):
        result = {"prompt": label, "prompt_tokens": len(prompt_ids), "tokens": new,
                  "text": tok.decode(new, skip_special_tokens=False)}
        if not raw:
            try:
                parsed = chat.parse_completion(new)
                result |= {k: parsed[k] for k in ("final", "analysis", "tool_calls", "messages")}
            except Exception as e:  # harmony refuses malformed completions (random weights produce them)
                result |= {"final": None, "tool_calls": [], "parse_error": str(e)}
        results.append(result)
    return results


def _json_file(path: Path) -> object:
    """The JSON value in `path`; bad JSON -> ValueError naming the file and line."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None


def _tools_file(path: Path | None) -> list[dict] | None:
    """--tools FILE: a JSON list of function tools ({name, description, parameters} or OpenAI's {type: function,
    function: {...}}), or an object holding one under "tools"; checked before any model is loaded."""
    if path is None:
        return None
    from oss_jax import data

    tools = _json_file(path)
    tools = tools.get("tools") if isinstance(tools, dict) else tools
    if not (isinstance(tools, list) and tools):
        raise ValueError(f"{path}: expected a non-empty JSON list of tool objects (or {{\"tools\": [...]}})")
    try:
        data.check_tools(tools)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return tools


def conversation_ids(record: dict, reasoning: str, source: str) -> list[int]:
    """{"messages": [...], "tools": [...]} (the training data's format, `oss_jax.data`) -> prompt ids for the
    assistant's next message; bad messages or tools -> ValueError naming `source`."""
    from oss_jax import chat, data

    try:
        return chat.completion_ids(data.conversation(record, reasoning))
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None


def chat_requests(args: argparse.Namespace) -> tuple[list[str], list[list[int]] | None]:
    """`generate`'s prompts as (labels, harmony prompt ids; None with --raw), checked before any model is loaded."""
    if bool(args.prompt) == bool(args.conversation):
        raise ValueError("give either --prompt TEXT or --conversation FILE (each repeatable for a batch)")
    if args.raw:
        if args.conversation or args.developer or args.tools:
            raise ValueError("--raw feeds plain text: it takes no --conversation, --developer or --tools")
        return args.prompt, None
    if args.conversation:
        if args.developer or args.tools:
            raise ValueError("a --conversation file holds its own developer message and tools: no --developer/--tools")
        records = []
        for path in args.conversation:
            record = _json_file(path)
            record = {"messages": record} if isinstance(record, list) else record
            if not isinstance(record, dict) or "messages" not in record:
                raise ValueError(f"{path}: expected {{\"messages\": [...], \"tools\": [...]}} or a list of messages")
            records.append((str(path), record))
    else:
        tools = _tools_file(args.tools)
        developer = [{"role": "developer", "content": args.developer}] if args.developer else []
        records = [(p, {"messages": developer + [{"role": "user", "content": p}], "tools": tools})
                   for p in args.prompt]
    return [label for label, _ in records], [conversation_ids(r, args.reasoning, label) for label, r in records]


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The checkpoint and how to hold it (`generate`, `chat`)."""
    p.add_argument("--ckpt", type=Path, required=True, help="converted (Orbax) or safetensors checkpoint directory")
    p.add_argument("--mesh", default=None, help="mesh preset or spec, e.g. expert=8 (default: one device)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="parameter and matmul dtype")
    p.add_argument("--experts", choices=EXPERTS, default=None, help=EXPERTS_HELP)


def add_sampling_args(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    """Reasoning effort and sampling (`generate`, `chat`)."""
    p.add_argument("--reasoning", choices=("low", "medium", "high"), default="medium")
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (0 = all)")
    p.add_argument("--top-p", type=float, default=1.0, help="sample among the likeliest tokens of this total mass")
    p.add_argument("--seed", type=int, default=0)


def sampling_of(args: argparse.Namespace):
    """`add_sampling_args`' flags as a `generate.Sampling`."""
    from oss_jax.generate import Sampling

    return Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)


def cmd_generate(args: argparse.Namespace) -> int:
    labels, chat_ids = chat_requests(args)
    model = load_model(args.ckpt, args.mesh, args.dtype, args.experts)
    sampling = sampling_of(args)
    results = run_generate(model, args.ckpt, labels, chat_ids, max_new_tokens=args.max_new_tokens,
                           sampling=sampling, stream=not args.json, stop_strings=args.stop)
    if args.json:
        print(json.dumps(results))
    else:
        for r in results:
            if len(results) > 1:
                print(f"--- {r['prompt']!r}\n{r['text']}")
            for call in r.get("tool_calls", []):
                print(f"tool call: {call['recipient']} {json.dumps(call['arguments'])}")
            if r.get("final") is not None:
                print(f"final: {r['final']}")
    return 0


def _channel_printer(show_reasoning: bool):
    """on_token callback: feed harmony's streaming parser, print the final channel (and analysis if asked)."""
    from openai_harmony import Role, StreamableParser

    from oss_jax import chat

    parser = StreamableParser(chat.encoding(), Role.ASSISTANT, strict=False)
    state = {"channel": None}

    def on_token(new, done):
        if done[0]:
            return None
        try:
            parser.process(int(new[0]))
        except Exception:  # malformed output (e.g. random weights): nothing printable on a channel
            return None
        channel, delta = parser.current_channel, parser.last_content_delta
        if delta and (channel == "final" or (show_reasoning and channel == "analysis")):
            if channel != state["channel"]:
                print(f"\n[{channel}] ", end="")
                state["channel"] = channel
            print(delta, end="", flush=True)
        return None
    return on_token


def reply_messages(tokens: list[int]) -> list[dict]:
    """A completion's messages as conversation dicts (analysis, tool calls, final); output harmony cannot parse
    (random weights) -> one empty final message, so that the conversation stays well-formed."""
    from oss_jax import chat

    try:
        parsed = chat.parse_completion(tokens)["messages"]
    except Exception:
        parsed = []
    return [{k: v for k, v in m.items() if v is not None} for m in parsed] or \
        [{"role": "assistant", "channel": "final", "content": ""}]


def chat_turn(messages: list[dict], complete, tool_result) -> None:
    """One assistant turn, appended to `messages`: `complete(messages)` -> completion ids; after each tool call the
    caller's `tool_result(call)` (a string: nothing is executed here) goes back to the model, which goes on."""
    while True:
        replies = reply_messages(complete(messages))
        messages += replies
        calls = [m for m in replies if m["role"] == "assistant" and m.get("recipient")]
        if not calls:
            return
        messages += [{"role": "tool", "name": c["recipient"], "content": tool_result(c)} for c in calls]


def cmd_chat(args: argparse.Namespace) -> int:
    from oss_jax.generate import STOP_TOKENS
    from oss_jax.session import Session

    tools = _tools_file(args.tools)
    header = [{"role": "developer", "content": args.system}] if args.system else []
    model = load_model(args.ckpt, args.mesh, args.dtype, args.experts)
    sampling = sampling_of(args)
    session = Session(model)  # keeps the KV cache: each turn prefills only what the last one did not

    def complete(messages: list[dict]) -> list[int]:
        ids = conversation_ids({"messages": header + messages, "tools": tools}, args.reasoning, "the conversation")
        print("assistant>", end="", flush=True)
        t0 = time.perf_counter()
        new = session.generate(ids, max_new_tokens=args.max_new_tokens, sampling=sampling, stop_tokens=STOP_TOKENS,
                               on_token=_channel_printer(args.show_reasoning))
        print()
        print(f"[{session.reused} cached tokens reused, {session.prefilled} prefilled, {len(new)} generated in "
              f"{time.perf_counter() - t0:.1f} s]", file=sys.stderr)
        return new

    def tool_result(call: dict) -> str:
        print(f"[tool call] {call['recipient']} {call['content']}")
        return input(f"{call['recipient']} result> ")

    messages: list[dict] = []
    print("chat with the model: an empty line does nothing, Ctrl-C stops a reply, /save FILE writes the conversation "
          "(the fine-tuning data's format, which generate --conversation continues), /reset starts over, /exit (or "
          "Ctrl-D) leaves; tools are not executed: you type each tool call's result")
    try:
        while True:
            line = input("\nyou> ").strip()
            if line in ("/exit", "/quit"):
                break
            if line == "/reset":
                messages.clear()
                session.reset()
                print("[a new conversation]")
            elif line.startswith("/save"):
                _save_conversation(line.removeprefix("/save").strip(), header + messages, tools)
            elif line:
                before = len(messages)
                messages.append({"role": "user", "content": line})
                try:
                    chat_turn(messages, complete, tool_result)
                except KeyboardInterrupt:
                    del messages[before:]  # the conversation goes on as if this turn had not been asked
                    print("\n[stopped: this turn was dropped from the conversation]")
    except EOFError:
        pass
    return 0


def _save_conversation(path: str, messages: list[dict], tools: list[dict] | None) -> None:
    """/save FILE: the conversation as one record of the fine-tuning data's format on one line (a .jsonl of one
    example, or JSON for generate --conversation), written atomically."""
    from oss_jax.files import write_text_atomic

    if not path:
        print("[usage: /save FILE]")
        return
    record = {"messages": messages, **({"tools": tools} if tools else {})}
    try:
        write_text_atomic(path, json.dumps(record, ensure_ascii=False) + "\n")
    except OSError as e:
        print(f"[not saved: {e}]")
        return
    print(f"[saved {len(messages)} messages to {path}]")


def cmd_train(args: argparse.Namespace) -> int:
    from oss_jax import finetune
    from oss_jax.train import TrainConfig

    overrides = {"steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len,
                 "learning_rate": args.lr, "lora_rank": args.lora_rank, "remat": args.remat,
                 "compute_dtype": args.compute_dtype, "train_on": args.train_on, "seed": args.seed,
                 "save_every": args.save_every}
    if args.resume and args.config is None and (args.out / finetune.CONFIG).is_file():
        stored = json.loads((args.out / finetune.CONFIG).read_text())["train"]
        tc = TrainConfig.from_dict(stored | {k: v for k, v in overrides.items() if v is not None})
    elif args.config is not None:
        tc = TrainConfig.from_file(_train_config_path(args.config), **overrides)
    else:
        tc = TrainConfig.from_dict({k: v for k, v in overrides.items() if v is not None})
    last = finetune.fit(args.ckpt, args.data, args.out, tc, mesh=cli_mesh(args.mesh), resume=args.resume,
                        skip_bad=args.skip_bad)
    print(json.dumps(last) if args.json else
          f"step {last.get('step')}: loss {last.get('loss', float('nan')):.4f}; {last['examples']} examples, "
          f"{last['skipped']} bad lines skipped; weights in {args.out / finetune.FINAL} "
          f"(serve with `oss-jax generate --ckpt {args.out / finetune.FINAL}`, export with `oss-jax export`)")
    return 0


def _train_config_path(name_or_path: str) -> Path:
    """configs/train/NAME.json for a preset name, else the path itself."""
    from configs import preset_path

    path = Path(name_or_path)
    return path if path.suffix == ".json" or path.exists() else Path(preset_path(f"train/{name_or_path}"))


def cmd_demo(args: argparse.Namespace) -> int:
    from convert.streaming import convert_checkpoint
    from convert.synthetic import make_checkpoint
    from oss_jax.generate import Sampling

    _provide_host_devices(8)
    cfg = _config("tiny")
    out = Path(args.out_dir)
    print(f"[1/4] writing a tiny random gpt-oss checkpoint ({cfg.num_hidden_layers} layers, {cfg.num_experts} "
          f"experts, real o200k_harmony tokenizer) in the HF layout with MXFP4 experts: {out}/hf")
    hf_dir = make_checkpoint(cfg, out / "hf", layout="hf", seed=0, overwrite=True)
    print(f"[2/4] converting it to an Orbax checkpoint: {out}/orbax")
    summary = convert_checkpoint(hf_dir, out / "orbax", overwrite=True, progress=False)
    print(f"      {summary}")
    print(f"[3/4] restoring it sharded on 8 CPU devices (mesh data=2, expert=4), experts {args.experts or 'packed'}")
    model = load_model(out / "orbax", "data=2,expert=4", experts=args.experts)
    prompt = "What is the capital of France?"
    print(f"[4/4] harmony chat, reasoning low, greedy, 24 new tokens, for: {prompt!r}")
    print("      (random weights, so the answer is gibberish; the pipeline is the real one)")
    ids = conversation_ids({"messages": [{"role": "user", "content": prompt}]}, "low", "the demo prompt")
    r = run_generate(model, out / "orbax", [prompt], [ids], max_new_tokens=24, sampling=Sampling())[0]
    print(f"      prompt: {r['prompt_tokens']} tokens; generated ids: {r['tokens']}")
    print(f"      text: {r['text']!r}")
    print("\nWith a real checkpoint (downloaded elsewhere, e.g. `huggingface-cli download openai/gpt-oss-20b`):")
    print("  oss-jax convert gpt-oss-20b gpt-oss-20b-jax")
    print("  oss-jax generate --ckpt gpt-oss-20b-jax --mesh expert=8 --reasoning low --prompt 'Hello!'")
    print("  oss-jax parity --ckpt gpt-oss-20b      # logits vs OpenAI's reference and HF transformers")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="oss-jax", description="gpt-oss in JAX/Flax")
    sub = p.add_subparsers(dest="command", required=True)

    add_convert_parser(sub)

    e = sub.add_parser("export", help="Orbax checkpoint directory -> HF-layout safetensors (transformers/vLLM)")
    e.add_argument("src", type=Path, help="a directory written by `oss-jax convert` (or training)")
    e.add_argument("dst", type=Path, help="output HF-layout directory")
    e.add_argument("--max-shard-gb", type=float, default=5.0, help="largest safetensors shard (default 5 GB)")
    e.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.set_defaults(func=cmd_export)

    m = sub.add_parser("make-checkpoint", help="write a random gpt-oss checkpoint of any config")
    m.add_argument("out_dir", type=Path)
    m.add_argument("--config", required=True, help="preset name (tiny, gpt-oss-20b, ...) or path to a config.json")
    m.add_argument("--layout", choices=("hf", "original"), default="hf")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--dequantized", action="store_true", help="HF layout with bf16 experts (as save_pretrained)")
    m.add_argument("--overwrite", action="store_true")
    m.set_defaults(func=cmd_make_checkpoint)

    q = sub.add_parser("parity", help="compare logits with OpenAI's torch reference and HF transformers")
    src = q.add_mutually_exclusive_group()
    src.add_argument("--config", default="tiny", help="preset or config.json: a random checkpoint is generated")
    src.add_argument("--ckpt", type=Path, help="an existing checkpoint directory (HF or original layout)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--batch", type=int, default=2)
    q.add_argument("--seq-len", type=int, default=None, help="default: sliding window + 13")
    q.add_argument("--no-bf16", action="store_true", help="skip the bf16 KL comparison")
    q.add_argument("--json", action="store_true", help="print the measured numbers as JSON")
    q.add_argument("--mesh", default=None,
                   help="run our model sharded on this mesh: a preset (ep8, ...) or data=2,expert=4 (fake CPU "
                        "devices are made as needed)")
    q.add_argument("--experts", choices=EXPERTS, default=None, help=EXPERTS_HELP)
    q.set_defaults(func=cmd_parity)

    n = sub.add_parser("plan", help="per-device memory of the full-size model's step on a mesh, compiled ahead "
                                    "of time from abstract shapes (nothing allocated)")
    n.add_argument("--model", required=True, help="preset (tiny, gpt-oss-20b, gpt-oss-120b) or a config.json")
    n.add_argument("--mesh", required=True, help="mesh preset from configs/mesh (ep8, tpu64, ...) or data=2,expert=4")
    n.add_argument("--batch", type=int, default=None, help="default: one sequence per data/fsdp shard")
    n.add_argument("--seq-len", type=int, default=4096)
    n.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="parameter and matmul dtype")
    n.add_argument("--experts", choices=EXPERTS, default="bf16",
                   help="bf16: dense expert kernels in --dtype (default); packed: MXFP4 blocks + scales, as the "
                        "published checkpoints ship them")
    n.add_argument("--step", choices=("prefill", "decode", "train", "train-lora"), default="prefill",
                   help="prefill: forward over --seq-len tokens; decode: one token against a --seq-len KV cache; "
                        "train: an AdamW step (master weights in --dtype, block remat, bf16 compute); train-lora: "
                        "rank-16 LoRA on attention, base frozen")
    n.add_argument("--train", action="store_true", help="same as --step train")
    n.add_argument("--json", action="store_true", help="print the plan as JSON")
    n.set_defaults(func=cmd_plan)

    g = sub.add_parser("generate", help="generate from a checkpoint (harmony chat, or --raw text)")
    add_model_args(g)
    g.add_argument("--prompt", action="append", help="a user message (repeat for a batch)")
    g.add_argument("--conversation", action="append", type=Path,
                   help='instead of --prompt: a JSON file {"messages": [...], "tools": [...]} (the format of '
                        "`oss-jax train` data) whose next assistant message is generated; repeat for a batch")
    g.add_argument("--developer", help="developer instructions (with --prompt)")
    g.add_argument("--tools", type=Path, help="JSON file: a list of function tools the model may call (with --prompt)")
    add_sampling_args(g, max_new_tokens=256)
    g.add_argument("--raw", action="store_true", help="feed the prompt as plain text, no chat format")
    g.add_argument("--json", action="store_true",
                   help="print per prompt as JSON: token ids, text, and the parsed final, analysis, tool calls and "
                        "messages")
    g.add_argument("--stop", action="append", default=None, help="stop a prompt's output at this text (repeatable)")
    g.set_defaults(func=cmd_generate)

    ch = sub.add_parser("chat", help="interactive harmony chat with a checkpoint (executes no tools)")
    add_model_args(ch)
    ch.add_argument("--system", default=None, help="developer instructions")
    ch.add_argument("--tools", type=Path, help="JSON file: function tools the model may call (you type the results)")
    ch.add_argument("--show-reasoning", action="store_true", help="also stream the analysis channel")
    add_sampling_args(ch, max_new_tokens=512)
    ch.set_defaults(func=cmd_chat)

    t = sub.add_parser("train", help="fine-tune a converted checkpoint on JSONL conversations or text (optax)")
    t.add_argument("--ckpt", type=Path, required=True, help="converted checkpoint directory (oss-jax convert)")
    t.add_argument("--data", type=Path, required=True, help="JSONL ({'messages': [...]} or {'text': ...}) or .txt")
    t.add_argument("--out", type=Path, required=True, help="run directory: checkpoints, metrics.jsonl, final/")
    t.add_argument("--config", help="training preset name (configs/train/) or JSON file; flags below override it")
    t.add_argument("--steps", type=int)
    t.add_argument("--batch-size", type=int)
    t.add_argument("--seq-len", type=int)
    t.add_argument("--lr", type=float, help="peak learning rate")
    t.add_argument("--lora-rank", type=int, help="train LoRA adapters of this rank instead of every weight")
    t.add_argument("--remat", choices=["none", "block", "dots"])
    t.add_argument("--compute-dtype", choices=["float32", "bfloat16"])
    t.add_argument("--train-on", choices=["assistant", "final", "all"])
    t.add_argument("--seed", type=int)
    t.add_argument("--save-every", type=int)
    t.add_argument("--mesh", help="mesh preset or spec, e.g. fsdp8 or data=2,expert=4")
    t.add_argument("--resume", action="store_true", help="continue RUN_DIR from its latest checkpoint")
    t.add_argument("--skip-bad", action="store_true", help="skip (and count) bad data lines instead of stopping")
    t.add_argument("--json", action="store_true", help="print the last step's metrics as JSON")
    t.set_defaults(func=cmd_train)

    d = sub.add_parser("demo", help="tiny checkpoint -> convert -> restore sharded on 8 devices -> generate")
    d.add_argument("--out-dir", default="oss-jax-demo")
    d.add_argument("--experts", choices=EXPERTS, default=None, help=EXPERTS_HELP)
    d.set_defaults(func=cmd_demo)
    return p


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    # XLA's C++ warnings (e.g. SPMD resharding notes) drown the CLI's own output; TF_CPP_MIN_LOG_LEVEL=0 shows them
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    args = build_parser().parse_args(argv)
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        # Ctrl-C and `kill` must unwind (and clean temporary output) even where the shell started us ignoring them
        handlers = {s: signal.signal(s, _interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"oss-jax {args.command}: interrupted; nothing was left half-written", file=sys.stderr)
        return 130
    except (ValueError, OSError) as e:
        print(f"oss-jax {args.command}: error: {e}", file=sys.stderr)
        return 2
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)


if __name__ == "__main__":
    sys.exit(main())
