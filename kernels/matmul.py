"""Decode-step linears `linear` and `gate_up_silu`: bf16 or W4/W6/W8A16 weights, device row mask.

One kernel serves every weight format (constexprs `USE_W4`, `HI_PLANE`, `ROW_SCALE`) and both
ops (constexpr `GATE_UP`).
The decode step multiplies M = 1..64 rows by a weight of N x K = 4096..28672 x 4096..14336, so
the time is the time to stream the weight from HBM once; everything below is about that:

* Split-K. One program owns BLOCK_N weight rows x K / SPLIT_K columns, so even N = 4096 gives
  ~4 programs per SM (enough bytes in flight to cover HBM latency). Partial sums go to a
  float32 workspace and the *last* program of a tile to arrive (an int32 ticket per tile, taken
  with an acq_rel atomic after a CTA barrier) adds the partials in split order and runs the
  epilogue. Compared with float32 atomics into the output this needs no zeroing launch and no
  cast launch, and the result is bitwise deterministic, so seeded sampling replays exactly.
  The tickets reset themselves, which keeps the kernel CUDA-graph safe.
* W4A16 (USE_W4). The uint8 qweight [N, K // 2] is read as int32 words [N, K // 8], 8 nibbles
  per word (k = 8 * word + i), with 16-byte vector loads. A nibble becomes a float without the
  slow int->float converter: `(word & (0xF << 4i)) | 0x4B000000` is the float 2^23 + q * 2^4i
  exactly, and subtracting 2^23 leaves q * 2^4i (one LOP3 + one FADD per weight; nibbles 5..7
  are shifted down by 12 first so the value stays below 2^23).
  - M == 1 (GEMV, BLOCK_M == 1): CUDA-core FMAs on [BLOCK_N, groups, words] tiles. The power of
    two is folded into the activations (per column, not per weight), and the scale and zero
    are applied per group, not per weight: sum_k x_k (q_k - z) s = s (sum_k x_k q_k -
    z sum_k x_k). So the inner loop is LOP3 + FADD + FFMA per weight (~4.5 SASS instructions
    per weight in total with the unpacking of x; ~123 registers, no spills, sm_90a). The
    packed words of the next K step are requested before the current one is unpacked.
  - M > 1 (BLOCK_M >= 16): dequantize (q - z) * s in float32 (two FMAs), cast to the
    activation dtype, re-interleave the 8 nibble planes into k order with a tree of `tl.join`
    (register moves only) and use `tl.dot` (tensor cores); the rows beyond M are padding.
* W6A16 (USE_W4 and HI_PLANE, river.quantize.W6Weight): the W4 path on the low nibbles plus
  the 2-bit high plane (uint8 [N, K // 4] read as int16 words [N, K // 8], the same word index
  as the nibbles): q = nibble + 16 h, each 2-bit field unpacked by the same OR-into-2^23 trick
  (tiles.w2_field). 0.75 bytes a weight instead of 0.5, and about 1.5x the GEMV's unpacking.
* W8A16 (ROW_SCALE, river.w8.W8Weight): the dense paths read the int8 weight; the row scale
  multiplies the sum once.
* Dense (bf16) weights: the same two paths without the unpacking (GEMV with 16-byte loads and
  FMAs for M == 1; `tl.dot` for M > 1).
* Row mask: every program first reads the mask of its rows (a few bytes) and returns before
  touching the weight when none is active. That is how a CUDA-graph-captured decode step runs a

Launch settings: kernels/matmul_settings.py; split-K partials and tickets: kernels/splitk.py;
the device tiles shared with the qkv kernel: kernels/tiles.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import check_rows, dot_precision, num_sms, weight_bits, weight_operands
from .matmul_settings import LaunchSettings, linear_settings
from .splitk import arrive, split_launch, store_partial, sum_partials
from .tiles import W4_MAGIC, matmul_tile, rows_active

__all__ = ["linear", "gate_up_silu"]


@triton.jit
def _linear_epilogue(
    out_ptr,  # [M, N_OUT]
    stride_out_m,
    acc,  # [BLOCK_M, BLOCK_N] float32 (gate rows when GATE_UP)
    acc_up,  # [BLOCK_M, BLOCK_N] float32 (up rows; unused otherwise)
    offs_m,
    active,
    offs_n,
    n_ok,
    GATE_UP: tl.constexpr,
):
    """Store y (or SiLU(gate) * up) for the active rows only.

    Rounds like the reference: the projection to the output dtype first, SiLU in float32,
    back to the output dtype, then the product rounded once more."""
    dt = out_ptr.dtype.element_ty
    if GATE_UP:
        g = acc.to(dt).to(tl.float32)
        u = acc_up.to(dt).to(tl.float32)
        y = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32) * u
    else:
        y = acc
    ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_out_m + offs_n[None, :]
    tl.store(ptrs, y.to(dt), mask=active[:, None] & n_ok[None, :])


@triton.jit
def _linear_kernel(
    x_ptr,  # [M, K] activations
    w_ptr,  # dense [N, K] or W4 int32 [N, K // 8]; N = N_OUT (linear) or 2 * N_OUT (gate_up)
    h_ptr,  # W6 high plane int16 [N, K // 8] (HI_PLANE; a dummy otherwise)
    s_ptr,  # W4 scales [N, K // G] (a dummy when dense)
    z_ptr,  # W4 zeros [N, K // G]
    out_ptr,  # [M, N_OUT]
    row_mask_ptr,  # bool [M] (HAS_ROW_MASK)
    ws_ptr,  # float32 split-K partials [tiles, SPLIT_K, NUM_ACC, BLOCK_M, BLOCK_N]
    counter_ptr,  # int32 [tiles] split-K tickets, 0 between launches
    M,
    N_OUT,
    K,
    K_PER_SPLIT,
    W4_MAGIC,  # int32 0x4B000000 (see tiles.w4_nibble)
    stride_x_m,
    stride_w_n,
    stride_h_n,
    stride_s_n,
    stride_z_n,
    stride_out_m,
    USE_W4: tl.constexpr,
    HI_PLANE: tl.constexpr,  # W6: USE_W4's nibbles plus a 2-bit plane (tiles.matmul_tile)
    ROW_SCALE: tl.constexpr,  # W8: int8 [N, K] weight, s_ptr its row scales [N]
    GROUP: tl.constexpr,
    GATE_UP: tl.constexpr,
    HAS_ROW_MASK: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """y[m, n] = sum_k x[m, k] W[n, k] (GATE_UP: SiLU(x Wg^T) * (x Wu^T), Wu = rows N_OUT..)
    for the rows m with row_mask[m]; grid (SPLIT_K, N tiles, M tiles)."""
    pid_k = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_m = tl.program_id(2)
    row0 = pid_m * BLOCK_M
    offs_m = row0 + tl.arange(0, BLOCK_M)
    active, any_active = rows_active(row_mask_ptr, offs_m, M, HAS_ROW_MASK)
    if any_active == 0:
        return  # no active row: not a byte of the weight is read
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N_OUT
    m_ok = offs_m < M
    k_start = pid_k * K_PER_SPLIT
    k_stop = tl.minimum(k_start + K_PER_SPLIT, K)
    acc = matmul_tile(
        x_ptr, stride_x_m, row0, offs_m, m_ok, w_ptr, h_ptr, s_ptr, z_ptr, stride_w_n,
        stride_h_n, stride_s_n, stride_z_n, offs_n, n_ok, k_start, k_stop, K, W4_MAGIC, USE_W4,
        HI_PLANE, ROW_SCALE, GROUP, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, DOT_PRECISION,
    )  # fmt: skip
    if GATE_UP:
        acc_up = matmul_tile(
            x_ptr, stride_x_m, row0, offs_m, m_ok, w_ptr, h_ptr, s_ptr, z_ptr, stride_w_n,
            stride_h_n, stride_s_n, stride_z_n, offs_n + N_OUT, n_ok, k_start, k_stop, K,
            W4_MAGIC, USE_W4, HI_PLANE, ROW_SCALE, GROUP, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K,
            DOT_PRECISION,
        )  # fmt: skip
    else:
        acc_up = acc
    NUM_ACC: tl.constexpr = 2 if GATE_UP else 1
    if SPLIT_K > 1:
        tile = pid_m * tl.num_programs(1) + pid_n
        store_partial(ws_ptr, acc, m_ok, tile, pid_k, 0, NUM_ACC, SPLIT_K, BLOCK_M, BLOCK_N)
        if GATE_UP:
            store_partial(ws_ptr, acc_up, m_ok, tile, pid_k, 1, NUM_ACC, SPLIT_K, BLOCK_M, BLOCK_N)
        if arrive(counter_ptr + tile, SPLIT_K):
            acc = sum_partials(ws_ptr, m_ok, tile, 0, NUM_ACC, SPLIT_K, BLOCK_M, BLOCK_N)
            if GATE_UP:
                acc_up = sum_partials(ws_ptr, m_ok, tile, 1, NUM_ACC, SPLIT_K, BLOCK_M, BLOCK_N)
            else:
                acc_up = acc
            _linear_epilogue(
                out_ptr, stride_out_m, acc, acc_up, offs_m, active, offs_n, n_ok, GATE_UP
            )
    else:
        _linear_epilogue(out_ptr, stride_out_m, acc, acc_up, offs_m, active, offs_n, n_ok, GATE_UP)


# ------------------------------------------------------------------------------------------
# Host side
# ------------------------------------------------------------------------------------------


def _launch_linear(x, weight, row_mask, out, gate_up: bool, settings: LaunchSettings | None):
    x, row_mask = check_rows(x, row_mask)
    w, h, s, z, n_w, k, group, bits = weight_operands(weight, x)
    use_w4 = bits in (4, 6)  # W6 is W4's nibbles plus a 2-bit plane
    m = x.shape[0]
    if k != x.shape[1]:
        raise ValueError(f"x has K={x.shape[1]}, weight has K={k}")
    if gate_up and n_w % 2:
        raise ValueError(f"gate_up weight must have an even number of rows, got {n_w}")
    n_out = n_w // 2 if gate_up else n_w
    if out is None:
        alloc = torch.empty if row_mask is None else torch.zeros  # masked rows read as 0
        out = alloc((m, n_out), dtype=x.dtype, device=x.device)
    elif tuple(out.shape) != (m, n_out) or out.stride(1) != 1 or out.device != x.device:
        raise ValueError(f"out must be [{m}, {n_out}] on {x.device} with unit column stride")
    if m == 0 or n_out == 0:
        return out
    cfg = settings or linear_settings(n_out, k, m, use_w4, group, num_sms(x.device), bits == 6)
    if use_w4 and cfg.block_m == 1 and cfg.block_k % group:
        raise ValueError(f"W4 GEMV block_k={cfg.block_k} must be a multiple of group {group}")
    tiles_n, tiles_m = triton.cdiv(n_out, cfg.block_n), triton.cdiv(m, cfg.block_m)
    per_split = (2 if gate_up else 1) * cfg.block_m * cfg.block_n  # floats of one partial
    k_per_split, split, ws, cnt = split_launch(
        k, cfg.block_k, cfg.split_k, tiles_n * tiles_m, per_split, x.device, out
    )
    mask = row_mask if row_mask is not None else x
    _linear_kernel[(split, tiles_n, tiles_m)](
        x, w, h, s, z, out, mask, ws, cnt,
        m, n_out, k, k_per_split, W4_MAGIC,
        x.stride(0), w.stride(0), h.stride(0), s.stride(0), z.stride(0), out.stride(0),
        USE_W4=use_w4, HI_PLANE=bits == 6, ROW_SCALE=bits == 8, GROUP=group, GATE_UP=gate_up,
        HAS_ROW_MASK=row_mask is not None,
        SPLIT_K=split, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        EVEN_K=k % cfg.block_k == 0, DOT_PRECISION=dot_precision(x.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return out


def _use_cublas(x, weight, row_mask) -> bool:
    """Prefill-sized dense products without a mask go to cuBLAS: the kernel is built for the
    weight-streaming decode regime (M <= 64), cuBLAS wins on compute-bound shapes. The masked
    case always uses the kernel (the mask skip must not read device values on the host)."""
    return row_mask is None and weight_bits(weight) == 16 and x.dim() == 2 and x.shape[0] > 64


def linear(x, weight, row_mask=None, out=None, settings: LaunchSettings | None = None):
    """out[m] = x[m] @ W.T for the rows in row_mask (others keep out's content; zeros when out
    is None). x [M, K]; W [N, K] tensor, W4Weight, W6Weight or W8Weight. Same semantics as
    reference.linear.
    settings: force the launch settings (tests, the benchmark sweep); None = linear_settings."""
    if settings is None and _use_cublas(x, weight, row_mask):
        if out is None:
            return x @ weight.t()
        return torch.matmul(x, weight.t(), out=out)
    return _launch_linear(x, weight, row_mask, out, False, settings)


def gate_up_silu(x, weight, row_mask=None, out=None, settings: LaunchSettings | None = None):
    """SiLU(x @ Wg.T) * (x @ Wu.T) for the rows in row_mask; weight is the fused [2 I, K]
    (gate rows first). Same semantics as reference.gate_up_silu; settings as in linear."""
    if settings is None and _use_cublas(x, weight, row_mask):
        from .reference import gate_up_silu as ref

        y = ref(x, weight)
        if out is None:
            return y
        return out.copy_(y)
    return _launch_linear(x, weight, row_mask, out, True, settings)
