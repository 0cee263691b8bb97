"""GPU table conversion (bc_fast.convert.gpu).

Most tests drive the pipeline through ``FakeCuda``: a stand-in for the ``bc_fast._cuda``
module with the same API (pinned/device buffers, streams, events, async copies,
CudaFusedOp) that queues work per stream and, in its default "lazy" mode, runs it only
when something waits for it (an event, a stream synchronisation, a stream waiting on an
event). Lazy execution is the most adversarial legal schedule: a missing event wait
shows up as wrong bytes (a pinned buffer read before its copy ran, or overwritten
before its copy ran). Its compute is the CPU core, so the output must be byte-identical
to the CPU path. Tests marked ``gpu`` run the real module and are skipped, visibly,
without a GPU.
"""

from __future__ import annotations

import ctypes
import functools
import json
import signal
import subprocess
import sys
import threading
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bc_fast import FusedTransform, Layer
from bc_fast.convert import gpu as convert_gpu
from bc_fast.engine import device
from bc_fast.convert import apply_to_table, read_sidecar

# --------------------------------------------------------------------------- the fake CUDA module


class _Marker:
    def __init__(self, stream: "_Stream") -> None:
        self.stream, self.done = stream, False


class _Stream:
    def __init__(self, fake: "FakeCuda", device: int) -> None:
        fake._check_device(device)
        self.fake, self.device, self.queue = fake, device, deque()
        self.ptr = fake._new_handle(self)

    def synchronize(self) -> None:
        with self.fake.lock:
            self.fake._drain(self)


class _Event:
    def __init__(self, fake: "FakeCuda", device: int) -> None:
        fake._check_device(device)
        self.fake, self.marker = fake, None

    def record(self, stream_ptr: int) -> None:
        with self.fake.lock:
            s = self.fake.handles[stream_ptr]
            m = _Marker(s)
            self.marker = m
            self.fake._enqueue(s, "record", lambda: setattr(m, "done", True))

    def synchronize(self) -> None:
        with self.fake.lock:
            self.fake._run_until(self.marker)

    def query(self) -> bool:
        return self.marker is None or self.marker.done


class _Buffer:
    def __init__(self, fake: "FakeCuda", nbytes: int, device: int | None) -> None:
        if device is not None:
            fake._check_device(device)
        self.arr = np.zeros(max(int(nbytes), 1), np.uint8)
        self.nbytes, self.device, self.ptr = int(nbytes), device, int(self.arr.ctypes.data)
        fake.buffers.append(self)


class _FusedOp:
    def __init__(self, fake: "FakeCuda", weights: list, biases: list, activations: list, widths: list,
                 normalize: bool) -> None:
        self.fake = fake
        self.op = FusedTransform([Layer(w, b, a, n) for w, b, a, n in zip(weights, biases, activations, widths)],
                                 normalize=normalize)
        self.d_in, self.d_out, self.num_layers = self.op.d_in, self.op.d_out, len(weights)

    def apply(self, x_ptr: int, x_dtype: str, n: int, out_ptr: int, out_dtype: str, device: int, stream: int,
              trusted: bool = False) -> None:
        assert trusted, "the pipeline's buffers are its own: it tells the core so"
        f = self.fake
        with f.lock:
            s = f.handles[stream]
            if s.device != device:
                raise ValueError(f"stream of device {s.device} used for device {device}")
            x = f._view(x_ptr, n * self.d_in * np.dtype(x_dtype).itemsize, device).view(x_dtype).reshape(n, self.d_in)
            y = f._view(out_ptr, n * self.d_out * np.dtype(out_dtype).itemsize, device).view(out_dtype)
            y = y.reshape(n, self.d_out)

            def run() -> None:
                f.computed += 1
                if f.fail_compute_at is not None and f.computed == f.fail_compute_at:
                    raise RuntimeError("cublasLtMatmul failed: CUBLAS_STATUS_EXECUTION_FAILED (fake)")
                self.op.apply(x, out=y)
            f._enqueue(s, "compute", run)


