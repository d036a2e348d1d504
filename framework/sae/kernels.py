"""Fast training paths: each variant's `forward_reference` math, with fewer passes over memory.

A step at batch 4,096 and 16,384 features is dominated by work on (batch × n_features) matrices.
The plain autograd graph of a ReLU SAE runs six (batch × d × n) GEMMs -- one of them only to get a
gradient for x - b_dec that b_dec then sums away -- and allocates three more (batch × n) tensors
for ReLU, the L1 gradient and their sum. Two regimes are cheaper:

Dense codes (early training, L0 in the hundreds): `_DenseReLUAutoencoder` runs exactly five GEMMs
whose operands carry one more row or column each (the encoder bias, the L1 sum, the L1 gradient,
b_enc's gradient ride in them), masks by the ReLU in place, and takes b_dec's gradient as
-W_enc @ Σ grad_pre (one matrix-vector product) instead of a sixth GEMM; its fire counts are a
GEMM too (`dense_fire_counts`), since reductions across rows ran far slower than GEMMs on CPU.

Sparse codes (L0 of tens, TopK and BatchTopK always): only the encoder's forward GEMM needs the
dense (batch, n) pre-activations. Everything after touches the nonzero codes alone:
  decoder          x̂ = S @ W_dec                 CSR (batch, n) × dense      O(nnz·d)
  grad at codes    g·W_dec[j] at each (i, j)      sampled dense-dense (SDDMM)  O(nnz·d)
  grad W_dec       Sᵀ @ g                        CSR (n, batch) × dense      O(nnz·d)
  grad W_enc       (Gᵀ @ (x - b_dec))ᵀ           same transposed pattern     O(nnz·d)
so a step costs about one dense GEMM, a selection pass (ReLU mask or top-k), O(nnz·d) and Adam.
`ActivePattern` holds the two CSR orderings of one batch's codes, built once per step.

Precision: under autocast the dense GEMM runs in the autocast dtype (bfloat16 uses AMX /
AVX512-BF16 on CPU, tensor cores on GPU) and the sparse products in float32: CPU CSR kernels have
no bfloat16, and at O(nnz·d) they are cheap. Casting is explicit, and backward disables autocast,
because autograd Functions do not see the forward's autocast state in backward.

Memory: on CPU every fresh tensor above glibc's mmap threshold is page-faulted in on first touch:
at batch 4096 and n 16384 that cost 35 ms (bfloat16) to 55 ms (float32) per step for the
pre-activations alone, about 70% of the bfloat16 GEMM that fills them. `Workspace` keeps that
buffer (and the ReLU mask) between training steps. What leaves a Function (the dense path's
codes, the sparse paths' weight gradients) is reused only once nothing else holds it
(`Workspace.get_unheld`).
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from framework.sae.base import SparseFeatures

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")


def compute_dtype(x: Tensor, param: Tensor) -> torch.dtype:
    """The dtype dense GEMMs run in: autocast's when it is on, else the parameters'."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return param.dtype


