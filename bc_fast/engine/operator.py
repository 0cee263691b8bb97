"""FusedTransform: the Python face of the compiled core.

A fused operator is a short program of layers. Each layer computes
``y = x @ W.T + b`` and then applies an activation to its leading
``activation_width`` outputs (all of them by default). The program may end with
an L2 normalisation of each output row. A single affine layer is the common case:
a chain of linear backward transforms collapsed into one matrix and bias.
"""

from __future__ import annotations

import warnings
from typing import Any, Iterable, Sequence

import numpy as np

from .. import _core
from .._util.arrays import (
    as_numpy,
    bfloat16,
    is_bfloat16,
    is_row_dtype,
    is_torch,
    to_torch,
)
from ._checks import INT_MAX, check_threads
from .layer import Layer, validate_layer
from .onednn import BF16_BACKENDS, requested_bf16_backend, resolve_bf16_backend
from .runtime import bf16_speed

PRECISIONS = ("fp32", "bf16")
_NDARRAY = np.ndarray
_FLOAT16 = np.dtype(np.float16)


def _out_dtype(out_dtype: Any) -> np.dtype:
    """``out_dtype`` as float32, float16 or bfloat16: a name (``"float16"``), a numpy / ml_dtypes dtype or a torch
    dtype (``torch.float16``, read by name: torch is not imported); TypeError naming the argument otherwise."""
    text = str(out_dtype).removeprefix("torch.")
    if text == "bfloat16":
        return bfloat16()
    if text in ("float32", "float16"):
        return np.dtype(text)
    try:
        dt = np.dtype(out_dtype)
    except TypeError as e:
        raise TypeError(f"out_dtype must be float32, float16 or bfloat16, got {out_dtype!r}") from e
    if not is_row_dtype(dt):
        raise _dtype_error("out_dtype", dt, array=False)
    return dt


def _dtype_error(name: str, dt: np.dtype, *, array: bool = True) -> TypeError:
    """The TypeError for a dtype the core does not take (``name`` an array, or a dtype argument if not ``array``);
    a byte-swapped float32/float16/bfloat16 is named as such."""
    if not dt.isnative and is_row_dtype(dt.newbyteorder("=")):
        fix = f"convert it with {name}.astype({name}.dtype.newbyteorder('='))" if array else f"pass {name}={dt.name!r}"
        return TypeError(f"{name} must be native-endian float32, float16 or bfloat16, got byte-swapped {dt.name} "
                         f"(dtype {dt.str}); {fix}")
    fix = f"convert it with {name}.astype(np.float32)" if array else f"pass {name}='float32'"
    return TypeError(f"{name} must be float32, float16 or bfloat16, got dtype {dt}; {fix}")


def _on_host(a: Any) -> bool:
    """True for numpy arrays and CPU torch tensors: cheap, so that they skip the GPU dispatch."""
    return isinstance(a, np.ndarray) or (is_torch(a) and getattr(a, "is_cuda", True) is False)


def _check_batch(a: np.ndarray, name: str, dim: int) -> None:
    if isinstance(a, np.ma.MaskedArray):
        raise TypeError(f"{name} is a masked array, whose mask the core would ignore; "
                        f"pass {name}.filled(value) or {name}.data")
    if a.ndim != 2:
        hint = " Reshape your data with x.reshape(1, -1) for a single vector." if a.ndim == 1 else ""
        raise ValueError(f"Expected {name} to be a 2-D array (n, {dim}), got {a.ndim}-D array of shape {a.shape}.{hint}")
    if not is_row_dtype(a.dtype):
        raise _dtype_error(name, a.dtype)
    if a.shape[1] != dim:
        raise ValueError(f"{name} has {a.shape[1]} features per row, expected {dim}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous (row-major); pass np.ascontiguousarray({name})")
    if not a.flags.aligned:
        raise ValueError(f"{name} is not aligned to its {a.dtype} item size; pass {name}.copy()")


def _warn_if_bf16_is_slower() -> None:
    """precision='bf16' on a CPU where it measured slower than fp32: say so (RuntimeWarning), once per place."""
    info = _core.build_info()
    verdict, why = bf16_speed(info["cpu"], info["cpu_vendor"], info["bf16"])
    if verdict == "slower":
        warnings.warn(f"precision='bf16' is slower than 'fp32' on this CPU: {why}", RuntimeWarning, stacklevel=3)


