"""What one decode (or prefill) step launches on a GPU, counted without one: XLA:GPU compiles the step for a GPU's
published spec (deviceless, ahead of time) and the compiled program's top-level instructions are counted.

At decode, a step is hundreds of small kernels: their count sets the host's cost of issuing a step and a floor of
a few microseconds each on the device (on an H100, 20b at batch 1: ~740 small launches took ~1.2 ms of a 4.26 ms
step). This script makes that count a number any machine can reproduce:

    python -m venv --system-site-packages /tmp/gpuvenv && . /tmp/gpuvenv/bin/activate
    pip install "jax-cuda12-plugin[with-cuda]==$(python -c 'import jax; print(jax.__version__)')"   # ~5 GB
    python benchmarks/gpu_launches.py --model gpt-oss-20b --batch 1 --outputs 8
    python benchmarks/gpu_launches.py --model gpt-oss-120b --batch 8 --hlo /tmp/hlo.txt --show 80

Printed: launches per step by kind (fusion, custom-call: the Pallas kernels, copy, ...) and per layer; with
--outputs N the bytes all launches write and the N kinds of launch that write the most (a float32 intermediate
written out and read back shows up there: it is how k's and v's one-row products were found, 283 of 387 MB a 20b
batch-1 step); with --show N the first N launches in program order (name, shape, the jax operation that made
it). A separate environment keeps the CUDA plugin away from the project's (with it, jax looks for a GPU at start
and warns without one).

The counts are XLA's decisions for this spec; what needs the hardware is not here: without autotuning, GEMM
fusions take heuristic tilings (on a GPU, measured ones: split-K pads seen here may not be chosen there), and the
device time of anything. For 20b decode at batch 1 (2026-11-26's code), an H100's profile counted 882 launches
per step (jax 0.11.2 there) and this script 853 (jax 0.10.2): some instructions launch more than one kernel.
"""

from __future__ import annotations

import argparse
import collections
import math
import os
import re
import sys
from pathlib import Path

if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repository root, not benchmarks/ (convert.py)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from configs import preset_path  # noqa: E402
from oss_jax import generate  # noqa: E402
from oss_jax.cache import init_cache  # noqa: E402
from oss_jax.config import ModelConfig  # noqa: E402
from oss_jax.model import abstract_model  # noqa: E402

# GPU specs as XLA's device description (GpuTargetConfigProto fields): the published figures of each card
SPECS = {
    "h100-sxm": {"name": "NVIDIA H100 80GB HBM3", "major": 9, "cores": 132, "bandwidth": 3_352_320_000_000,
                 "l2": 50 * 2**20, "clock_ghz": 1.98, "memory": 84_978_434_048, "smem_per_core": 228 * 2**10,
                 "smem_optin": 227 * 2**10},
}
SKIPPED = ("parameter", "constant", "tuple", "get-tuple-element", "bitcast")  # no kernel of their own
_INSTRUCTION = re.compile(r"\s*(?:ROOT )?%?(\S+) = (\([^()]*\)|\S+) ([a-z][\w.-]*)\((.*)")