class Workspace:
    """Reusable scratch buffers, by name; reallocated only when shape, dtype or device change."""

    def __init__(self) -> None:
        self._buffers: dict[str, Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        buf = self._buffers.get(name)
        if buf is None or buf.shape != shape or buf.dtype != dtype or buf.device != device:
            buf = self._buffers[name] = torch.empty(shape, dtype=dtype, device=device)
        return buf

    def get_unheld(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        """Like `get`, for a buffer that outlives the call that fills it (`_leaving`: codes a
        forward returns, a weight gradient that becomes a `.grad`, weights autograd saves for
        backward): the last one is reused only when nothing else holds its memory any more (the
        caller has dropped that step's output, autograd has freed what it saved), else a fresh
        one replaces it, so what someone kept is never overwritten."""
        buf = self._buffers.get(name)
        if buf is not None and _held_elsewhere(buf):
            del self._buffers[name]
        return self.get(name, shape, dtype, device)

    def release(self, *names: str) -> None:
        """Drop buffers a path no longer uses (a ReLU SAE's dense and sparse paths each keep
        (batch, n) ones: holding both would add 0.5 GiB at 4,096 × 16,384 in float32)."""
        for name in names:
            self._buffers.pop(name, None)


_storage_use_count = getattr(torch._C, "_storage_Use_Count", None)  # what torch's CUDA-graph trees ask too


def _held_elsewhere(t: Tensor) -> bool:
    """Whether another tensor (a view or alias of `t`: a caller's output, autograd's saved copy,
    a NumPy or DLPack view of it) shares t's memory. The count includes `t` and the storage object
    made to ask. Not counted: a caller that keeps the storage object alone
    (`features.untyped_storage()`), which shares that Python object. Without the count (another
    torch), everything counts as held: nothing is reused."""
    if _storage_use_count is None:
        return True
    return _storage_use_count(t.untyped_storage()._cdata) > 2


def _leaving(ws: Workspace | None, name: str, shape, dtype, device) -> Tensor:
    """A tensor that outlives its Function's call: a result that leaves it (the dense path's
    codes, which the caller logs and autograd saves; a weight gradient, which becomes the
    parameter's `.grad`) or an operand autograd saves for backward (the dense path's augmented
    weights: a second forward before the first one's backward must not overwrite them), so not a
    plain workspace buffer. On CPU the last step's buffer is reused once nothing holds it any
    more, and what leaves is an alias of it (a second tensor over the same memory, which
    `_held_elsewhere` counts while anyone keeps it): a fresh one page-faults every step (12-17 ms
    for the float32 codes at 4,096 × 4,096 on 2 cores). Elsewhere a fresh tensor: a GPU's
    caching allocator reuses memory without faults, and under torch.compile the compiler plans
    memory (and refuses a saved tensor that aliases a graph input)."""
    if ws is None or device.type != "cpu" or torch.compiler.is_compiling():
        return torch.empty(tuple(shape), dtype=dtype, device=device)
    return ws.get_unheld(name, tuple(shape), dtype, device).detach()


def _scratch(ws: Workspace | None, name: str, shape, dtype, device) -> Tensor:
    return (
        ws.get(name, tuple(shape), dtype, device)
        if ws is not None
        else torch.empty(shape, dtype=dtype, device=device)
    )


_SAME_WIDTH_INT = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def order_keys(t: Tensor) -> Tensor:
    """t's bits as same-width integers, on CPU (t itself elsewhere, or when it has no such view).

    For floats ≥ +0 the integer order is the float order (+inf and sign-clear NaNs last, as
    torch.topk and ReLU treat them), and every negative float, -0 included, reads as a negative
    integer (in reverse order: -inf ranks above -1, so never mask with -inf before a top-k on
    these keys). So comparisons with 0 and top-k among non-negative values give the float answers,
    and CPU kernels run them faster on integers: `> 0` over 4,096 × 4,096 bfloat16 took 3.6
    against 10.3 ms on 2 cores, a top-k at 4,096 × 16,384 48 against 62 ms.
    """
    as_int = _SAME_WIDTH_INT.get(t.dtype)
    if as_int is None or t.device.type != "cpu" or not t.is_contiguous():
        return t
    return t.view(as_int)


def relu_(t: Tensor) -> Tensor:
    """max(t, 0) in place: on integer keys, clamping negative ones to 0 writes +0.0 (bf16 on CPU:
    0.6 against 3.3 ms at 4,096 × 4,096)."""
    order_keys(t).clamp_min_(0)
    return t


def mask_where_inactive_(grad: Tensor, f: Tensor) -> Tensor:
    """grad = 0 where f ≤ 0, in place (ReLU's backward). On integer keys the kept gradients'
    bits are copied unchanged (bf16 on CPU: 1.3 against 8.6 ms at 4,096 × 4,096)."""
    keys_grad, keys_f = order_keys(grad), order_keys(f)
    if keys_grad.dtype != keys_f.dtype:
        keys_grad, keys_f = grad, f
    torch.ops.aten.threshold_backward.grad_input(keys_grad, keys_f, 0, grad_input=keys_grad)
    return grad


def _augmented_width(d: int) -> int:
    """d + 1 columns (one for a bias or a sum) padded with zeros to a multiple of 16, which
    GEMM kernels prefer."""
    return (d + 1 + 15) // 16 * 16


def _augmented(t: Tensor, extra: Tensor | float, out: Tensor) -> Tensor:
    """out = [t | extra | 0…] (rows, _augmented_width(d)), in out's dtype; `extra` a scalar or
    one value per row."""
    d = t.shape[1]
    out[:, :d] = t
    out[:, d] = extra
    out[:, d + 1 :] = 0
    return out


def _with_bias_row(W: Tensor, b: Tensor, out: Tensor) -> Tensor:
    """out = [W; b; 0…] (_augmented_width(d), n), in out's dtype: the other operand of
    `_augmented(x, 1.0, …)`, so x @ W + b is one GEMM."""
    d = W.shape[0]
    out[:d] = W
    out[d] = b
    out[d + 1 :] = 0
    return out


@torch.no_grad()
def dense_pre_activations(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, dtype: torch.dtype, ws: Workspace | None
) -> Tensor:
    """(x - b_dec) @ W_enc + b_enc in `dtype`, without autograd, into the workspace. (batch, n)

    When the GEMM runs in another dtype than the weights (bf16 autocast), W_enc is copied into
    that dtype anyway; the copy then carries b_enc as one more row and x one more column of
    ones, [x - b_dec, 1] @ [W_enc; b_enc], so the bias rides in the GEMM instead of addmm's
    broadcast of it into the (batch, n) output, a pass over the step's largest tensor (bf16 at
    4,096 × 576 × 16,384 on 2 CPU cores: 28 ms against 38). The inner dimension is padded with
    zeros to a multiple of 16, which GEMM kernels prefer.
    """
    out = _scratch(ws, "pre", (x.shape[0], W_enc.shape[1]), dtype, x.device)
    if dtype == W_enc.dtype:
        return torch.addmm(b_enc.to(dtype), (x - b_dec).to(dtype), W_enc, out=out)
    batch, d = x.shape
    inner = _augmented_width(d)
    x_aug = _augmented(x - b_dec, 1.0, torch.empty(batch, inner, dtype=dtype, device=x.device))  # (batch, inner)
    W_aug = _with_bias_row(W_enc, b_enc, torch.empty(inner, W_enc.shape[1], dtype=dtype, device=x.device))
    return torch.mm(x_aug, W_aug, out=out)


# Integers a float type holds exactly: a column sum of 0/1 entries over this many rows is exact
# even when the GEMM rounds its output to the type (bfloat16 and float16 keep 8 and 11 bits).
_EXACT_COUNT = {torch.bfloat16: 256, torch.float16: 2048}
# The bits of 1.0 read as the same-width integer (positive_mask).
_ONE_BITS = {dtype: int(torch.ones((), dtype=dtype).view(as_int)) for dtype, as_int in _SAME_WIDTH_INT.items()}


@torch.no_grad()
def positive_mask(t: Tensor, out: Tensor) -> Tensor:
    """out = 1 where t > 0, else 0, in t's dtype (out has t's shape and dtype).

    A compare writes bools, and converting them to a float type is a second pass: 12 ms at
    4,096 × 4,096 in bfloat16 on 2 CPU cores (25 in float32). On integer keys, clamping to [0, 1]
    and multiplying by the bits of 1.0 writes the floats' bits directly: 1.9 ms (5.1). Same
    answers as `order_keys(t) > 0`: every positive value, +inf and sign-clear NaNs count."""
    keys = order_keys(t)
    if keys.dtype == t.dtype:  # no integer view (off CPU): the compare alone
        return torch.gt(t, 0, out=out)
    torch.clamp(keys, 0, 1, out=out.view(keys.dtype)).mul_(_ONE_BITS[t.dtype])
    return out


_MASK_ROWS = 64  # rows per block of _positions' compare on CPU: its mask stays in cache


def _positions(flat: Tensor, compare, bound, row: int, ws: Workspace | None) -> Tensor:
    """Ascending indices of the entries e of flat (rows of `row` entries) where compare(e, bound)
    (torch.gt, torch.ge).

    One compare and one nonzero over the whole tensor on a GPU (a nonzero waits for the device,
    so once). On CPU, blocks of rows whose bool mask stays in cache between the two: a 1 MiB mask
    instead of 64 MiB at 4,096 × 16,384 (512 MiB at 131,072 features), and the two took 54
    against 74 ms in bfloat16 on 2 cores (BatchTopK's selection; the step ~2% faster)."""
    if flat.device.type != "cpu":
        return compare(flat, bound, out=_scratch(ws, "mask", flat.shape, torch.bool, flat.device)).nonzero().squeeze(1)
    block = min(_MASK_ROWS * row, flat.numel())
    mask = _scratch(ws, "mask", (block,), torch.bool, flat.device)
    parts = []
    for start in range(0, flat.numel(), block):
        part = flat[start : start + block]
        parts.append(compare(part, bound, out=mask[: part.numel()]).nonzero().squeeze(1).add_(start))
    return torch.cat(parts)


@torch.no_grad()
def dense_fire_counts(f: Tensor, ws: Workspace | None) -> Tensor:
    """(n,) int64: on how many rows each column of f (batch, n) is > 0, as one GEMM.

    torch.count_nonzero(f, dim=0) builds a bool mask, widens it to int64 and reduces across rows:
    65 ms at 4,096 × 4,096 on 2 CPU cores, as long as the encoder GEMM. Here the mask is 0/1 in
    f's dtype and a (blocks, batch) matrix of ones sums each block of rows; blocks are short
    enough that every count is exact in that dtype, and the block counts add up in float32
    (4-6 ms).
    """
    batch = f.shape[0]
    mask = positive_mask(f, _scratch(ws, "fire_mask", f.shape, f.dtype, f.device))
    rows = min(batch, _EXACT_COUNT.get(f.dtype, batch))
    blocks = torch.arange(-(-batch // rows), device=f.device).unsqueeze(1)
    ones = (torch.arange(batch, device=f.device) // rows == blocks).to(f.dtype)  # (blocks, batch)
    return torch.mm(ones, mask).float().sum(0).round().long()


def column_sums(t: Tensor) -> Tensor:
    """(n,) float32 sums over the rows of t (batch, n). In float32 exactly torch's sum; in a
    16-bit type a GEMM against ones (float32 accumulation, the result rounded to the type, as
    every GEMM of the step is): a float32 reduction of bfloat16 ran 7× slower on CPU."""
    if t.dtype in (torch.bfloat16, torch.float16):
        return torch.mv(t.T, t.new_ones(t.shape[0])).float()
    return t.sum(0, dtype=torch.float32)


def _offsets(sorted_index: Tensor, size: int) -> Tensor:
    """CSR row pointers (size + 1,) int32 from an ascending int32 index."""
    bounds = torch.arange(size + 1, dtype=torch.int32, device=sorted_index.device)
    return torch.searchsorted(sorted_index, bounds, out_int32=True)


class ActivePattern:
    """Where a batch's codes are nonzero, in both CSR orders a step needs.

    rows/cols are batch-major: rows ascending, cols ascending within a row (torch's CSR
    invariant). `order` permutes them feature-major (cols ascending, rows ascending within a
    feature), for the weight gradients, which sum over the batch. Indices are int32: what the
    CPU sparse kernels use anyway, and torch's 2-thread CPU stable sort took 180 ms on 131,072
    int64 keys against 1-2 ms on int32 keys.
    """

    def __init__(self, rows: Tensor, cols: Tensor, shape: tuple[int, int], crow: Tensor | None = None):
        batch, n = shape
        self.rows, self.cols, self.shape = rows.int(), cols.int(), shape
        self.crow = crow if crow is not None else _offsets(self.rows, batch)  # (batch + 1,)
        sorted_cols, self.order = torch.sort(self.cols, stable=True)  # (nnz,)
        self.fcrow = _offsets(sorted_cols, n)  # (n + 1,)
        self.frows = self.rows[self.order]  # (nnz,)

    @classmethod
    def from_flat(cls, flat: Tensor, shape: tuple[int, int]) -> ActivePattern:
        """From ascending flat (int64) indices into (batch, n)."""
        return cls(flat // shape[1], flat % shape[1], shape)

    @classmethod
    def from_topk(cls, idx: Tensor, n: int) -> ActivePattern:
        """From (batch, k) feature indices, each row ascending."""
        batch, k = idx.shape
        crow = torch.arange(0, batch * k + 1, k, dtype=torch.int32, device=idx.device)
        rows = torch.arange(batch, dtype=torch.int32, device=idx.device).repeat_interleave(k)
        return cls(rows, idx.reshape(-1), (batch, n), crow)

    def by_row(self, values: Tensor) -> Tensor:
        """CSR (batch, n) with `values` in batch-major order."""
        return torch.sparse_csr_tensor(self.crow, self.cols, values, self.shape, check_invariants=False)

    def by_feature(self, values: Tensor) -> Tensor:
        """CSR (n, batch): the transpose, from `values` in batch-major order."""
        shape = (self.shape[1], self.shape[0])
        return torch.sparse_csr_tensor(
            self.fcrow, self.frows, values[self.order], shape, check_invariants=False
        )

    def features(self, values: Tensor) -> SparseFeatures:
        return SparseFeatures(self.rows, self.cols, values.detach(), self.shape)

    def per_feature(self) -> Tensor:
        """(n,) int64: how many positions each feature has, from the feature-major row pointers
        (a bincount of the columns would make a GPU wait for its size)."""
        return self.fcrow.diff().long()


def _no_autocast(device: torch.device):
    return torch.autocast(device.type, enabled=False)


def _spmm(sparse: Tensor, dense: Tensor, out: Tensor | None = None) -> Tensor:
    """sparse (CSR) @ dense, into `out` if given. `sparse @ dense` on CPU zero-fills a temporary
    and copies it out; addmm with beta=0 into an empty tensor writes the product in place, 3.5×
    faster."""
    if out is None:
        out = dense.new_empty(sparse.shape[0], dense.shape[1])
    return torch.addmm(out, sparse, dense, beta=0, out=out)


# Features per piece of _spmm_into_columns on CPU: the (piece, d) product stays in cache for its
# transposition (2,048 × 576 floats, 4.7 MB, was fastest of 128-8,192 on 2 cores).
_COLUMN_PIECE = 2048


def _spmm_into_columns(p: ActivePattern, values: Tensor, dense: Tensor, out: Tensor | None = None) -> Tensor:
    """(S_by_feature @ dense)ᵀ as a contiguous (d, n) tensor, for W_enc's (d_in, n) layout.

    The product comes out feature-major (n, d); autograd would copy its transpose into the
    parameter's layout, a cache-hostile strided copy that took 3.5× the product itself (25 ms
    against 7 at 16,384 × 576 on 2 CPU cores). On CPU the features go in pieces whose product
    is transposed while still in cache (14-16 ms in all). Elsewhere: the product, transposed.
    """
    by_feature = p.by_feature(values)
    n, d = p.shape[1], dense.shape[1]
    if dense.device.type != "cpu" or n <= _COLUMN_PIECE:
        product = _spmm(by_feature, dense).T
        return product.contiguous() if out is None else out.copy_(product)
    if out is None:
        out = dense.new_empty(d, n)
    piece = dense.new_empty(_COLUMN_PIECE, d)
    crow, cols, vals = by_feature.crow_indices(), by_feature.col_indices(), by_feature.values()
    bounds = crow[::_COLUMN_PIECE].tolist() + ([int(crow[-1])] if n % _COLUMN_PIECE else [])
    for i, start in enumerate(range(0, n, _COLUMN_PIECE)):
        end = min(start + _COLUMN_PIECE, n)
        lo, hi = bounds[i], bounds[i + 1]
        part = torch.sparse_csr_tensor(crow[start : end + 1] - lo, cols[lo:hi], vals[lo:hi], (end - start, dense.shape[0]),
                                       check_invariants=False)  # fmt: skip
        product = piece[: end - start]
        torch.addmm(product, part, dense, beta=0, out=product)
        out[:, start:end].copy_(product.T)
    return out


class _EncodeAt(torch.autograd.Function):
    """((x - b_dec) @ W_enc + b_enc) at the pattern's positions, (nnz,) float32.

    Forward only hands on the values the no-grad dense GEMM already computed; backward builds
    the weight gradients from the nnz positions alone.
    """

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, b_dec, pre_values, pattern: ActivePattern, ws: Workspace | None):
        ctx.pattern, ctx.ws = pattern, ws
        ctx.save_for_backward(x, W_enc, b_dec)
        return pre_values.to(torch.float32, copy=True)

    @staticmethod
    def backward(ctx, grad_values):
        x, W_enc, b_dec = ctx.saved_tensors
        p: ActivePattern = ctx.pattern
        need_x, need_W, need_b, need_bd = ctx.needs_input_grad[:4]
        grad_x = grad_W = grad_b = grad_bd = None
        with _no_autocast(x.device):
            gv = grad_values.float().contiguous()  # (nnz,)
            if need_W:
                xc = (x - b_dec).float()  # (batch, d)
                out = _leaving(ctx.ws, "grad_W_enc", W_enc.shape, torch.float32, x.device)
                grad_W = _spmm_into_columns(p, gv, xc, out).to(W_enc.dtype)  # (n, batch) @ (batch, d) -> (d, n)
            grad_b = gv.new_zeros(p.shape[1]).index_add_(0, p.cols, gv)  # (n,)
            if need_bd:
                grad_bd = -(W_enc.float() @ grad_b).to(b_dec.dtype)  # (d, n) @ (n,) -> (d,)
            if need_x:
                grad_x = _spmm(p.by_row(gv), W_enc.float().T).to(x.dtype)  # (batch, n) @ (n, d)
        return grad_x, grad_W, grad_b.to(W_enc.dtype) if need_b else None, grad_bd, None, None, None


class _DecodeAt(torch.autograd.Function):
    """Σ_j values[i, j] · W_dec[j] over the pattern's positions: (batch, d) float32, no b_dec."""

    @staticmethod
    def forward(ctx, values, W_dec, pattern: ActivePattern, ws: Workspace | None):
        ctx.pattern, ctx.ws = pattern, ws
        ctx.save_for_backward(values, W_dec)
        with _no_autocast(values.device):
            return _spmm(pattern.by_row(values.float()), W_dec.float())  # (batch, n) @ (n, d)

    @staticmethod
    def backward(ctx, grad_out):
        values, W_dec = ctx.saved_tensors
        p: ActivePattern = ctx.pattern
        grad_values = grad_W = None
        with _no_autocast(values.device):
            g = grad_out.float().contiguous()  # (batch, d)
            W = W_dec.float()
            if ctx.needs_input_grad[0]:
                # g_i · W_dec[j] only where (i, j) is active: an SDDMM, O(nnz·d).
                sampled = torch.sparse.sampled_addmm(p.by_row(values.float()), g, W.T, beta=0)
                grad_values = sampled.values()  # (nnz,), same order as the pattern
            if ctx.needs_input_grad[1]:
                out = _leaving(ctx.ws, "grad_W_dec", W_dec.shape, torch.float32, g.device)
                grad_W = _spmm(p.by_feature(values.float()), g, out).to(W_dec.dtype)  # (n, batch) @ (batch, d)
        return grad_values, grad_W, None, None


def encode_at(x, W_enc, b_enc, b_dec, pre_values: Tensor, pattern: ActivePattern, ws: Workspace | None = None) -> Tensor:
    """`ws`: where the weight gradient may live between steps (`_leaving`); one call per step
    and workspace (the main codes; AuxK's calls pass none)."""
    return _EncodeAt.apply(x, W_enc, b_enc, b_dec, pre_values, pattern, ws)


def decode_at(values: Tensor, W_dec: Tensor, pattern: ActivePattern, ws: Workspace | None = None) -> Tensor:
    """`ws`: as for `encode_at`."""
    return _DecodeAt.apply(values, W_dec, pattern, ws)


def _transposed_mm(a: Tensor, b: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """aᵀ @ b, contiguous, in `dtype` (default: the operands'), for a (batch, p) and b (batch, q):
    the weight gradients' GEMMs, which sum over the batch.

    On CPU in bfloat16 the GEMM kernel for a transposed first operand ran at about half the speed
    of the plain layout (batch 4,096, 2 cores: 97 against 51 ms at p 592, q 16,384; 85 against 68
    ms at p 16,384, q 576 with the copy back), while float32 and float16 ran the other way round,
    a little. There the smaller operand is copied transposed (a few MB) and, when that is b, the
    product is taken transposed, bᵀ a, and copied back into aᵀ b's layout (and dtype) in one pass.
    """
    dtype = dtype or a.dtype
    if a.device.type != "cpu" or a.dtype != torch.bfloat16:
        return (a.T @ b).to(dtype)
    if a.shape[1] <= b.shape[1]:
        return (a.T.contiguous() @ b).to(dtype)
    product = b.T.contiguous() @ a  # (q, p)
    return torch.empty(product.shape[1], product.shape[0], dtype=dtype, device=a.device).copy_(product.T)


class _DenseReLUAutoencoder(torch.autograd.Function):
    """f = ReLU((x - b_dec) W_enc + b_enc); x̂ = f W_dec + b_dec; s = Σ_batch f · l1_weight.

    Returns (x̂, s, f) with f non-differentiable (it is what the caller logs). Five GEMMs and no
    other pass over a (batch, n) tensor than the ReLU, its mask in backward and the fire counts:
    each GEMM carries one more inner row or column that does what would otherwise be a pass of
    its own. [x - b_dec, 1] @ [W_enc; b_enc] adds the encoder bias; [W_dec, l1_weight] makes the
    decoder GEMM sum each row's weighted codes (the L1 term); [g, ∂L/∂s] @ [W_dec, l1_weight]ᵀ
    adds the L1 gradient to every row of ∂L/∂pre; and [x - b_dec, 1]ᵀ @ ∂L/∂pre yields b_enc's
    gradient (the column sums) as its last row. At 4,096 × 4,096 in bfloat16 on 2 CPU cores each
    of those passes (a bias broadcast into the output, a column sum) took 3.5-4 ms.
    """

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, W_dec, b_dec, l1_weight, dtype: torch.dtype, ws: Workspace | None):
        ctx.set_materialize_grads(False)
        ctx.ws = ws
        (batch, d), n = x.shape, W_enc.shape[1]
        inner = _augmented_width(d)
        xa = _augmented(x - b_dec, 1.0, x.new_empty(batch, inner, dtype=dtype))  # (batch, inner)
        Wea = _with_bias_row(W_enc, b_enc, _leaving(ws, "W_enc_aug", (inner, n), dtype, x.device))  # (inner, n)
        Wda = _augmented(W_dec, l1_weight, _leaving(ws, "W_dec_aug", (n, inner), dtype, x.device))  # (n, inner)
        f = relu_(torch.mm(xa, Wea, out=_leaving(ws, "codes", (batch, n), dtype, x.device)))  # (batch, n)
        out = torch.mm(f, Wda)  # (batch, inner): f W_dec, then each row's Σ_j f_ij l1_weight_j
        x_hat = out[:, :d] + b_dec.to(dtype)
        l1_sum = out[:, d].sum(dtype=torch.float32)
        ctx.mark_non_differentiable(f)
        ctx.save_for_backward(xa, W_enc, Wea, Wda, f)
        return x_hat, l1_sum, f

    @staticmethod
    def backward(ctx, grad_x_hat, grad_l1_sum, _grad_f):
        xa, W_enc, Wea, Wda, f = ctx.saved_tensors
        (batch, n), d = f.shape, W_enc.shape[0]
        dtype = f.dtype
        need_x, need_We, need_be, need_Wd, need_bd, need_w = ctx.needs_input_grad[:6]
        with _no_autocast(f.device):
            g = grad_x_hat.to(dtype) if grad_x_hat is not None else f.new_zeros(batch, d)  # (batch, d)
            grad_W_dec = _transposed_mm(f, g, W_enc.dtype) if need_Wd else None  # (n, batch) @ (batch, d)
            # dL/dpre = (g W_decᵀ + ∂L/∂s · l1_weight) where f > 0, else 0: one GEMM and one
            # in-place mask, into a workspace buffer (it never leaves this function; a fresh one
            # page-faults).
            l1_scale = grad_l1_sum if grad_l1_sum is not None else 0.0
            ga = _augmented(g, l1_scale, g.new_empty(batch, Wda.shape[1]))  # (batch, inner)
            grad_pre = _scratch(ctx.ws, "grad_pre", (batch, n), dtype, f.device)
            torch.mm(ga, Wda.T, out=grad_pre)  # (batch, n)
            mask_where_inactive_(grad_pre, f)
            grad_enc = _transposed_mm(xa, grad_pre)  # (inner, n): W_enc's gradient, then b_enc's (column sums)
            grad_W_enc, grad_b_enc = grad_enc[:d], grad_enc[d].float()
            # b_dec enters twice: added to x̂, and subtracted from x before the encoder.
            grad_b_dec = g.sum(0, dtype=torch.float32) - W_enc.float() @ grad_b_enc if need_bd else None
            grad_w = column_sums(f) * grad_l1_sum if need_w and grad_l1_sum is not None else None
            grad_x = grad_pre @ Wea[:d].T if need_x else None  # (batch, n) @ (n, d)
        return (
            grad_x,
            grad_W_enc.to(W_enc.dtype) if need_We else None,
            grad_b_enc if need_be else None,
            grad_W_dec,
            grad_b_dec,
            grad_w,
            None,
            None,
        )


# The workspace buffers each ReLU path keeps between steps (the (batch, n) ones, the dense path's
# augmented weight copies, the sparse path's compare mask): a ReLU SAE releases the other path's
# when it switches (Workspace.release).
DENSE_PATH_BUFFERS = ("grad_pre", "fire_mask", "W_enc_aug", "W_dec_aug", "codes")
SPARSE_PATH_BUFFERS = ("pre", "mask", "grad_W_enc", "grad_W_dec")


def relu_autoencoder(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    W_dec: Tensor,
    b_dec: Tensor,
    l1_weight: Tensor,
    *,
    sparse: bool,
    ws: Workspace | None,
) -> tuple[Tensor, Tensor, Tensor | SparseFeatures, Tensor]:
    """A ReLU SAE's forward: x̂ (batch, d), Σ_batch Σ_j f_ij·l1_weight_j, the features (dense
    and detached, or sparse), and each feature's fire count over the batch (n,)."""
    dtype = compute_dtype(x, W_enc)
    if not sparse:
        x_hat, l1_sum, f = _DenseReLUAutoencoder.apply(x, W_enc, b_enc, W_dec, b_dec, l1_weight, dtype, ws)
        return x_hat, l1_sum, f, dense_fire_counts(f, ws)
    with torch.no_grad():
        pre = dense_pre_activations(x, W_enc, b_enc, b_dec, dtype, ws)  # (batch, n)
        flat = _positions(order_keys(pre).view(-1), torch.gt, 0, pre.shape[1], ws)  # (nnz,) ascending
        pre_values = pre.view(-1)[flat]
    pattern = ActivePattern.from_flat(flat, tuple(pre.shape))
    values = encode_at(x, W_enc, b_enc, b_dec, pre_values, pattern, ws)  # (nnz,), all > 0
    x_hat = decode_at(values, W_dec, pattern, ws) + b_dec  # (batch, d)
    with _no_autocast(x.device):  # a float32 dot: under CPU bf16 autocast `@` ran a bf16 dot, 450x slower, rounded
        l1_sum = torch.dot(values, l1_weight[pattern.cols].to(values.dtype))
    return x_hat, l1_sum, pattern.features(values), pattern.per_feature()  # every value is > 0


@torch.no_grad()
def row_topk_indices(pre: Tensor, k: int) -> Tensor:
    """(batch, k) columns of each row's k largest entries, in no particular order.

    The top-k runs on `order_keys(pre)`: a row with at least k non-negative entries gets a top-k
    of the same values (ties may pick other columns of equal value); a row with fewer gets its
    non-negative entries plus some negative ones, which the ReLU that follows every top-k here
    turns into zeros as it would the float top-k's. On CPU: 48 against 62 ms in bfloat16, 65
    against 82 ms in float32, at 4,096 × 16,384, k 32, on 2 cores.
    """
    return order_keys(pre).topk(k, dim=1, sorted=False).indices


@torch.no_grad()
def topk_pattern(pre: Tensor, k: int, n: int, columns: Tensor | None = None) -> tuple[ActivePattern, Tensor]:
    """Each row's k largest pre-activations (only their ReLU is used): (pattern, values
    (batch·k,) batch-major).

    `columns` (ascending) says which of the n features pre's columns are, when pre is a subset.
    """
    idx = row_topk_indices(pre, k).sort(dim=1).values  # (batch, k)
    values = pre.gather(1, idx)
    idx = idx.int()
    if columns is not None:
        idx = columns[idx]
    return ActivePattern.from_topk(idx, n), values.reshape(-1)




@torch.no_grad()
def batch_topk_flat(pre: Tensor, total: int, ws: Workspace | None) -> Tensor:
    """Ascending flat indices of the `total` largest entries of pre (batch, n), exactly.

    A top-k over all batch·n entries costs several times the encoder GEMM on CPU. Instead: take
    the cut from a strided sample, keep the entries above it (a compare and a nonzero, about
    1.1× total of them), and run the exact top-k over those. A cut that keeps too few is
    lowered; the answer is exact either way, only the speed depends on the sample.

    All of it runs on `order_keys(pre)`: the full-size compare is 30 against 43 ms in bfloat16 at
    4,096 × 16,384 on 2 CPU cores. Where fewer than `total` entries are ≥ 0 the negative ones
    chosen may differ from the float top-k's; the ReLU after the selection zeroes them either way.
    """
    flat = order_keys(pre).view(-1)
    size = flat.numel()
    if total >= size:
        return torch.arange(size, device=pre.device)
    stride = max(1, total // 1024)
    while math.gcd(stride, pre.shape[1]) != 1:  # a stride sharing a factor with n sees few columns
        stride += 1
    sample = flat[::stride]
    expected = total * sample.numel() / size
    for margin in (1.1, 1.5, 3.0):
        keep = min(sample.numel(), math.ceil(margin * expected + 4 * math.sqrt(expected) + 1))
        if keep == sample.numel():
            break
        cut = sample.topk(keep, sorted=False).values.min()
        candidates = _positions(flat, torch.ge, cut, pre.shape[1], ws)  # (≥ total,) hopefully
        if candidates.numel() >= total:
            chosen = candidates[flat[candidates].topk(total, sorted=False).indices]
            return chosen.sort().values
    return flat.topk(total, sorted=False).indices.sort().values


@torch.no_grad()
def remove_parallel_component_(grad: Tensor, W: Tensor, ws: Workspace | None = None) -> None:
    """grad_i -= (grad_i · ŵ_i) ŵ_i for every row i of W, in place: one rowwise dot, one axpy.

    The dot's elementwise product goes through a workspace buffer: torch.linalg.vecdot allocates
    an (n, d) temporary, and faulting its pages in took 3× the arithmetic (13 against 4.5 ms at
    16,384 × 576 on 2 CPU cores). GPUs' caching allocators do not fault: no buffer kept there;
    nor for DTensors (FSDP2), whose product stays shard-local."""
    if ws is not None and grad.device.type == "cpu" and type(grad) is Tensor:
        product = torch.mul(grad, W, out=ws.get("row_dot", tuple(grad.shape), grad.dtype, grad.device))
    else:
        product = grad * W
    coeff = product.sum(1) / torch.linalg.vector_norm(W, dim=1).square()  # (n,)
    grad.addcmul_(coeff.unsqueeze(1), W, value=-1)


@torch.no_grad()
def normalize_rows_(W: Tensor) -> None:
    W.div_(torch.linalg.vector_norm(W, dim=1, keepdim=True))