class FakeCuda:
    """The ``bc_fast._cuda`` API on the CPU. ``mode``: "lazy" (run queued work only when waited
    for) or "eager" (run each operation when it is enqueued)."""

    def __init__(self, *, devices: int = 1, available: bool = True, mode: str = "lazy",
                 fail_compute_at: int | None = None) -> None:
        self.devices, self.available, self.mode = devices, available, mode
        self.fail_compute_at, self.computed = fail_compute_at, 0
        self.lock = threading.RLock()
        self.handles: dict[int, Any] = {}
        self.buffers: list[_Buffer] = []
        self.queued = {"h2d": 0, "d2h": 0, "compute": 0, "record": 0, "wait": 0}
        self.max_queued = dict(self.queued)
        self.enqueued = dict(self.queued)
        self.executed: list[str] = []
        self.PinnedBuffer = functools.partial(_Buffer, self, device=None)
        self.DeviceBuffer = functools.partial(_Buffer, self)
        self.Stream = functools.partial(_Stream, self)
        self.Event = functools.partial(_Event, self)
        self.CudaFusedOp = functools.partial(_FusedOp, self)

    def device_info(self) -> dict:
        return {"available": self.available, "error": "" if self.available else "no CUDA-capable device is detected",
                "device_count": self.devices if self.available else 0, "driver_version": 13000,
                "runtime_version": 13000, "cublas_version": 0,
                "devices": [{"index": i, "name": "Fake GPU", "compute_capability": "9.0", "total_memory": 1 << 30}
                            for i in range(self.devices if self.available else 0)]}

    # -- the API's functions
    def memcpy_async(self, dst: int, src: int, nbytes: int, kind: str, stream_ptr: int) -> None:
        with self.lock:
            s = self.handles[stream_ptr]
            if kind not in ("h2d", "d2h"):
                raise ValueError(f"kind {kind!r}")
            d_dev, s_dev = (s.device, None) if kind == "h2d" else (None, s.device)
            d, sv = self._view(dst, nbytes, d_dev), self._view(src, nbytes, s_dev)
            self._enqueue(s, kind, lambda: np.copyto(d, sv))

    def stream_wait_event(self, stream_ptr: int, event: _Event) -> None:
        with self.lock:
            m = event.marker
            self._enqueue(self.handles[stream_ptr], "wait", lambda: self._run_until(m))

    # -- machinery
    def _check_device(self, device: int) -> None:
        if not 0 <= device < self.devices:
            raise ValueError(f"invalid device {device}")

    def _new_handle(self, obj: Any) -> int:
        ptr = 0x1000 + len(self.handles)
        self.handles[ptr] = obj
        return ptr

    def _view(self, ptr: int, nbytes: int, device: int | None) -> np.ndarray:
        for b in self.buffers:
            if b.ptr <= ptr and ptr + nbytes <= b.ptr + b.nbytes:
                if b.device != device:
                    raise ValueError(f"pointer {ptr:#x} is on {b.device}, expected {device}")
                return b.arr[ptr - b.ptr: ptr - b.ptr + nbytes]
        if device is None:  # pageable host memory (a numpy array), as cudaMemcpyAsync accepts
            return np.frombuffer((ctypes.c_char * nbytes).from_address(ptr), np.uint8)
        raise ValueError(f"pointer {ptr:#x} (+{nbytes}) is not inside any device buffer")

    def _enqueue(self, s: _Stream, kind: str, fn: Any) -> None:
        s.queue.append((kind, fn))
        self.queued[kind] += 1
        self.enqueued[kind] += 1
        self.max_queued[kind] = max(self.max_queued[kind], self.queued[kind])
        if self.mode == "eager":
            self._drain(s)

    def _step(self, s: _Stream) -> None:
        kind, fn = s.queue.popleft()
        self.queued[kind] -= 1
        fn()
        self.executed.append(kind)

    def _drain(self, s: _Stream) -> None:
        while s.queue:
            self._step(s)

    def _run_until(self, m: _Marker | None) -> None:
        while m is not None and not m.done:
            if not m.stream.queue:
                raise RuntimeError("fake CUDA: waiting on an event that can never complete")
            self._step(m.stream)


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeCuda:
    f = FakeCuda()
    monkeypatch.setattr(device, "_cuda_module", lambda: f)
    return f


# --------------------------------------------------------------------------- helpers


def _op(d_in: int = 24, d_out: int = 16, mlp: bool = False, normalize: bool = False) -> FusedTransform:
    rng = np.random.default_rng(0)
    w1 = (rng.standard_normal((d_out if not mlp else 40, d_in)) / np.sqrt(d_in)).astype(np.float32)
    b1 = rng.standard_normal(w1.shape[0]).astype(np.float32)
    if not mlp:
        return FusedTransform([Layer(w1, b1)], normalize=normalize)
    w2 = (rng.standard_normal((d_out, 40)) / np.sqrt(40)).astype(np.float32)
    return FusedTransform([Layer(w1, b1, "gelu", 30), Layer(w2, None)], normalize=normalize)


