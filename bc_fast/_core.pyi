"""Type stubs for the compiled core (csrc/bindings.cpp)."""

from typing import Any

import numpy as np
import numpy.typing as npt

class FusedOp:
    """A layer program; build it through :class:`bc_fast.FusedTransform`."""

    def __init__(
        self,
        weights: list[npt.NDArray[np.float32]],
        biases: list[npt.NDArray[np.float32] | None],
        activations: list[str],
        activation_widths: list[int],
        normalize: bool = False,
        precision: str = "fp32",
    ) -> None: ...
    @property
    def precision(self) -> str:
        """'fp32', or 'bf16' (bf16 operands, fp32 accumulation)."""
    @property
    def d_in(self) -> int: ...
    @property
    def d_out(self) -> int: ...
    @property
    def num_layers(self) -> int: ...
    def apply(
        self,
        x: npt.NDArray[Any],
        out: npt.NDArray[Any] | None = None,
        out_float16: bool = False,
        threads: int = 0,
    ) -> npt.NDArray[Any]: ...

def build_info() -> dict[str, Any]: ...
def get_num_threads() -> int: ...
def set_num_threads(n: int) -> None: ...
def _mark_forked_child() -> None: ...
def set_simd_level(level: str) -> None:
    """Select the kernel set: 'generic', 'avx2' or 'avx512' (testing and benchmarking).

    Raises ValueError naming the usable levels if ``level`` is unknown or this CPU or build cannot
    run it. The starting level is the best usable one, or the one ``BC_FAST_SIMD`` forces (an
    unusable or unknown ``BC_FAST_SIMD`` falls back to the best usable level).
    """
def bf16_unavailable_reason() -> str:
    """Why precision='bf16' cannot run now (CPU without AVX512_BF16, SIMD level forced below avx512, or a
    build without the kernels), or '' where it can."""
def usable_simd_levels() -> list[str]:
    """The kernel sets this build can run on this CPU, lowest first ('generic', then 'avx2', 'avx512')."""

def _set_small_split(mode: int) -> None:
    """Private, for tests and benchmarks: the small-batch column split over the calling thread and one
    helper thread: 0 off, 1 on (the default unless BC_FAST_SMALL_SPLIT=0), 2 on with every chunk left to
    the helper. ValueError for other values."""
def _small_split_helper_jobs() -> int:
    """Private, for tests: jobs the small-batch split's helper thread has run chunks of."""
def _threads_in_use() -> int:
    """Worker threads currently claimed from the process-wide budget by running applies (private, for tests)."""
