"""MXFP4 expert weights kept packed on device, and the grouped matmul that decodes them expert by expert.

An expert kernel stays as shipped: uint8 blocks [E, out, in/32, 16] + uint8 scales [E, out, in/32] (4.25 bits per
weight; out is 2F for mlp1, D for mlp2). The expert matmul decodes, inside the jitted step, only the experts that
rows were routed to (on CPU a slice of output rows at a time; on accelerators one expert per row tile, and the
last expert again in the spare steps of a fixed-count loop): no dequantized copy of a whole expert tensor exists.

Decoding is exact: twice an fp4 value is an integer in {0, 1, 2, 3, 4, 6, 8, 12} (built from the code's bits as a
float32), times 2^(scale - 128). Even and odd elements of each 32-group (low and high nibbles) are decoded apart and
multiply the even and odd input columns: no interleaving copy is made. Plain XLA, except for few rows on GPUs
(decode), where a Pallas kernel decodes in registers (through fp8 e4m3 bytes, in inline PTX: `kernel_matmul`).

The packed leaves are `Packed` variables, not `nnx.Param`: an optimizer over nnx.Param never sees them
(packed experts are an inference representation).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import pallas as pl
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from oss_jax import mxfp4, tiles
from oss_jax.params import path_name
from oss_jax.rowkernel import RowExperts, grid_plan, interpreted, require_groups, row_experts, row_kernel
from oss_jax.sharding import RULES, partition_spec

GROUPS = "mlp_groups"  # the F/32 group axis of packed mlp2: split over `tensor` only where the groups divide
KERNELS = ("moe.mlp1_kernel", "moe.mlp2_kernel")
INIT_SCALE = 120  # random codes times 2^-7 have std ~0.023, like params.INIT_STD
SLICE_ROWS = 512  # decode at most this many output rows of one expert at a time (a cache-sized slice)


class PackedError(ValueError):
    """Packed experts asked for where there are none (a dequantized checkpoint), or values that are not MXFP4."""


class Packed(nnx.Variable):
    """A uint8 leaf of an MXFP4 expert kernel (blocks or scales), with logical `axes` like nnx.Param."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MXFP4:
    """Packed expert weights as arrays: blocks [E, out, in/32, 16], scales [E, out, in/32] (uint8)."""

    blocks: jax.Array
    scales: jax.Array

    @property
    def shape(self) -> tuple[int, int, int]:
        """The dense kernel's shape [E, in, out]."""
        e, out, groups = self.scales.shape
        return e, groups * mxfp4.GROUP, out


class PackedKernel(nnx.Module):
    """One MXFP4 expert kernel of dense shape [E, in, out], stored as blocks + scales (random codes at init)."""

    def __init__(self, e: int, in_: int, out: int, axes: tuple[str | None, ...], *, rngs: nnx.Rngs):
        if in_ % mxfp4.GROUP:
            raise PackedError(f"packed experts need an input width that is a multiple of {mxfp4.GROUP}, got {in_}")
        groups = in_ // mxfp4.GROUP
        self.blocks = Packed(jax.random.bits(rngs.params(), (e, out, groups, mxfp4.BYTES_PER_GROUP), jnp.uint8),
                             axes=axes + (None,))
        self.scales = Packed(jnp.full((e, out, groups), INIT_SCALE, jnp.uint8), axes=axes)

    def __getitem__(self, key) -> MXFP4:
        """`kernel[...]`, as for a dense parameter: the packed arrays."""
        return MXFP4(self.blocks[key], self.scales[key])


def mlp_kernels(cfg, rngs: nnx.Rngs) -> tuple[PackedKernel, PackedKernel]:
    """Packed mlp1 [E, D, 2F] (out 2F on `mlp`) and mlp2 [E, F, D] (F groups on GROUPS, out D on `embed`)."""
    d, e, f = cfg.hidden_size, cfg.num_experts, cfg.intermediate_size
    return (PackedKernel(e, d, 2 * f, ("expert", "mlp", None), rngs=rngs),
            PackedKernel(e, f, d, ("expert", "embed", GROUPS), rngs=rngs))


# ------------------------------------------------------------------ decoding and the grouped matmul