def _table(path: Path, rows: int = 1000, dim: int = 24, dtype: Any = np.float32) -> Path:
    np.save(path, np.random.default_rng(1).standard_normal((rows, dim)).astype(dtype))
    return path


def _leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name != "in.npy")


# --------------------------------------------------------------------------- device strings


@pytest.mark.parametrize("dev, want", [("cpu", None), (None, None), ("cuda", 0), ("cuda:0", 0), ("cuda:3", 3)])
def test_parse_device(dev: Any, want: int | None) -> None:
    assert device.parse_device(dev) == want


@pytest.mark.parametrize("dev", ["gpu", "cuda:", "cuda:-1", "CUDA", "cuda:1x", 0, "cuda:0,1"])
def test_bad_device_is_refused_before_any_work(tmp_path: Path, dev: Any) -> None:
    inp = _table(tmp_path / "in.npy")
    with pytest.raises(ValueError, match=r"device must be 'cpu', 'cuda' or 'cuda:N' \(N = GPU index\), got"):
        apply_to_table(_op(), inp, tmp_path / "out.npy", device=dev)
    assert _leftovers(tmp_path) == []


def test_torch_device_is_accepted() -> None:
    torch = pytest.importorskip("torch", reason="torch is needed for a torch.device")
    assert device.parse_device(torch.device("cuda", 2)) == 2
    assert device.parse_device(torch.device("cpu")) is None


def test_missing_cuda_module_names_the_install_command(tmp_path: Path) -> None:
    import importlib.util
    if importlib.util.find_spec("bc_fast._cuda") is not None:
        pytest.skip("bc_fast._cuda is built here: the missing-module error cannot be shown")
    inp = _table(tmp_path / "in.npy")
    with pytest.raises(RuntimeError, match=r"BC_FAST_CUDA=ON"):
        apply_to_table(_op(), inp, tmp_path / "out.npy", device="cuda")
    assert _leftovers(tmp_path) == []