def host_batch(x: Any, out: Any, out_dtype: Any, d_in: int, d_out: int) -> tuple[np.ndarray, np.ndarray, Any]:
    """Check a host batch and its output for the core: ``(x as numpy, out as numpy, what apply returns)``.

    ``out`` None: a new (n, d_out) array of ``out_dtype`` (default float32), a torch tensor if ``x`` was
    one. Otherwise ``out`` itself, checked for shape, dtype, writeability and overlap with ``x``.
    """
    xa, x_is_torch = as_numpy(x, "x")
    _check_batch(xa, "x", d_in)
    if out is None:
        dt = np.dtype(np.float32) if out_dtype is None else _out_dtype(out_dtype)
        oa = np.empty((xa.shape[0], d_out), dtype=dt)
        return xa, oa, (to_torch(oa) if x_is_torch else oa)
    oa, _ = as_numpy(out, "out")
    _check_batch(oa, "out", d_out)
    if oa.shape[0] != xa.shape[0]:
        raise ValueError(f"out has {oa.shape[0]} rows but x has {xa.shape[0]}")
    if out_dtype is not None and _out_dtype(out_dtype) != oa.dtype:
        raise ValueError(f"out_dtype={_out_dtype(out_dtype)} disagrees with out.dtype={oa.dtype}")
    if not oa.flags.writeable:
        raise ValueError("out is read-only; pass a writeable array (e.g. np.empty_like)")
    if np.may_share_memory(xa, oa):
        raise ValueError("out must not overlap x; the transform is not computed in place")
    return xa, oa, out


def apply_on_host(core: Any, x: Any, out: Any, out_dtype: Any, threads: int | None, d_in: int, d_out: int) -> Any:
    """The fully checked host path of ``apply`` for a core operator (FusedOp or RoutedOp): the batch and its
    output checked by :func:`host_batch`, ``threads`` by ``check_threads``, then the core (GIL released)."""
    xa, oa, result = host_batch(x, out, out_dtype, d_in, d_out)
    n_threads = 0 if threads is None else check_threads(threads)
    if xa.shape[0]:
        core.apply(xa, oa, False, n_threads)
    return result