def target_config(spec: dict) -> str:
    """The spec as the text proto `--xla_gpu_target_config_filename` (and the CUDA plugin's topology) reads."""
    return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: {spec['smem_per_core']}
  threads_per_core_limit: 2048
  core_count: {spec['cores']}
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {spec['bandwidth']}
  l2_cache_size: {spec['l2']}
  clock_rate_ghz: {spec['clock_ghz']}
  device_memory_size: {spec['memory']}
  shared_memory_per_block_optin: {spec['smem_optin']}
  cuda_compute_capability {{ major: {spec['major']} }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
device_description_str: "{spec['name']}"
"""


def entry_instructions(text: str) -> list[tuple[str, str, str, str]]:
    """(name, shape, opcode, rest of the line) of each top-level instruction of a compiled HLO module's entry
    computation that launches work (fusions, custom calls, copies, loops), in program order."""
    entry = text[text.find("\nENTRY"):]
    entry = entry[: entry.find("\n}")]
    out = []
    for line in entry.splitlines()[2:]:
        m = _INSTRUCTION.match(line)
        if m and m.group(3) not in SKIPPED:
            out.append((m.group(1), m.group(2), m.group(3), m.group(4)))
    return out


def launch_counts(text: str) -> collections.Counter:
    """opcode -> how many of the entry computation's instructions have it (see `entry_instructions`)."""
    return collections.Counter(op for _, _, op, _ in entry_instructions(text))


_ARRAY = re.compile(r"(\w+)\[([\d,]*)\]")
_BITS = {"pred": 8, "s8": 8, "u8": 8, "bf16": 16, "f16": 16, "s16": 16, "u16": 16, "f32": 32, "s32": 32, "u32": 32,
         "f64": 64, "s64": 64, "u64": 64}


def shape_bytes(shape: str) -> int:
    """Bytes of an HLO shape ("f32[8,64]{1,0}", or a tuple of them)."""
    return sum(_BITS[dtype] // 8 * math.prod(int(d) for d in dims.split(",") if d)
               for dtype, dims in _ARRAY.findall(shape) if dtype in _BITS)


def largest_outputs(text: str, n: int) -> list[tuple[str, int, int, str]]:
    """The `n` kinds of launch (name without its numeric suffix) whose outputs total the most bytes per step:
    (kind, bytes, launches, the jax operation that made the first). An intermediate that a step writes out and reads
    back shows up here; an in-place update (the cache's) writes only its slot but is listed at its buffer's size."""
    total, count, made_by = collections.Counter(), collections.Counter(), {}
    for name, shape, _, rest in entry_instructions(text):
        kind = re.sub(r"\.\d+$", "", name)
        total[kind] += shape_bytes(shape)
        count[kind] += 1
        op = re.search(r'op_name="([^"]*)"', rest)
        made_by.setdefault(kind, op.group(1) if op else "")
    return [(kind, b, count[kind], made_by[kind]) for kind, b in total.most_common(n)]


def compile_step(cfg: ModelConfig, spec: dict, step: str, batch: int, slots: int, chunk: int,
                 packed_experts: bool, dtype) -> str:
    """The compiled HLO text of `generate`'s decode (or prefill) step for one GPU of `spec`, from shapes alone."""
    from jax.experimental import topologies

    topology = topologies.get_topology_desc("compile-only", "cuda", target_config=target_config(spec),
                                            topology="1x1x1")
    on_gpu = jax.sharding.SingleDeviceSharding(topology.devices[0])
    # the library picks its GPU forms (Pallas kernels, fixed loops) from the default backend while tracing; the
    # process itself has only a CPU
    jax.default_backend = lambda: "gpu"

    def shaped(a):
        return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=on_gpu)

    graph, leaves = generate.split_model(abstract_model(cfg, dtype, packed_experts))
    caches = jax.tree.map(shaped, jax.eval_shape(lambda: init_cache(cfg, batch, slots, dtype)))
    rows = (batch,) if step == "decode" else (batch, chunk)
    tokens = jax.ShapeDtypeStruct(rows, jnp.int32, sharding=on_gpu)
    fn = generate._decode if step == "decode" else generate._prefill
    traced = fn.trace(graph, tuple(shaped(x) for x in leaves), tokens, tokens, caches)
    return traced.lower(lowering_platforms=("cuda",)).compile().as_text()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gpt-oss-20b", help="a preset (gpt-oss-20b, gpt-oss-120b, tiny) or config.json")
    p.add_argument("--gpu", choices=sorted(SPECS), default="h100-sxm")
    p.add_argument("--step", choices=["decode", "prefill"], default="decode")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--slots", type=int, default=1280, help="full-attention cache slots (the context's bucket)")
    p.add_argument("--chunk", type=int, default=256, help="prefill chunk length")
    p.add_argument("--experts", choices=["packed", "bf16"], default="packed")
    p.add_argument("--hlo", type=Path, default=None, help="write the compiled HLO here")
    p.add_argument("--outputs", type=int, default=0, metavar="N",
                   help="print the N kinds of launch whose outputs total the most bytes per step")
    p.add_argument("--show", type=int, default=0, metavar="N",
                   help="print the first N launches (name, shape, the jax operation that made it)")
    args = p.parse_args()
    # read when the CUDA plugin starts (the first use of a backend): there is no GPU to check the CUDA versions of
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
    cfg = ModelConfig.from_file(preset_path(args.model))
    text = compile_step(cfg, SPECS[args.gpu], args.step, args.batch, args.slots, args.chunk,
                        args.experts == "packed", jnp.bfloat16)
    if args.hlo is not None:
        args.hlo.write_text(text)
    counts = launch_counts(text)
    total = sum(counts.values())
    print(f"{args.model} {args.step} batch {args.batch} ({args.experts} experts, bf16, {args.slots} slots) compiled "
          f"for {SPECS[args.gpu]['name']} with jax {jax.__version__}: {total} launches per step, "
          f"{total / cfg.num_hidden_layers:.1f} per layer [" + ", ".join(f"{k} {v}" for k, v in counts.most_common())
          + "]")
    if args.outputs:
        written = sum(shape_bytes(shape) for _, shape, _, _ in entry_instructions(text))
        print(f"outputs of all launches: {written / 1e6:.1f} MB per step; the largest:")
        for kind, b, n, made_by in largest_outputs(text, args.outputs):
            print(f"  {b / 1e6:9.2f} MB {n:5d}x {kind:36s} {made_by}")
    for name, shape, _, rest in entry_instructions(text)[:args.show]:
        made_by = re.search(r'op_name="([^"]*)"', rest)
        print(f"  {name:40s} {shape.split('{')[0][:48]:48s} {made_by.group(1) if made_by else ''}")


if __name__ == "__main__":
    main()