def test_no_gpu_visible(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(device, "_cuda_module", lambda: FakeCuda(available=False))
    inp = _table(tmp_path / "in.npy")
    with pytest.raises(RuntimeError, match=r"device='cuda:0': no CUDA GPU visible \(no CUDA-capable device is "
                                           r"detected\); .*use device='cpu'"):
        apply_to_table(_op(), inp, tmp_path / "out.npy", device="cuda")
    assert _leftovers(tmp_path) == []


def test_device_index_out_of_range(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(device, "_cuda_module", lambda: FakeCuda(devices=2))
    inp = _table(tmp_path / "in.npy")
    with pytest.raises(ValueError, match=r"device='cuda:2' is out of range: this machine has 2 CUDA GPU\(s\) "
                                         r"\(cuda:0 to cuda:1\)"):
        apply_to_table(_op(), inp, tmp_path / "out.npy", device="cuda:2")
    assert _leftovers(tmp_path) == []


def test_cli_device_flag_bad_value(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from bc_fast.cli import main
    rc = main(["convert", str(tmp_path / "in.npy"), str(tmp_path / "out.npy"), "-r", str(tmp_path), "--to", "0",
               "--device", "tpu"])
    assert rc == 1
    assert "device must be 'cpu', 'cuda' or 'cuda:N'" in capsys.readouterr().err


# --------------------------------------------------------------------------- the pipeline on the fake


@pytest.mark.parametrize("mode", ["lazy", "eager"])
@pytest.mark.parametrize("dtype, out_dtype", [(np.float32, np.float32), (np.float16, np.float16),
                                              (np.float32, np.float16)])
def test_fake_gpu_is_byte_identical_to_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str,
                                           dtype: Any, out_dtype: Any) -> None:
    f = FakeCuda(mode=mode)
    monkeypatch.setattr(device, "_cuda_module", lambda: f)
    inp = _table(tmp_path / "in.npy", rows=1037, dtype=dtype)
    op = _op(mlp=True, normalize=True)
    cpu = apply_to_table(op, inp, tmp_path / "cpu.npy", dtype=out_dtype, chunk_rows=100)
    gpu = apply_to_table(op, inp, tmp_path / "gpu.npy", dtype=out_dtype, chunk_rows=100, device="cuda")
    assert (tmp_path / "gpu.npy").read_bytes() == (tmp_path / "cpu.npy").read_bytes()
    assert gpu.chunks == cpu.chunks == 11 and gpu.verified_rows == 256
    assert f.queued == {k: 0 for k in f.queued}  # nothing left queued
    assert f.executed.count("compute") == 11
    assert gpu.verify_tol >= cpu.verify_tol


def test_chunks_in_flight(tmp_path: Path, fake: FakeCuda, monkeypatch: pytest.MonkeyPatch) -> None:
    """Overlap: while chunk 0 is being written, the next chunks are already on the device (the
    writer of chunk 0 holds until ``depth`` chunks were enqueued; a pipeline that waited for each
    write before starting the next chunk would never get there). Bounded: never more queued work
    than its slots."""
    from bc_fast.convert import pipeline as convert
    depth = convert_gpu.DEFAULT_DEPTH
    seen: list[int] = []
    real = convert._journaled_writer

    def journaled(*a: Any, **k: Any) -> Any:
        write = real(*a, **k)

        def w(chunk: Any, y: Any, extra: Any, *sample: Any) -> None:
            if chunk.index == 0:
                for _ in range(500):  # up to 5 s; a correct pipeline gets there at once
                    if fake.enqueued["compute"] >= depth:
                        break
                    threading.Event().wait(0.01)
                seen.append(fake.enqueued["compute"])
            write(chunk, y, extra, *sample)
        return w
    monkeypatch.setattr(convert, "_journaled_writer", journaled)
    inp = _table(tmp_path / "in.npy", rows=2000)
    apply_to_table(_op(), inp, tmp_path / "gpu.npy", chunk_rows=100, device="cuda")
    assert seen and seen[0] >= depth
    assert fake.max_queued["h2d"] <= depth and fake.max_queued["d2h"] <= depth
    # compute i may be queued behind compute i - depth of the same slot: the stream orders them
    assert fake.max_queued["compute"] <= depth + 1
    assert len([b for b in fake.buffers if b.device is None]) == 2 * depth  # pinned in + out per slot
    assert len(fake.handles) == 3  # three streams: copy in, compute, copy out


@pytest.mark.parametrize("depth", [2, 3, 7])
def test_depths_and_a_single_chunk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake: FakeCuda,
                                   depth: int) -> None:
    monkeypatch.setattr(convert_gpu, "DEFAULT_DEPTH", depth)
    monkeypatch.setattr(convert_gpu.gpu_pipeline, "__kwdefaults__", {"depth": depth})
    inp = _table(tmp_path / "in.npy", rows=555)
    op = _op()
    for rows in (100, 10_000):  # many chunks, then one chunk
        apply_to_table(op, inp, tmp_path / f"cpu{rows}.npy", chunk_rows=rows)
        apply_to_table(op, inp, tmp_path / f"gpu{rows}.npy", chunk_rows=rows, device="cuda")
        assert (tmp_path / f"gpu{rows}.npy").read_bytes() == (tmp_path / f"cpu{rows}.npy").read_bytes()
    assert fake.max_queued["h2d"] <= depth


def test_fake_gpu_parquet(tmp_path: Path, fake: FakeCuda) -> None:
    pa = pytest.importorskip("pyarrow", reason="pyarrow is needed for Parquet tables")
    import pyarrow.parquet as pq
    x = np.random.default_rng(2).standard_normal((700, 24)).astype(np.float32)
    t = pa.table({"id": np.arange(700), "emb": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), 24)})
    pq.write_table(t, tmp_path / "in.parquet", row_group_size=300)
    op = _op()
    apply_to_table(op, tmp_path / "in.parquet", tmp_path / "cpu.parquet", chunk_rows=128)
    apply_to_table(op, tmp_path / "in.parquet", tmp_path / "gpu.parquet", chunk_rows=128, device="cuda")
    a, b = pq.read_table(tmp_path / "cpu.parquet"), pq.read_table(tmp_path / "gpu.parquet")
    assert a.column("id").equals(b.column("id"))
    ya = np.stack(a.column("emb").to_numpy(zero_copy_only=False))
    yb = np.stack(b.column("emb").to_numpy(zero_copy_only=False))
    assert np.array_equal(ya, yb)