class FusedTransform:
    """A fused layer program applied to batches by the compiled core.

    Parameters
    ----------
    layers : sequence of Layer
        Applied in order; ``layers[i+1].d_in == layers[i].d_out``.
    normalize : bool, default False
        L2-normalise every output row (``y / max(||y||, 1e-12)``).
    precision : {"fp32", "bf16"}, default "fp32"
        Arithmetic of the matrix products. ``"bf16"`` (opt in) rounds the weights (once, here) and
        each layer's input rows to bfloat16, round-to-nearest-even, and multiplies them with fp32
        accumulation (AVX512-BF16 ``vdpbf16ps``); bias, activations, normalisation and the output
        stay fp32 (or fp16 on request). Inputs and outputs keep their dtypes. Per output of a layer,
        with ``S = sum_k |x_k| |w_k|``: ``|y - y_exact| <= (2**-7 + 2**-16) * S + 1.01 * (d_in + 2) *
        2**-24 * (S + |b|) + (d_in + 1) * 2**-126 * (1 + max |w|)``. Each operand carries a relative
        rounding error of at most ``2**-8``, so each product at most ``2 * 2**-8 + 2**-16`` (c = 2 in
        ``c * 2**-8 * S``); the fp32 sum, which starts from the bias, adds at most ``d_in + 2``
        roundings of ``2**-24``; the last term covers subnormals, which ``vdpbf16ps`` flushes to zero.
        Errors propagate through later layers as through any perturbation (``|W| e``, times 1.13 for
        GELU). Typical errors are far smaller (random signs cancel). Finite inputs beyond bf16's
        largest value (about 3.39e38) round to Inf. Needs a CPU with AVX512_BF16 (AMD Zen 4 and
        later, Intel Cooper Lake and Sapphire Rapids and later) and the avx512 kernel level
        (large fp32-in/fp32-out batches then run about 1.8-2x faster than ``"fp32"``, measured on
        Zen 4): elsewhere, or with ``BC_FAST_SIMD`` forcing a
        lower level, it raises RuntimeError naming the missing feature
        (``build_info()["bf16"]`` says beforehand). Applies to the CPU core; on a GPU the dtype of
        ``x`` chooses the arithmetic.
    bf16_backend : {"auto", "native", "onednn"}, optional
        Who runs the bf16 matrix products (``precision="bf16"`` only). ``"native"``: the core's
        AVX512-BF16 kernels. ``"onednn"``: oneDNN's matmul, loaded at run time from the optional
        ``onednn-cpu-gomp`` wheel (``pip install "bc-fast[onednn]"``; RuntimeError without it); on
        CPUs with AMX it runs on the tile units, and it needs no AVX512_BF16 of its own. Same
        rounding of operands and the same bound as above; within one backend, results are
        bit-identical for every thread count (the two backends sum in different orders). oneDNN
        costs about 10 µs a call, so batches of at most ``build_info()["small_batch_rows"]`` rows
        run on the native kernels where the CPU has them (batch 1 at 256→256: 1.9 µs, not 10.8). Default:
        ``$BC_FAST_BF16_BACKEND``, else ``"auto"``: oneDNN where the CPU has AMX bf16 and oneDNN
        loads, else native. See :attr:`bf16_backend` and ``build_info()["bf16_backend"]``.

    Examples
    --------
    >>> W = np.eye(4, dtype=np.float32)
    >>> op = FusedTransform.affine(W, np.zeros(4, np.float32))
    >>> op.apply(np.ones((2, 4), np.float32)).shape
    (2, 4)
    """

    def __init__(self, layers: Sequence[Layer], *, normalize: bool = False, precision: str = "fp32",
                 bf16_backend: str | None = None) -> None:
        if isinstance(layers, Layer) or not isinstance(layers, Iterable) or isinstance(layers, (str, bytes, dict)):
            raise TypeError(f"layers must be a sequence of bc_fast.Layer, got {type(layers).__name__}; "
                            "wrap a single layer as [layer]")
        if not isinstance(normalize, (bool, np.bool_)):
            raise TypeError(f"normalize must be True or False, got {normalize!r}")
        if not isinstance(precision, str) or precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        layers = list(layers)
        if not layers:
            raise ValueError("a FusedTransform needs at least one layer")
        checked: list[Layer] = []
        d_prev = None
        for i, layer in enumerate(layers):
            checked.append(validate_layer(layer, f"layers[{i}]", d_prev))
            d_prev = checked[-1].d_out
        backend = "native"
        if precision == "bf16":
            backend = resolve_bf16_backend(bf16_backend)
        elif bf16_backend is not None and bf16_backend != "auto":
            if bf16_backend not in BF16_BACKENDS:
                raise ValueError(f"bf16_backend must be one of {BF16_BACKENDS}, got {bf16_backend!r}")
            raise ValueError(f"bf16_backend={bf16_backend!r} applies to precision='bf16' only, not {precision!r}")
        if backend == "native" and precision == "bf16":
            _warn_if_bf16_is_slower()
        self.layers: tuple[Layer, ...] = tuple(checked)
        self.normalize = bool(normalize)
        args = ([l.weight for l in checked], [l.bias for l in checked], [l.activation for l in checked],
                [l.d_out if l.activation_width is None else l.activation_width for l in checked], self.normalize,
                precision)
        try:
            try:
                self._op = _core.FusedOp(*args, backend)
            except RuntimeError:
                if backend != "onednn" or requested_bf16_backend(bf16_backend) != "auto":
                    raise
                self._op = _core.FusedOp(*args, "native")  # "auto": oneDNN refused this shape, the core's own kernels run it
        except MemoryError as e:
            nbytes = sum(2 * 4 * l.weight.size for l in checked)  # the core's copy and its packed panels
            raise MemoryError(f"not enough memory to build the operator: its weights need about {nbytes:,} bytes "
                              "in the core") from e

    @classmethod
    def affine(cls, weight: np.ndarray, bias: np.ndarray | None = None, *, normalize: bool = False,
               precision: str = "fp32", bf16_backend: str | None = None) -> "FusedTransform":
        """One affine layer ``y = x @ weight.T + bias``."""
        return cls([Layer(weight, bias)], normalize=normalize, precision=precision, bf16_backend=bf16_backend)

    @property
    def precision(self) -> str:
        """Arithmetic of the matrix products: ``"fp32"``, or ``"bf16"`` (bf16 operands, fp32 accumulation)."""
        return str(self._op.precision)

    @property
    def bf16_backend(self) -> str:
        """Who runs the bf16 matrix products: ``"native"`` (also for fp32 operators) or ``"onednn"``."""
        return str(self._op.bf16_backend)

    @property
    def d_in(self) -> int:
        """Number of input features."""
        return self.layers[0].d_in

    @property
    def d_out(self) -> int:
        """Number of output features."""
        return self.layers[-1].d_out

    def __repr__(self) -> str:
        shape = " -> ".join([str(self.d_in)] + [
            f"{l.d_out}{'' if l.is_affine else '(' + l.activation + ')'}" for l in self.layers])
        bf16 = ", precision='bf16'" if self.precision == "bf16" else ""
        if self.bf16_backend == "onednn":
            bf16 += ", bf16_backend='onednn'"
        return f"FusedTransform({shape}{', normalize' if self.normalize else ''}{bf16})"

    def apply(self, x: Any, *, out: Any = None, out_dtype: Any = None, threads: int | None = None) -> Any:
        """Apply the program to a batch of rows.

        Parameters
        ----------
        x : ndarray or CPU torch tensor of shape (n, d_in), float32 or float16, C-contiguous
            Used in place, without a copy.
        out : ndarray or CPU torch tensor of shape (n, d_out), float32 or float16, optional
            Written in place; must not overlap ``x``.
        out_dtype : float32 or float16, optional
            Output dtype when ``out`` is not given (default float32).
        threads : int, optional
            Worker threads for this call, in [1, 2**31 - 1] (at most 1024 are used).
            Default: :func:`get_num_threads` (bc_fast's own setting, not OpenMP's or
            torch's). Batches of at most ``build_info()["small_batch_rows"]`` rows run
            on the calling thread unless they carry enough work to be worth splitting;
            with ``threads >= 2``, a small fp32 batch may also hand half of each
            layer's output columns to one persistent helper thread (bit-identical
            results; it checks itself and stays off where it does not pay;
            ``BC_FAST_SMALL_SPLIT=0`` turns it off, ``build_info()["small_split"]``).
            Calls running at once from several Python threads share one budget of
            :func:`get_num_threads` threads (or of ``threads``, if larger): each takes up
            to ``threads`` of what is free, never waits, and always has its own calling
            thread, so k callers do not start k full thread teams on the same cores.
            Results are bit-identical for every thread count. In a process forked from
            one that had imported bc_fast, the core always runs on the calling thread
            (the parent's OpenMP pool, possibly torch's, does not survive ``fork``):
            import bc_fast before forking workers that use it. Ignored on the GPU.

        Returns
        -------
        ndarray (or torch tensor, if ``x`` was one) of shape (n, d_out)

        Notes
        -----
        A CUDA array ``x`` (torch CUDA tensor, ``__cuda_array_interface__`` object such as a
        CuPy array, DLPack producer on a CUDA device) runs on its device and current stream,
        zero-copy, through the optional ``bc_fast._cuda`` module: float32, float16 or bfloat16
        in and out, ``out_dtype`` defaulting to x's dtype, the result of x's kind (a torch
        tensor for other DLPack producers), queued without waiting. See
        :func:`bc_fast.engine.cuda.apply_fused`. Without that module a clear RuntimeError says how
        to build it.
        """
        if type(x) is _NDARRAY and (out is None or type(out) is _NDARRAY):
            # The core checks shape, dtype, contiguity, alignment and overlap itself. On any
            # complaint, fall through to the full validation below for a precise message. The
            # plain call (no out_dtype, no threads) is tested first: at batch 1 every attribute
            # lookup on the way to the core is a visible part of the call.
            if out_dtype is None and threads is None:
                try:
                    return self._op.apply(x, out, False, 0)  # returns `out` itself when given
                except (ValueError, TypeError):
                    pass
            elif threads is None or (type(threads) is int and 0 < threads <= INT_MAX):
                dt = None if out_dtype is None else _out_dtype(out_dtype)
                if (dt is None or out is None or out.dtype == dt) and (dt is None or not is_bfloat16(dt)):
                    try:
                        return self._op.apply(x, out, dt is not None and dt == _FLOAT16, threads or 0)
                    except (ValueError, TypeError):
                        pass
        if not _on_host(x) or (out is not None and not _on_host(out)):
            from . import cuda  # only here: host arrays never import the GPU path

            if cuda.is_cuda_array(x) or cuda.is_cuda_array(out):
                return cuda.apply_fused(self, x, out=out, out_dtype=out_dtype, threads=threads)
        return apply_on_host(self._op, x, out, out_dtype, threads, self.d_in, self.d_out)

    __call__ = apply