def _twice_fp4(codes: jax.Array) -> jax.Array:
    """fp4 codes (uint8, 0-15) -> 2 x value, exact, as float32: +-{0, 1, 2, 3, 4, 6, 8, 12}.

    Float arithmetic on the exponent and mantissa bits (XLA:CPU vectorizes it; integer bit assembly ran ~4x slower).
    """
    e, m = (codes >> 1) & 3, (codes & 1).astype(jnp.float32)
    magnitude = jnp.where(e == 0, m, (2.0 + m) * jnp.where(e == 3, 4.0, jnp.where(e == 2, 2.0, 1.0)))
    return jnp.where(codes >= 8, -magnitude, magnitude)


def _half_scale(scales: jax.Array) -> jax.Array:
    """E8M0 scale codes -> half the scale, 2^(code - 128), float32 (codes 0 and 1 -> 0: subnormal)."""
    return jax.lax.bitcast_convert_type((jnp.maximum(scales.astype(jnp.uint32), 1) - 1) << 23, jnp.float32)


def decode_nibbles(blocks: jax.Array, scales: jax.Array, high: bool, dtype: jnp.dtype) -> jax.Array:
    """blocks [N, G, 16] + scales [N, G] -> the even (low nibble) or odd (high) elements of each group, [N, G*16].

    Exact for scale codes 2-254; codes 0 and 1 (|value| < 2^-125, subnormal, flushed on CPU) decode to 0.
    """
    half = _half_scale(scales)
    codes = blocks >> 4 if high else blocks & 15
    return (_twice_fp4(codes) * half[..., None]).reshape(blocks.shape[0], -1).astype(dtype)