def test_sidecar_records_device_and_tolerance(tmp_path: Path, fake: FakeCuda) -> None:
    inp = _table(tmp_path / "in.npy", dtype=np.float16)
    r = apply_to_table(_op(), inp, tmp_path / "gpu.npy", device="cuda:0")
    side = read_sidecar(tmp_path / "gpu.npy")
    dev = side["device"]
    assert dev["type"] == "cuda" and dev["index"] == 0 and dev["name"] == "Fake GPU"
    assert dev["compute_capability"] == "9.0" and "float16 tensor-core" in dev["compute"]
    assert dev["verify_tol"] == r.verify_tol == pytest.approx(
        apply_to_table(_op(), inp, tmp_path / "cpu.npy").verify_tol + 4 * 2.0 ** -11)
    assert "device" not in read_sidecar(tmp_path / "cpu.npy")  # the CPU sidecar is unchanged


def test_sidecar_describes_a_bfloat16_run(tmp_path: Path, fake: FakeCuda) -> None:
    import ml_dtypes  # a dependency of bc_fast: numpy's bfloat16

    inp = _table(tmp_path / "in.npy", dtype=ml_dtypes.bfloat16)
    r = apply_to_table(_op(), inp, tmp_path / "gpu.npy", device="cuda:0")
    dev = read_sidecar(tmp_path / "gpu.npy")["device"]
    # the CUDA module runs a bfloat16 table on bf16 tensor cores (csrc/cuda/fused_op_cuda.cu), not fp32 GEMMs
    assert dev["compute"] == "bfloat16 tensor-core GEMMs, float32 accumulation (weights rounded to bfloat16)"
    assert dev["verify_tol"] == r.verify_tol == pytest.approx(
        apply_to_table(_op(), inp, tmp_path / "cpu.npy").verify_tol + 4 * 2.0 ** -8)


def test_gpu_verify_tol() -> None:
    assert convert_gpu.gpu_verify_tol(1e-5, 2, np.float32) == 1e-5
    assert convert_gpu.gpu_verify_tol(1e-5, 2, np.float16) == pytest.approx(1e-5 + 8 * 2.0 ** -11)


def test_verification_still_catches_a_wrong_device_result(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          fake: FakeCuda) -> None:
    from bc_fast.convert import VerificationError
    real_apply = _FusedOp.apply

    def wrong(self: _FusedOp, *a: Any) -> None:
        real_apply(self, *a)
        self.fake.handles[a[6]].queue.append(("compute", lambda: fake._view(a[3], 8, 0).fill(0x40)))  # a[6]: stream
        fake.queued["compute"] += 1
    monkeypatch.setattr(_FusedOp, "apply", wrong)
    inp = _table(tmp_path / "in.npy", rows=300)
    with pytest.raises(VerificationError, match="verification failed"):
        apply_to_table(_op(), inp, tmp_path / "gpu.npy", chunk_rows=10, device="cuda", verify=300)
    assert _leftovers(tmp_path) == []


def test_device_error_midway_cleans_up_and_does_not_hang(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = FakeCuda(fail_compute_at=4)
    monkeypatch.setattr(device, "_cuda_module", lambda: f)
    inp = _table(tmp_path / "in.npy", rows=1000)
    with pytest.raises(RuntimeError, match=r"cublasLtMatmul failed: CUBLAS_STATUS_EXECUTION_FAILED"):
        apply_to_table(_op(), inp, tmp_path / "gpu.npy", chunk_rows=100, device="cuda")
    assert _leftovers(tmp_path) == []  # no partial output, no journal, no lock
    assert all(not s.queue for s in f.handles.values())


def test_read_error_midway(tmp_path: Path, fake: FakeCuda, monkeypatch: pytest.MonkeyPatch) -> None:
    from bc_fast.store.tables import NpyReader
    real = NpyReader.read

    def read(self: NpyReader, chunk: Any, buf: np.ndarray) -> Any:
        if chunk.index == 5:
            raise ValueError(f"{self.path}: file ended at byte 1 while reading (test)")
        return real(self, chunk, buf)
    monkeypatch.setattr(NpyReader, "read", read)
    inp = _table(tmp_path / "in.npy", rows=1000)
    with pytest.raises(ValueError, match="file ended at byte 1 while reading"):
        apply_to_table(_op(), inp, tmp_path / "gpu.npy", chunk_rows=100, device="cuda")
    assert _leftovers(tmp_path) == []


# --------------------------------------------------------------------------- resume after SIGKILL

_KILL_SCRIPT = r"""
import importlib.util, os, signal, sys
import numpy as np
spec = importlib.util.spec_from_file_location("tcg", sys.argv[1])
tcg = importlib.util.module_from_spec(spec); spec.loader.exec_module(tcg)
from bc_fast.convert import gpu as convert_gpu, pipeline as convert
from bc_fast.engine import device
if sys.argv[4] == "fake":
    fake = tcg.FakeCuda()
    device._cuda_module = lambda: fake
kill_after = int(sys.argv[5])
real = convert._journaled_writer
def journaled(*a, **k):
    write = real(*a, **k)
    count = [0]
    def w(*b):
        write(*b)
        count[0] += 1
        if count[0] == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
    return w
convert._journaled_writer = journaled
convert.apply_to_table(tcg._op(mlp=True), sys.argv[2], sys.argv[3], chunk_rows=100, journal_interval=0,
                       device="cuda", progress=False)
"""


def _killed_run(tmp_path: Path, inp: Path, out: Path, backend: str, kill_after: int) -> None:
    # cwd=tmp_path: the child imports the installed bc_fast, not the source checkout.
    proc = subprocess.run([sys.executable, "-c", _KILL_SCRIPT, __file__, str(inp), str(out), backend,
                           str(kill_after)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    journal = json.loads(Path(str(out) + ".partial.journal.json").read_text())
    assert journal["done_chunks"] == kill_after and journal["job"]["device"] == "cuda"


def test_resume_after_sigkill_on_the_fake_gpu(tmp_path: Path, fake: FakeCuda) -> None:
    inp = _table(tmp_path / "in.npy", rows=1234)
    out = tmp_path / "gpu.npy"
    _killed_run(tmp_path, inp, out, "fake", kill_after=5)
    r = apply_to_table(_op(mlp=True), inp, out, chunk_rows=100, device="cuda", resume=True)
    assert r.resumed_rows == 500 and r.rows == 1234
    assert fake.executed.count("compute") == 8  # only the 8 chunks not journaled
    apply_to_table(_op(mlp=True), inp, tmp_path / "cpu.npy", chunk_rows=100)
    assert out.read_bytes() == (tmp_path / "cpu.npy").read_bytes()


def test_resume_refuses_another_device_kind(tmp_path: Path, fake: FakeCuda) -> None:
    inp = _table(tmp_path / "in.npy", rows=1234)
    out = tmp_path / "gpu.npy"
    _killed_run(tmp_path, inp, out, "fake", kill_after=3)
    with pytest.raises(ValueError, match=r"cannot resume: the partial output .* was made by a different "
                                         r"conversion \(differs in: device\)"):
        apply_to_table(_op(mlp=True), inp, out, chunk_rows=100, resume=True)


# --------------------------------------------------------------------------- the real GPU


def _gpu_count() -> int:
    try:
        info = device._cuda_module().device_info()
    except RuntimeError:
        return 0
    return int(info["device_count"]) if info.get("available") else 0


_GPUS = _gpu_count()
gpu = pytest.mark.skipif(_GPUS == 0, reason="no CUDA GPU visible: GPU tests not run")


@gpu
@pytest.mark.parametrize("dtype, out_dtype, mlp, normalize", [
    (np.float32, np.float32, False, False), (np.float16, np.float16, False, True),
    (np.float16, np.float16, True, False), (np.float32, np.float16, True, True)])
def test_gpu_conversion_matches_cpu_within_tolerance(tmp_path: Path, dtype: Any, out_dtype: Any, mlp: bool,
                                                     normalize: bool) -> None:
    inp = _table(tmp_path / "in.npy", rows=20_011, dim=24, dtype=dtype)
    op = _op(mlp=mlp, normalize=normalize)
    cpu = apply_to_table(op, inp, tmp_path / "cpu.npy", dtype=out_dtype, chunk_rows=4096)
    g = apply_to_table(op, inp, tmp_path / "gpu.npy", dtype=out_dtype, chunk_rows=4096, device="cuda",
                       verify=5000)
    assert g.verified_rows == 5000 and g.verify_max_error <= g.verify_tol
    a, b = np.load(tmp_path / "cpu.npy").astype(np.float64), np.load(tmp_path / "gpu.npy").astype(np.float64)
    rel = np.linalg.norm(a - b, axis=1) / np.maximum(np.linalg.norm(a, axis=1), 1e-12)
    assert rel.max() <= g.verify_tol + cpu.verify_tol
    assert read_sidecar(tmp_path / "gpu.npy")["device"]["type"] == "cuda"


@gpu
def test_gpu_resume_after_sigkill(tmp_path: Path) -> None:
    inp = _table(tmp_path / "in.npy", rows=1234)
    out = tmp_path / "gpu.npy"
    _killed_run(tmp_path, inp, out, "real", kill_after=4)
    r = apply_to_table(_op(mlp=True), inp, out, chunk_rows=100, device="cuda", resume=True)
    assert r.resumed_rows == 400
    apply_to_table(_op(mlp=True), inp, tmp_path / "again.npy", chunk_rows=100, device="cuda")
    assert out.read_bytes() == (tmp_path / "again.npy").read_bytes()  # deterministic on one device


@gpu
def test_gpu_non_default_device_and_out_of_range(tmp_path: Path) -> None:
    inp = _table(tmp_path / "in.npy", rows=3000)
    with pytest.raises(ValueError, match="out of range"):
        apply_to_table(_op(), inp, tmp_path / "x.npy", device=f"cuda:{_GPUS}")
    last = f"cuda:{_GPUS - 1}"
    r = apply_to_table(_op(), inp, tmp_path / "gpu.npy", chunk_rows=512, device=last)
    assert read_sidecar(tmp_path / "gpu.npy")["device"]["index"] == _GPUS - 1 and r.verified_rows == 256


@gpu
def test_gpu_huge_chunks(tmp_path: Path) -> None:
    inp = _table(tmp_path / "in.npy", rows=400_000, dim=256, dtype=np.float16)
    rng = np.random.default_rng(3)
    op = FusedTransform.affine((rng.standard_normal((256, 256)) / 16).astype(np.float32),
                               rng.standard_normal(256).astype(np.float32), normalize=True)
    r = apply_to_table(op, inp, tmp_path / "gpu.npy", chunk_rows=131072, device="cuda", verify=2000)
    assert r.chunks == 4 and r.verify_max_error <= r.verify_tol


# --------------------------------------------------------------------------- legacy indexes on the GPU


@pytest.fixture
def chain(tmp_path: Path, make_chain_registry: Any) -> Any:
    return make_chain_registry(tmp_path / "reg", [16, 24], [5.0])


@pytest.fixture
def fake_faiss_gpu(monkeypatch: pytest.MonkeyPatch) -> Any:
    """faiss-cpu dressed up as a GPU build: the index stays on the CPU, the plumbing is exercised."""
    faiss = pytest.importorskip("faiss", reason="faiss is needed for index tests")
    moved: list[int] = []
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1)
    monkeypatch.setattr(faiss, "StandardGpuResources", object, raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_gpu", lambda res, dev, index: moved.append(dev) or index,
                        raising=False)
    return moved


def test_gpu_index_without_faiss_gpu_names_the_install(chain: Any, fake: FakeCuda) -> None:
    faiss = pytest.importorskip("faiss", reason="faiss is needed for index tests")
    if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        pytest.skip("a faiss GPU build with a GPU is installed: the error cannot be shown")
    from bc_fast.index import build_legacy_index
    table = np.random.default_rng(0).standard_normal((50, 24)).astype(np.float32)
    with pytest.raises(RuntimeError, match=r"device='cuda' builds a faiss GPU index, but this faiss .* "
                                           r"install a faiss GPU build \(pip install bc_fast\[gpu\]"):
        build_legacy_index(chain, table, 0, device="cuda")


def test_gpu_index_bad_device(chain: Any) -> None:
    pytest.importorskip("faiss", reason="faiss is needed for index tests")
    from bc_fast.index import build_legacy_index
    with pytest.raises(ValueError, match=r"device must be 'cpu', 'cuda' or 'cuda:N'"):
        build_legacy_index(chain, np.zeros((5, 24), np.float32), 0, device="gpu0")


@pytest.mark.parametrize("factory", ["Flat", "IVF4,Flat"])
def test_gpu_index_plumbing_matches_cpu(chain: Any, fake: FakeCuda, fake_faiss_gpu: list, faiss_one_thread: None,
                                        tmp_path: Path, factory: str) -> None:
    from bc_fast.index import LegacyIndex, build_legacy_index
    rng = np.random.default_rng(0)
    table = rng.standard_normal((500, 24)).astype(np.float32)
    q = rng.standard_normal((7, 24)).astype(np.float32)
    cpu = build_legacy_index(chain, table, 0, factory=factory, normalize=True, chunk_rows=64, train_rows=200)
    g = build_legacy_index(chain, table, 0, factory=factory, normalize=True, chunk_rows=64, train_rows=200,
                           device="cuda")
    assert fake_faiss_gpu == [0] and g.device == "cuda:0" and fake.executed.count("compute") >= 8
    D0, I0 = cpu.search(q, 5, query_version=1)
    before = fake.executed.count("compute")
    D1, I1 = g.search(q, 5, query_version=1)
    assert fake.executed.count("compute") == before + 1  # the queries were transformed on the device
    assert np.array_equal(I0, I1) and np.array_equal(D0, D1)  # the fake computes with the CPU core
    D2, I2 = cpu.search(q, 5, query_version=1, device="cuda")  # a CPU index, queries on the GPU
    assert np.array_equal(I0, I2)
    g.save(tmp_path / "g.faiss")
    assert LegacyIndex.load(tmp_path / "g.faiss", chain).search(q, 5, query_version=1)[1].tolist() == I0.tolist()


def _bench_gpu_script() -> Any:
    import importlib.util
    path = Path(__file__).resolve().parents[1] / "bench" / "bench_gpu.py"
    spec = importlib.util.spec_from_file_location("bench_gpu", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_index_bench_says_plainly_when_faiss_has_no_gpu() -> None:
    faiss = pytest.importorskip("faiss", reason="faiss is needed for index tests")
    if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        pytest.skip("a faiss GPU build with a GPU is installed: the benchmark measures instead")
    r = _bench_gpu_script().bench_index_search(2, True)
    [c] = r["checks"]
    assert c["status"] == "SKIP"
    assert c["shown_value"].startswith("skipped: no faiss GPU build here: device='cuda' builds a faiss GPU index")


def test_gpu_index_bench_measures_the_same_ids(fake: FakeCuda, fake_faiss_gpu: list, faiss_one_thread: None,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    bench = _bench_gpu_script()
    monkeypatch.setattr(bench, "INDEX_SEARCH", ((3000, 40), (3000, 40)))
    r = bench.bench_index_search(2, True)
    assert fake_faiss_gpu == [0] and fake.executed.count("compute") >= 1  # built through the device path
    ids, speed = r["checks"]
    assert ids["status"] == "PASS" and ids["value"] == 1.0  # the fake computes with the CPU core: identical
    assert speed["status"] == "INFO" and set(r["median_s"]) == {"bc_fast", "cpu_index"}
    assert "\n| index_search | 3,000 | " in bench.table([r])


def _faiss_gpus() -> int:
    import importlib.util
    if importlib.util.find_spec("faiss") is None:
        return 0
    import faiss
    return int(faiss.get_num_gpus()) if hasattr(faiss, "StandardGpuResources") else 0


@gpu
def test_cpu_index_searched_with_queries_transformed_on_the_gpu(chain: Any) -> None:
    # The GPU half of a legacy search that needs no faiss GPU build: a CPU index, the queries' transform
    # on the real GPU (float32 GEMMs, no TF32), the same neighbours as with the CPU transform.
    pytest.importorskip("faiss", reason="faiss is needed for index tests")
    from bc_fast.index import build_legacy_index
    rng = np.random.default_rng(3)
    cpu = build_legacy_index(chain, rng.standard_normal((5000, 24)).astype(np.float32), 0, normalize=True)
    q = rng.standard_normal((64, 24)).astype(np.float32)
    D0, I0 = cpu.search(q, 10, query_version=1)
    D1, I1 = cpu.search(q, 10, query_version=1, device="cuda")
    np.testing.assert_allclose(D1, D0, rtol=1e-4, atol=1e-5)
    assert np.mean(I1 == I0) >= 0.99  # exact search: only near-ties may swap


@gpu
@pytest.mark.skipif(_faiss_gpus() == 0, reason="no faiss GPU build: GPU index tests not run")
@pytest.mark.parametrize("factory", ["Flat", "IVF16,Flat"])
def test_gpu_index_real(chain: Any, tmp_path: Path, factory: str) -> None:
    from bc_fast.index import LegacyIndex, build_legacy_index
    rng = np.random.default_rng(0)
    table = rng.standard_normal((5000, 24)).astype(np.float32)
    q = rng.standard_normal((50, 24)).astype(np.float32)
    cpu = build_legacy_index(chain, table, 0, factory="Flat", normalize=True)
    g = build_legacy_index(chain, table, 0, factory=factory, normalize=True, device="cuda")
    assert type(g.index).__name__.startswith("Gpu")
    I0 = cpu.search(q, 10, query_version=1)[1]
    I1 = g.search(q, 10, query_version=1)[1]
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(I0, I1)])
    assert recall >= (0.99 if factory == "Flat" else 0.5)
    g.save(tmp_path / "g.faiss")
    assert LegacyIndex.load(tmp_path / "g.faiss", chain).ntotal == 5000