def split_columns(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """[A, in] -> its even and odd columns within each 32-group, [A, in/2] each (decode_nibbles' order)."""
    a, n = x.shape
    pairs = x.reshape(a, n // 2, 2)
    return pairs[..., 0], pairs[..., 1]


def _slices(n: int) -> int:
    """How many equal slices of `n` output rows to decode an expert in (each at most SLICE_ROWS where possible)."""
    want = -(-n // SLICE_ROWS)
    return next(c for c in range(want, n + 1) if n % c == 0)


def backend() -> str:
    """The backend whose forms the expert matmuls take: "cpu", "gpu" or another accelerator's (read while tracing;
    tests force the accelerators' forms on CPU)."""
    return jax.default_backend()


def on_cpu() -> bool:
    """Whether the expert matmuls take their CPU forms."""
    return backend() == "cpu"


def row_form(a: int, e: int, packed_weights: bool) -> bool:
    """Whether the expert matmuls of A rows over E experts take a row form, in which each row reads its own expert's
    weight and may come in any order (`RowExperts`): on accelerators, up to E rows (`gathered_matmul`,
    `rowkernel.dense_matmul`), and on GPUs up to KERNEL_ROWS_PER_EXPERT x E rows of packed weights
    (`kernel_matmul`). Never on CPU (loops over the experts, for which rows are grouped)."""
    if on_cpu():
        return False
    return a <= (KERNEL_ROWS_PER_EXPERT * e if packed_weights and backend() == "gpu" else e)


def grouped_matmul(lhs: jax.Array, w: MXFP4, group_sizes: jax.Array | RowExperts, dtype: jnp.dtype,
                   tensor_axis: str | None = None) -> jax.Array:
    """lhs [A, in] (rows grouped by expert, sizes [E], or in any order with `RowExperts` where `row_form`) x packed
    w [E, in, out] -> [A, out] float32; rows past the groups -> 0. Inference only (no gradient).

    On CPU `looped_matmul`. On GPUs, up to KERNEL_ROWS_PER_EXPERT x E rows (decode, and an expert-parallel shard's
    dispatch buffer, mostly padding rows, when decoding) `kernel_matmul`; on other accelerators, up to E rows
    `gathered_matmul`. More rows (prefill): `fixed_loop_matmul`.

    Inside shard_map with `tensor_axis`, lhs may hold only this device's slice of `in` (mlp2 whose F groups are not
    split over the axis): it is placed at its offset in zero rows of full width.
    """
    e, width, _ = w.shape
    x = lhs.astype(dtype)
    if x.shape[1] != width:
        offset = jax.lax.axis_index(tensor_axis) * x.shape[1]
        x = jax.lax.dynamic_update_slice_in_dim(jnp.zeros((x.shape[0], width), dtype), x, offset, 1)
    if row_form(x.shape[0], e, True):
        return (kernel_matmul if backend() == "gpu" else gathered_matmul)(x, w, group_sizes)
    group_sizes = require_groups(group_sizes, x.shape[0], e, "packed.grouped_matmul")
    if on_cpu():
        return looped_matmul(x, w, group_sizes, dtype)
    return fixed_loop_matmul(x, w, group_sizes, dtype)


def gathered_matmul(x: jax.Array, w: MXFP4, group_sizes: jax.Array | RowExperts) -> jax.Array:
    """x [A, in] (rows grouped by expert, sizes [E], or `RowExperts`) x packed w [E, in, out] -> [A, out] float32,
    one reduction.

    Each row reads its own expert's packed bytes as 32-bit words (nibble j of little-endian word i of a group is
    element 8i + j) and nothing decoded is written; XLA:GPU copies the gathered words once (jax 0.11.2, H100), then
    reduces over `in`, the packed layout's contiguous axis. For few rows on accelerators other than GPUs (there,
    `kernel_matmul`: 1.7-2.1x faster on an H100), where a loop over experts costs launches and host round trips.
    """
    e, width, n = w.shape
    a, g = x.shape[0], width // mxfp4.GROUP
    ids, valid = row_experts(group_sizes, a)
    words = jax.lax.bitcast_convert_type(w.blocks.reshape(e, n, g, 4, 4), jnp.uint32)  # [E, out, G, 4]
    codes = (words[ids][..., None] >> (4 * jnp.arange(8, dtype=jnp.uint32))) & 15  # [A, out, G, 4, 8]
    xs = x.astype(jnp.float32).reshape(a, 1, g, 4, 8)
    half = _half_scale(w.scales[ids])[..., None, None]  # [A, out, G, 1, 1]
    y = jnp.sum(_twice_fp4(codes) * xs * half, axis=(2, 3, 4))
    return jnp.where(valid[:, None], y, 0.0)


# `kernel_matmul`'s tiling, chosen on an H100 (one layer's mlp1 + mlp2 at 20b decode shapes, device time, batch 1 /
# 8): 128 output rows and 3 loads per step 58.8 / 339.9 us, 64 rows 59.1 / 363.0, one load per step 62.5 / 381.1
KERNEL_ROWS = 128  # output rows per program (at most: the largest power of two dividing N, 64 for N = 2,880)
KERNEL_STEP_GROUPS = 2  # input groups a program reads per load: 32 bytes of each output row, a whole sector
KERNEL_PROGRAMS = 2048  # split `in` over programs until about this many run: enough loads in flight on a GPU
KERNEL_WARPS = 4  # warps per program; 2-8 with other tilings measured within the run-to-run spread on an H100
# GPUs take `kernel_matmul` up to this many rows per expert: it reads a row's expert's packed bytes once per row in
# a group (none for padding rows), where `fixed_loop_matmul` decodes E to 2E whole experts, writing and reading back
# ~8.5x their packed bytes in bf16. On an H100, 120b's 256-token prefill chunks (8 rows per expert) ran 564 tok/s
# through the kernel (986 with the fp8 decoding and 3 loads a step) and 359 through the fixed loop
KERNEL_ROWS_PER_EXPERT = 8
_FP4_TABLE = 0xC8643210  # nibble c of this word: 2 x |fp4 code c| for c in 0-7 (0, 1, 2, 3, 4, 6, 8, 12)
_MAGIC = 0x4B000000  # float32 2^23: OR-ing an integer m < 2^23 into its mantissa gives 2^23 + m


def twice_fp4_bits(codes: jax.Array) -> jax.Array:
    """`_twice_fp4` with integer ops only (uint32 codes 0-15 -> float32): a table lookup by shift, the magnitude
    made a float by the 2^23 trick, the sign OR-ed in. No int->float conversions or selects, which GPUs run at a
    fraction of the float rate: in `kernel_matmul` on an H100, `_twice_fp4` took 275 us where this takes 175 (and
    the fp8 decoding, `e4m3_nibbles_asm`, 63.5 where this took 73.4, in a later tiling)."""
    magnitude = (jnp.uint32(_FP4_TABLE) >> ((codes & 7) << 2)) & 15
    value = jax.lax.bitcast_convert_type(magnitude | _MAGIC, jnp.float32) - float(2**23)
    sign = (codes & 8) << 28
    return jax.lax.bitcast_convert_type(jax.lax.bitcast_convert_type(value, jnp.uint32) | sign, jnp.float32)


# fp4 e2m1 -> fp8 e4m3 by moving bits: the code's exponent and mantissa (e1 e0 m) shifted up by 2 in each byte,
# its sign to bit 7. The e4m3 byte's value is exactly the fp4 value times 2^-6 (e = 0, m = 1 is an e4m3 subnormal,
# 2^-7 = 0.5 x 2^-6), which a hardware conversion (sm_89+) turns into a float.
E4M3_SHIFT = 6  # the e4m3 byte's value x 2^6 = the fp4 value
# The same in PTX, on the four bytes of a packed register at once: the e4m3 bytes of their low (or high) nibbles,
# two per conversion to f16x2, then f16 -> f32. Outputs $0-$3: bytes 0-3's nibbles; input $4: the four bytes.
_E4M3_BYTES = {
    "lo": """and.b32 e, $4, 0x07070707;
shl.b32 e, e, 2;
and.b32 t, $4, 0x08080808;
shl.b32 t, t, 4;
or.b32 e, e, t;""",
    "hi": """shr.b32 e, $4, 2;
and.b32 e, e, 0x1C1C1C1C;
and.b32 t, $4, 0x80808080;
or.b32 e, e, t;""",
}
_E4M3_TO_F32 = """
mov.b32 {h0, h1}, e;
cvt.rn.f16x2.e4m3x2 p0, h0;
cvt.rn.f16x2.e4m3x2 p1, h1;
mov.b32 {q0, q1}, p0;
mov.b32 {q2, q3}, p1;
cvt.f32.f16 $0, q0;
cvt.f32.f16 $1, q1;
cvt.f32.f16 $2, q2;
cvt.f32.f16 $3, q3;
}"""


def e4m3_nibbles(blocks: jax.Array) -> tuple[jax.Array, jax.Array]:
    """uint8 blocks -> (low nibbles, high nibbles) as float32: each fp4 value times 2^-E4M3_SHIFT, exact, through
    fp8 e4m3 bytes and a float8 -> float32 conversion."""
    lo = ((blocks & 7) << 2) | ((blocks & 8) << 4)
    hi = ((blocks >> 2) & 0x1C) | (blocks & 0x80)
    return tuple(jax.lax.bitcast_convert_type(b.astype(jnp.uint8), jnp.float8_e4m3fn).astype(jnp.float32)
                 for b in (lo, hi))


def e4m3_nibbles_asm(blocks: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`e4m3_nibbles` as inline PTX inside a Pallas Triton kernel (GPUs only: no CPU form). `kernel_matmul`'s loop
    body takes 4.9 SASS instructions per nibble with it and 12 with `twice_fp4_bits` (compiled for sm_90 off the
    GPU). One asm per output: jax's Triton lowering of the inline-asm primitive returns a single result."""
    from jax.experimental.pallas import triton as plgpu

    out = jax.ShapeDtypeStruct(blocks.shape, jnp.float32)
    head = "{\n.reg .b32 e, t, p<2>;\n.reg .b16 h<2>, q<4>;\n"
    return tuple(plgpu.elementwise_inline_asm(head + _E4M3_BYTES[half] + _E4M3_TO_F32, args=[blocks],
                                              constraints="=f,=f,=f,=f,r", pack=4, result_shape_dtypes=[out])[0]
                 for half in ("lo", "hi"))


def bits_nibbles(blocks: jax.Array) -> tuple[jax.Array, jax.Array]:
    """uint8 blocks -> (low nibbles, high nibbles) as float32, twice each fp4 value (`twice_fp4_bits`)."""
    b = blocks.astype(jnp.uint32)
    return twice_fp4_bits(b & 15), twice_fp4_bits(b >> 4)


# `kernel_matmul`'s decodings: (low nibbles, high nibbles) of uint8 blocks, and the values' factor over fp4's
NIBBLES = {"bits": (bits_nibbles, 2), "e4m3": (e4m3_nibbles, 2.0**-E4M3_SHIFT),
           "e4m3asm": (e4m3_nibbles_asm, 2.0**-E4M3_SHIFT)}  # the last: GPUs only
KERNEL_DECODES = tuple(NIBBLES)
# how `kernel_matmul` decodes on GPUs (interpreted elsewhere: "e4m3" instead). On an H100, one layer's mlp1 + mlp2
# at 20b decode shapes (device time, batch 1 / 8): "bits" 73.4 / 445.5 us, "e4m3" 65.7 / 400.9, "e4m3asm" 63.5 / 381.2
KERNEL_DECODE = "e4m3asm"
KERNEL_LOADS = 3  # loads a `kernel_matmul` step issues before decoding (at most: the most that divide its steps)


def kernel_plan(g: int, n: int, a: int, block_rows: int = KERNEL_ROWS, step_groups: int = KERNEL_STEP_GROUPS,
                programs: int = KERNEL_PROGRAMS, loads: int = 1) -> tuple[int, int, int, int]:
    """(block_rows, step_groups, loads, splits) of `kernel_matmul` for G input groups, N output rows, A rows: the
    largest powers of two at most those asked for that divide N and G, the most loads per step at most `loads`
    dividing G / step_groups, then the fewest splits of the steps dividing them that make about `programs`
    programs."""
    while g % step_groups:
        step_groups //= 2
    loads = max(u for u in range(1, loads + 1) if (g // step_groups) % u == 0)
    block_rows, splits = grid_plan(g // step_groups // loads, n, a, block_rows, programs)
    return block_rows, step_groups, loads, splits


def kernel_matmul(x: jax.Array, w: MXFP4, group_sizes: jax.Array | RowExperts, block_rows: int = KERNEL_ROWS,
                  step_groups: int = KERNEL_STEP_GROUPS, programs: int = KERNEL_PROGRAMS,
                  warps: int = KERNEL_WARPS, interpret: bool | None = None, decode: str | None = None,
                  loads: int | None = None) -> jax.Array:
    """`gathered_matmul` as a Pallas kernel (Triton on GPUs, where it is the default; interpreted elsewhere).

    Grid: row x `block_rows` output rows x a split of the input groups (`kernel_plan`). A program's loop step
    issues `loads` loads of its row's expert's packed bytes, `step_groups` groups each, [block_rows, step_groups, 16]
    (contiguous within each output row), then decodes both nibbles in registers (`KERNEL_DECODE`), multiplies the
    even and odd input columns, sums each group and applies its scale; the splits' partial sums are added after.
    Rows past the groups (padding) read nothing (`rowkernel.row_kernel`).
    """
    e, width, n = w.shape
    a, g = x.shape[0], width // mxfp4.GROUP
    block_rows, step_groups, loads, splits = kernel_plan(g, n, a, block_rows, step_groups, programs,
                                                         loads or KERNEL_LOADS)
    per_split, per_step = g // splits, step_groups * loads
    decode = decode or KERNEL_DECODE
    if decode not in KERNEL_DECODES:
        raise ValueError(f"kernel_matmul: decode must be one of {KERNEL_DECODES}, got {decode!r}")
    # one array, [A, G, 2, 16]: a group's even columns, then its odd ones (as two arrays, XLA:GPU made them in two
    # launches at batch 8)
    halves = jnp.stack([h.reshape(a, g, mxfp4.BYTES_PER_GROUP) for h in split_columns(x)], 2).astype(jnp.float32)

    if decode == "e4m3asm" and interpreted(interpret):
        decode = "e4m3"  # the same values; inline PTX runs on GPUs only
    nibbles, factor = NIBBLES[decode]
    unit = 2 / factor  # folded into the scales: `_half_scale` halves them for twice the fp4 values

    def step(row, expert, outs, split, i, acc, halves_ref, blocks_ref, scales_ref):
        chunks = [pl.ds(split * per_split + i * per_step + u * step_groups, step_groups) for u in range(loads)]
        # every load first: Triton does not pipeline loads that feed no dot, so these are what a warp has in flight
        tiles = [(blocks_ref[expert, outs, c, :], scales_ref[expert, outs, c]) for c in chunks]  # [rows, groups, 16]
        for c, (b, scales) in zip(chunks, tiles, strict=True):
            lo, hi = nibbles(b)
            sums = jnp.sum(lo * halves_ref[row, c, 0, :][None] + hi * halves_ref[row, c, 1, :][None], axis=2)
            acc = acc + sums * (_half_scale(scales) * unit)
        return acc

    return row_kernel(step, per_split // per_step, group_sizes, n, block_rows, splits, warps, interpret,
                      halves, w.blocks, w.scales, lanes=step_groups)


def looped_matmul(x: jax.Array, w: MXFP4, group_sizes: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """`grouped_matmul` for x [A, in] of full width on CPU, as loops.

    Loops over the experts that hold rows, over slices of their output rows (decoded once each, low and high
    nibbles apart, into two [rows, in/2] matrices that stay in cache) and over row tiles of that expert (even input
    columns times the low-nibble matrix plus odd columns times the high one).
    """
    e, width, n = w.shape
    a = x.shape[0]
    tile, rows = tiles.power_of_two(a, e), n // _slices(n)
    even, odd = (jnp.pad(h, ((0, tile), (0, 0))) for h in split_columns(x))
    ends = jnp.cumsum(group_sizes)
    starts = ends - group_sizes
    (used,) = jnp.nonzero(group_sizes > 0, size=e, fill_value=0)

    def one_expert(i, out):
        j = used[i]

        def one_slice(c, out):
            blocks = jax.lax.dynamic_slice_in_dim(w.blocks[j], c * rows, rows)
            scales = jax.lax.dynamic_slice_in_dim(w.scales[j], c * rows, rows)
            lo, hi = (decode_nibbles(blocks, scales, high, dtype) for high in (False, True))  # [rows, in/2]

            def one_tile(t, out):
                r = starts[j] + t * tile
                y = (jnp.dot(lo, jax.lax.dynamic_slice_in_dim(even, r, tile).T, preferred_element_type=jnp.float32)
                     + jnp.dot(hi, jax.lax.dynamic_slice_in_dim(odd, r, tile).T, preferred_element_type=jnp.float32)
                     ).T  # [tile, rows]: [rows, in/2] x [in/2, tile] is XLA:CPU's fast orientation
                keep = (r + jnp.arange(tile) < ends[j])[:, None]
                y = jnp.where(keep, y, jax.lax.dynamic_slice(out, (r, c * rows), (tile, rows)))
                return jax.lax.dynamic_update_slice(out, y, (r, c * rows))
            return jax.lax.fori_loop(0, -(-group_sizes[j] // tile), one_tile, out)
        return jax.lax.fori_loop(0, n // rows, one_slice, out)

    out = jax.lax.fori_loop(0, jnp.sum(group_sizes > 0), one_expert, jnp.zeros((a + tile, n), jnp.float32))
    return out[:a]


def fixed_loop_matmul(x: jax.Array, w: MXFP4, group_sizes: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """`grouped_matmul` for x [A, in] of full width on accelerators: one loop (`tiles.loop`) with a trip count known
    when compiling, the most tiles any routing makes; XLA:GPU runs it without waiting on the host, where
    `looped_matmul`'s loops, counted by the data, would wait at every step.

    Each step takes a tile of rows of one expert (up to `tiles.ACCELERATOR_TILE`; the last of an expert's tiles
    partly masked), decodes that expert whole and multiplies; the steps past this routing's tiles change nothing.
    """
    e, width, n = w.shape
    a = x.shape[0]
    tile, trips = tiles.fixed(a, e)
    even, odd = (jnp.pad(h, ((0, tile), (0, 0))) for h in split_columns(x))

    def one_tile(out, j, r, valid):
        lo, hi = (decode_nibbles(w.blocks[j], w.scales[j], high, dtype) for high in (False, True))  # [out, in/2]
        y = (jnp.einsum("SC,NC->SN", jax.lax.dynamic_slice_in_dim(even, r, tile), lo,
                        preferred_element_type=jnp.float32)
             + jnp.einsum("SC,NC->SN", jax.lax.dynamic_slice_in_dim(odd, r, tile), hi,
                          preferred_element_type=jnp.float32))
        y = jnp.where((jnp.arange(tile) < valid)[:, None], y, jax.lax.dynamic_slice_in_dim(out, r, tile))
        return jax.lax.dynamic_update_slice_in_dim(out, y, r, 0)

    (_, count, first, ends), = tiles.plan(group_sizes, tile, (tile,))
    out = tiles.loop(tile, count, first, ends, one_tile, jnp.zeros((a + tile, n), jnp.float32), trips=trips)
    return out[:a]


# ------------------------------------------------------------------ placement and parameters


def named_sharding(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh, name: str = "") -> NamedSharding:
    """`sharding.named_sharding` for any parameter; the GROUPS axis goes on `tensor` only where it divides."""
    rules = RULES
    if GROUPS in axes and shape[list(axes).index(GROUPS)] % mesh.shape.get("tensor", 1) == 0:
        rules = {**RULES, GROUPS: ("tensor",)}
    return NamedSharding(mesh, partition_spec(axes, shape, mesh, name, rules))


def shard_map_spec(w: MXFP4, expert: str | None, tensor: str | None, mesh: Mesh, tensor_on: str) -> MXFP4:
    """PartitionSpecs of packed weights inside the MoE's shard_map: experts on `expert`; `tensor` (if any) on out
    (`tensor_on="out"`, mlp1) or on the in groups where they divide (`"in"`, mlp2; else whole, see grouped_matmul).
    """
    if tensor_on == "out":
        return MXFP4(PartitionSpec(expert, tensor, None, None), PartitionSpec(expert, tensor, None))
    groups = w.scales.shape[-1]
    split = tensor if tensor is not None and groups % mesh.shape[tensor] == 0 else None
    return MXFP4(PartitionSpec(expert, None, split, None), PartitionSpec(expert, None, split))


def packed_leaves(model: nnx.Module) -> dict[str, nnx.Variable]:
    """Every Packed leaf of the model by dotted name ('layers.0.moe.mlp1_kernel.blocks', ...)."""
    return {path_name(p): v for p, v in nnx.to_flat_state(nnx.state(model, Packed))}


def assign_packed(model: nnx.Module, arrays: Mapping[str, np.ndarray | jax.Array]
                  ) -> Mapping[str, np.ndarray | jax.Array]:
    """Set every Packed leaf from `arrays` (exact names, shapes, uint8); returns a view of the other arrays (not
    read: `arrays` may load each value when asked for it)."""
    leaves = packed_leaves(model)
    missing = sorted(set(leaves) - set(arrays))
    if missing:
        raise PackedError(f"packed expert weights missing: {missing[:4]}{'...' if len(missing) > 4 else ''} "
                          f"(a checkpoint with dequantized experts cannot run packed; use experts 'bf16')")
    for name, var in leaves.items():
        value = arrays[name]
        if tuple(value.shape) != tuple(var.shape) or np.dtype(value.dtype) != np.uint8:
            raise PackedError(f"{name}: {np.dtype(value.dtype)} {tuple(value.shape)}, expected uint8 {var.shape}")
        var.set_value(jnp.asarray(value))
    return _Without(arrays, set(leaves))


class _Without(Mapping):
    """`arrays` less some names; values are read only when asked for."""

    def __init__(self, arrays: Mapping, names: set[str]):
        self._arrays, self._names = arrays, names

    def __getitem__(self, name: str):
        if name in self._names:
            raise KeyError(name)
        return self._arrays[name]

    def __iter__(self):
        return (name for name in self._arrays if name not in self._names)

    def __len__(self) -> int:
        return sum(1 for _ in self)


def shard_packed(model: nnx.Module, mesh: Mesh) -> None:
    """Place every Packed leaf on its NamedSharding over `mesh` (in place; nnx.Params: sharding.shard_model)."""
    for name, var in packed_leaves(model).items():
        axes = var.get_metadata()["axes"]
        var.set_value(jax.device_put(var[...], named_sharding(axes, var.shape, mesh, name)))


def pack_params(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Dense expert kernels [E, in, out] in `arrays` -> `NAME.blocks` / `NAME.scales`; refuses non-MXFP4 values."""
    out = {}
    for name, value in arrays.items():
        if not name.endswith(KERNELS):
            out[name] = value
            continue
        dense = np.ascontiguousarray(np.asarray(value, np.float32).transpose(0, 2, 1))  # [E, out, in]
        blocks, scales = mxfp4.encode(dense)
        if not np.array_equal(mxfp4.decode(blocks, scales), dense):
            raise PackedError(f"{name}: values are not exactly MXFP4 (packing would round them)")
        out[f"{name}.blocks"], out[f"{name}.scales"] = blocks, scales
    return out
