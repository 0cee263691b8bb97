// The layer program on the GPU: per layer, one cuBLASLt GEMM (with its bias/ReLU epilogue where that
// fits), or on compute capability 9.0 one fused CUTLASS kernel for L2-normalised outputs up to 256
// wide (and, with its staged store, GELU layers without normalisation; layer_gemm_sm90.h), plus at
// most one pass over the layer's output for what is left (activation on the leading outputs, L2,
// cast). path_of() picks; layer_paths() reports it.
//
// Precision (documented in docs/gpu.md):
// - float32 input: A/B/D float32, CUBLAS_COMPUTE_32F (true fp32 FMA; no TF32), intermediates float32.
// - float16/bfloat16 input: weights converted to the input dtype, A/B in that dtype on tensor cores,
//   CUBLAS_COMPUTE_32F (fp32 accumulation), fp32 scale; activations BETWEEN layers are stored in
//   the input dtype (the next GEMM's A/B type), as torch autocast does. The fused kernel does bias,
//   activation and L2 in fp32 on the accumulators. Elsewhere the 16-bit GEMM result (bias added by
//   cuBLASLt) is rounded to 16 bits once before the activation / L2 pass, which then runs in fp32;
//   mixed dtypes (e.g. float16 in, float32 out) go through an fp32 GEMM result instead.
//
// Row-major <-> column-major (cuBLASLt is column-major): a row-major r x c matrix with row stride c
// is, read column-major, the c x r matrix with leading dimension c (its transpose). So
//   X (m x k, row-major)      = column-major X^T (k x m, ld k)        -> B, op N
//   W (d_out x k, row-major)  = column-major W^T (k x d_out, ld k)    -> A, op T gives W (d_out x k)
//   Y = X W^T (m x d_out)     = column-major Y^T (d_out x m, ld d_out) = op(A) * B = W * X^T  -> D
// i.e. one column-major GEMM with M = d_out, N = m, K = k, TRANSA = T, TRANSB = N. The epilogue's
// bias vector has M = d_out entries broadcast over the N = m columns, i.e. one bias per output feature.
#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstring>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

#include "cuda_check.h"
#include "cuda_op.h"
#include "layer_gemm_sm90.h"

namespace bc_fast::cuda {
namespace {

constexpr size_t kLtWorkspaceBytes = size_t{32} << 20;  // cuBLASLt's recommendation for Hopper
constexpr size_t kScratchBudgetBytes = size_t{1} << 30;  // intermediates per (device, stream)
constexpr int64_t kMaxChunkRows = int64_t{1} << 22;
constexpr size_t kMaxPlans = 512;
constexpr int kWarpsPerBlock = 8;
// cuBLASLt algorithms: for GEMMs of at least kTuneMinRows rows, the heuristic's best kTuneCandidates
// are timed once on the real operands and the fastest kept with the plan.
constexpr int kTuneCandidates = 6;
constexpr int64_t kTuneMinRows = 65536;

void check_lt(cublasStatus_t st, const char* call) {
  if (st == CUBLAS_STATUS_SUCCESS) return;
  (void)cudaGetLastError();
  const std::string msg = std::string(call) + " failed: " + cublasLtGetStatusName(st) + " (" +
                          cublasLtGetStatusString(st) + ")";
  if (st == CUBLAS_STATUS_ALLOC_FAILED) throw CudaOutOfMemory("out of CUDA memory: " + msg);
  throw CudaError(msg);
}
#define BC_LT_CHECK(expr) check_lt((expr), #expr)

cudaDataType_t cuda_type(DType t) {
  switch (t) {
    case DType::kFloat16: return CUDA_R_16F;
    case DType::kBFloat16: return CUDA_R_16BF;
    default: return CUDA_R_32F;
  }
}

const char* dtype_name(DType t) {
  switch (t) {
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
    default: return "float32";
  }
}

// ---- the fused epilogue kernel ----

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename TIn>
__device__ __forceinline__ float layer_value(const TIn* y, int j, const float* bias, int act, int width) {
  float v = to_float(y[j]);
  if (bias != nullptr) v += bias[j];
  if (j < width) {
    if (act == static_cast<int>(Act::kRelu)) {
      v = v > 0.0f ? v : 0.0f;
    } else if (act == static_cast<int>(Act::kGelu)) {
      v = 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));  // exact (erf) gelu, as torch's default
    }
  }
  return v;
}

// One warp per row: out[r] = finish(y[r] + bias), finish = activation on the leading `width`
// outputs, then (if normalize) v / max(||v||, 1e-12), cast to TOut; all arithmetic in fp32.
// `out` may alias `y` (TIn = TOut): each lane reads every element it later writes, before writing it.
template <typename TIn, typename TOut>
__global__ void epilogue_kernel(const TIn* y, int64_t rows, int d, const float* bias, int act, int width,
                                int normalize, TOut* out) {
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (row >= rows) return;  // row is uniform over the warp, so the full-mask shuffles below are safe
  const TIn* yr = y + row * d;
  TOut* orow = out + row * d;
  float scale = 1.0f;
  if (normalize) {
    float ss = 0.0f;
    for (int j = lane; j < d; j += 32) {
      const float v = layer_value(yr, j, bias, act, width);
      ss += v * v;
    }
    for (int off = 16; off > 0; off >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, off);
    scale = 1.0f / fmaxf(sqrtf(ss), 1e-12f);
  }
  for (int j = lane; j < d; j += 32) orow[j] = from_float<TOut>(layer_value(yr, j, bias, act, width) * scale);
}

template <typename TIn, typename TOut>
void launch(const void* y, int64_t rows, int64_t d, const float* bias, Act act, int64_t width, bool normalize,
            void* out, cudaStream_t stream) {
  const unsigned blocks = static_cast<unsigned>((rows + kWarpsPerBlock - 1) / kWarpsPerBlock);
  epilogue_kernel<TIn, TOut><<<blocks, 32 * kWarpsPerBlock, 0, stream>>>(
      static_cast<const TIn*>(y), rows, static_cast<int>(d), bias, static_cast<int>(act), static_cast<int>(width),
      normalize ? 1 : 0, static_cast<TOut*>(out));
  check(cudaGetLastError(), "epilogue_kernel<<<...>>> launch");
}

// y (fp32 GEMM result) -> out in out_type.
void launch_epilogue(const float* y, int64_t rows, int64_t d, const float* bias, Act act, int64_t width,
                     bool normalize, void* out, DType out_type, cudaStream_t stream) {
  switch (out_type) {
    case DType::kFloat32: return launch<float, float>(y, rows, d, bias, act, width, normalize, out, stream);
    case DType::kFloat16: return launch<float, __half>(y, rows, d, bias, act, width, normalize, out, stream);
    case DType::kBFloat16: return launch<float, __nv_bfloat16>(y, rows, d, bias, act, width, normalize, out, stream);
  }
}

// In place on 16-bit rows holding a layer's GEMM + bias: activation on the leading `width` outputs and,
// if asked, L2 normalisation (fp32 arithmetic, one rounding back to 16 bits).
void launch_finish_inplace(void* y, int64_t rows, int64_t d, Act act, int64_t width, bool normalize, DType t,
                           cudaStream_t stream) {
  if (t == DType::kFloat16)
    launch<__half, __half>(y, rows, d, nullptr, act, width, normalize, y, stream);
  else
    launch<__nv_bfloat16, __nv_bfloat16>(y, rows, d, nullptr, act, width, normalize, y, stream);
}

// In-place L2 normalisation of 16-bit rows, d % 8 == 0, 16-byte aligned: one warp per row, the row
// held in registers (kVec 16-byte vectors per lane, d <= 256 * kVec), so it is read once and written
// once with 16-byte accesses. fp32 sum of squares and scale, as the generic kernel.
template <typename T, int kVec>
__global__ void normalize_rows_vec(T* y, int64_t rows, int d) {
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (row >= rows) return;  // uniform over the warp
  auto* yr = reinterpret_cast<uint4*>(y + row * d);
  const int nvec = d / 8;
  uint4 v[kVec];
  float ss = 0.0f;
#pragma unroll
  for (int i = 0; i < kVec; ++i) {
    const int j = lane + 32 * i;
    if (j < nvec) {
      v[i] = yr[j];
      const T* e = reinterpret_cast<const T*>(&v[i]);
#pragma unroll
      for (int q = 0; q < 8; ++q) {
        const float f = to_float(e[q]);
        ss += f * f;
      }
    }
  }
  for (int off = 16; off > 0; off >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, off);
  const float scale = 1.0f / fmaxf(sqrtf(ss), 1e-12f);
#pragma unroll
  for (int i = 0; i < kVec; ++i) {
    const int j = lane + 32 * i;
    if (j < nvec) {
      T* e = reinterpret_cast<T*>(&v[i]);
#pragma unroll
      for (int q = 0; q < 8; ++q) e[q] = from_float<T>(to_float(e[q]) * scale);
      yr[j] = v[i];
    }
  }
}

template <typename T>
bool launch_normalize_vec(void* y, int64_t rows, int64_t d, cudaStream_t stream) {
  if (d % 8 != 0 || d > 2048 || (reinterpret_cast<uintptr_t>(y) & 15u) != 0) return false;
  const unsigned blocks = static_cast<unsigned>((rows + kWarpsPerBlock - 1) / kWarpsPerBlock);
  if (d <= 1024)
    normalize_rows_vec<T, 4><<<blocks, 32 * kWarpsPerBlock, 0, stream>>>(static_cast<T*>(y), rows, static_cast<int>(d));
  else
    normalize_rows_vec<T, 8><<<blocks, 32 * kWarpsPerBlock, 0, stream>>>(static_cast<T*>(y), rows, static_cast<int>(d));
  check(cudaGetLastError(), "normalize_rows_vec<<<...>>> launch");
  return true;
}

// In-place L2 normalisation of rows already holding their final values in dtype t.
void launch_normalize_inplace(void* y, int64_t rows, int64_t d, DType t, cudaStream_t stream) {
  if (t == DType::kFloat16 && launch_normalize_vec<__half>(y, rows, d, stream)) return;
  if (t == DType::kBFloat16 && launch_normalize_vec<__nv_bfloat16>(y, rows, d, stream)) return;
  switch (t) {
    case DType::kFloat32: return launch<float, float>(y, rows, d, nullptr, Act::kNone, 0, true, y, stream);
    case DType::kFloat16: return launch<__half, __half>(y, rows, d, nullptr, Act::kNone, 0, true, y, stream);
    case DType::kBFloat16:
      return launch<__nv_bfloat16, __nv_bfloat16>(y, rows, d, nullptr, Act::kNone, 0, true, y, stream);
  }
}

// ---- per-device cuBLASLt handles and per-(device, stream) scratch ----

cublasLtHandle_t lt_handle(int device) {
  static std::mutex mu;
  static auto* handles = new std::map<int, cublasLtHandle_t>();  // leaked: never torn down at exit
  std::lock_guard<std::mutex> lock(mu);
  auto it = handles->find(device);
  if (it != handles->end()) return it->second;
  cublasLtHandle_t h = nullptr;
  BC_LT_CHECK(cublasLtCreate(&h));
  handles->emplace(device, h);
  return h;
}

struct Workspace {
  std::mutex mu;  // held by the call that is enqueueing work using these buffers
  cudaStream_t stream = nullptr;
  void* act[2] = {nullptr, nullptr};
  size_t act_bytes[2] = {0, 0};
  void* d32 = nullptr;
  size_t d32_bytes = 0;
  void* lt = nullptr;
  size_t lt_bytes = 0;

  // Grows a buffer. Earlier work queued on this stream may still read the old buffer, so wait for
  // the stream before freeing it. Rare: buffers only grow, to powers of two (>= 1 MiB), so slowly
  // growing batches do not synchronise on every call; the chunking caps them (< 2x the budget).
  void ensure(void** p, size_t* have, size_t need) {
    if (*have >= need) return;
    size_t bytes = size_t{1} << 20;
    while (bytes < need) bytes *= 2;
    if (*p != nullptr) {
      BC_CUDA_CHECK(cudaStreamSynchronize(stream));
      BC_CUDA_CHECK(cudaFree(*p));
      *p = nullptr;
      *have = 0;
    }
    BC_CUDA_CHECK(cudaMalloc(p, bytes));
    *have = bytes;
  }
};

// Scratch lives as long as the process (a cache per stream handle ever used, under
// 2 x kScratchBudgetBytes + kLtWorkspaceBytes each). Work on one stream runs in order on the GPU, so
// calls sharing a stream may share its scratch; calls on different streams never do.
// cudaStreamPerThread (2) names a different stream in every host thread: key it by thread too.
Workspace& workspace_for(int device, uintptr_t stream) {
  static std::mutex mu;
  static auto* cache = new std::map<std::tuple<int, uintptr_t, std::thread::id>, std::unique_ptr<Workspace>>();
  const bool per_thread = stream == reinterpret_cast<uintptr_t>(cudaStreamPerThread);
  const std::thread::id owner = per_thread ? std::this_thread::get_id() : std::thread::id();
  std::lock_guard<std::mutex> lock(mu);
  auto& slot = (*cache)[{device, stream, owner}];
  if (!slot) {
    slot = std::make_unique<Workspace>();
    slot->stream = reinterpret_cast<cudaStream_t>(stream);
  }
  return *slot;
}

// Whether `device` runs the fused sm_90a kernels (compute capability exactly 9.0).
bool device_is_sm90(int device) {
  return device_attribute(cudaDevAttrComputeCapabilityMajor, device) == 9 &&
         device_attribute(cudaDevAttrComputeCapabilityMinor, device) == 0;
}

int pointer_alignment(uintptr_t p) {
  int a = 1;
  while (a < 256 && (p & static_cast<uintptr_t>(2 * a - 1)) == 0) a *= 2;
  return a;
}

void check_device_pointer(uintptr_t p, int device, const char* name) {
  cudaPointerAttributes attr{};
  BC_CUDA_CHECK(cudaPointerGetAttributes(&attr, reinterpret_cast<const void*>(p)));
  if (attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged)
    throw std::invalid_argument(std::string(name) + " is not CUDA device memory (host or unknown pointer); pass a "
                                "pointer to memory on device " + std::to_string(device));
  if (attr.type == cudaMemoryTypeDevice && attr.device != device)
    throw std::invalid_argument(std::string(name) + " points to memory on device " + std::to_string(attr.device) +
                                ", not device " + std::to_string(device));
}

void host_convert(const float* src, size_t n, DType t, std::vector<unsigned char>& dst) {
  dst.resize(n * dtype_size(t));
  if (t == DType::kFloat32) {
    std::memcpy(dst.data(), src, n * 4);
  } else if (t == DType::kFloat16) {
    auto* h = reinterpret_cast<__half*>(dst.data());
    for (size_t i = 0; i < n; ++i) {
      h[i] = __float2half_rn(src[i]);
      if (std::isinf(__half2float(h[i])))
        throw std::invalid_argument("value " + std::to_string(src[i]) +
                                    " exceeds the float16 range (65504); apply the transform to float32 or bfloat16 "
                                    "input instead");
    }
  } else {
    auto* h = reinterpret_cast<__nv_bfloat16*>(dst.data());
    for (size_t i = 0; i < n; ++i) h[i] = __float2bfloat16_rn(src[i]);
  }
}

}  // namespace

int64_t cublaslt_version() { return static_cast<int64_t>(cublasLtGetVersion()); }

// Weights or biases of every layer on one device in one dtype (null entries: layers without bias).
struct FusedOpCuda::DeviceWeights {
  int device = 0;
  std::vector<void*> ptrs;
  ~DeviceWeights() {
    try {
      DeviceGuard guard(device);
      // The op may be dropped while work that reads these arrays is still queued.
      (void)cudaDeviceSynchronize();
      for (void* p : ptrs)
        if (p != nullptr) (void)cudaFree(p);
    } catch (...) {  // never throw from a destructor; at interpreter exit the runtime may be gone
    }
    (void)cudaGetLastError();
  }
};

struct FusedOpCuda::Plan {
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, d = nullptr;
  bool ok = false;  // false: cuBLASLt has no algorithm for this configuration
  std::vector<cublasLtMatmulAlgo_t> candidates;  // the heuristic's best first
  mutable std::mutex mu;                         // guards algo and tuned
  mutable cublasLtMatmulAlgo_t algo{};
  mutable bool tuned = false;

  cublasLtMatmulAlgo_t current() const {
    std::lock_guard<std::mutex> lock(mu);
    return algo;
  }
  ~Plan() {
    if (d != nullptr) (void)cublasLtMatrixLayoutDestroy(d);
    if (b != nullptr) (void)cublasLtMatrixLayoutDestroy(b);
    if (a != nullptr) (void)cublasLtMatrixLayoutDestroy(a);
    if (desc != nullptr) (void)cublasLtMatmulDescDestroy(desc);
  }
};

namespace {

// One cuBLASLt GEMM, D = op(W) * X, with the given algorithm; the status, for the caller to judge.
cublasStatus_t lt_matmul(const FusedOpCuda::Plan& p, const cublasLtMatmulAlgo_t& algo, cublasLtHandle_t handle,
                         const void* w, const void* in, void* dst, void* lt_ws, cudaStream_t s) {
  const float alpha = 1.0f, beta = 0.0f;
  return cublasLtMatmul(handle, p.desc, &alpha, w, p.a, in, p.b, &beta, dst, p.d, dst, p.d, &algo, lt_ws,
                        kLtWorkspaceBytes, s);
}

// Times each candidate algorithm on these operands (one warm-up, then two timed runs each) and keeps
// the fastest with the plan, once per plan. Skipped while the stream is captured into a CUDA graph
// (timing syncs); a later uncaptured call tunes.
void tune_plan(const FusedOpCuda::Plan& p, cublasLtHandle_t handle, const void* w, const void* in, void* dst,
               void* lt_ws, cudaStream_t s) {
  std::lock_guard<std::mutex> lock(p.mu);
  if (p.tuned) return;
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(s, &capture) != cudaSuccess || capture != cudaStreamCaptureStatusNone) {
    (void)cudaGetLastError();
    return;
  }
  cudaEvent_t start = nullptr, stop = nullptr;
  BC_CUDA_CHECK(cudaEventCreate(&start));
  if (cudaEventCreate(&stop) != cudaSuccess) {
    (void)cudaEventDestroy(start);
    BC_CUDA_CHECK(cudaGetLastError());
  }
  float best = std::numeric_limits<float>::infinity();
  cudaError_t err = cudaSuccess;
  for (const cublasLtMatmulAlgo_t& algo : p.candidates) {
    auto run = [&] { return lt_matmul(p, algo, handle, w, in, dst, lt_ws, s); };
    if (run() != CUBLAS_STATUS_SUCCESS) continue;  // refused synchronously: not a candidate after all
    err = cudaEventRecord(start, s);
    for (int r = 0; r < 2 && err == cudaSuccess; ++r)
      if (run() != CUBLAS_STATUS_SUCCESS) err = cudaErrorLaunchFailure;
    if (err == cudaSuccess) err = cudaEventRecord(stop, s);
    if (err == cudaSuccess) err = cudaEventSynchronize(stop);
    float ms = 0.0f;
    if (err == cudaSuccess) err = cudaEventElapsedTime(&ms, start, stop);
    if (err != cudaSuccess) break;
    if (ms < best) {
      best = ms;
      p.algo = algo;
    }
  }
  (void)cudaEventDestroy(start);
  (void)cudaEventDestroy(stop);
  check(err, "timing cuBLASLt algorithms (cublasLtMatmul / cudaEvent*)");
  p.tuned = true;
}

// D = op(W) * X with the plan's chosen algorithm (timed on these operands on the first call).
void run_gemm(const FusedOpCuda::Plan& p, cublasLtHandle_t handle, const void* w, const void* in, void* dst,
              void* lt_ws, cudaStream_t s) {
  tune_plan(p, handle, w, in, dst, lt_ws, s);
  BC_LT_CHECK(lt_matmul(p, p.current(), handle, w, in, dst, lt_ws, s));
}

}  // namespace

FusedOpCuda::FusedOpCuda(std::vector<LayerSpec> layers, bool normalize) : normalize_(normalize) {
  if (layers.empty()) throw std::invalid_argument("a fused op needs at least one layer");
  for (size_t i = 0; i < layers.size(); ++i) {
    const LayerSpec& s = layers[i];
    const std::string where = "layer " + std::to_string(i);
    if (s.d_in <= 0 || s.d_out <= 0) throw std::invalid_argument(where + ": dimensions must be positive");
    if (s.d_in > INT_MAX || s.d_out > INT_MAX) throw std::invalid_argument(where + ": dimensions must be < 2^31");
    if (i > 0 && s.d_in != layers[i - 1].d_out)
      throw std::invalid_argument(where + " has d_in " + std::to_string(s.d_in) + " but the previous layer outputs " +
                                  std::to_string(layers[i - 1].d_out));
    if (static_cast<int64_t>(s.weight.size()) != s.d_in * s.d_out)
      throw std::invalid_argument(where + ": weight has the wrong number of values");
    if (!s.bias.empty() && static_cast<int64_t>(s.bias.size()) != s.d_out)
      throw std::invalid_argument(where + ": bias has the wrong number of values");
    if (s.act_width < 0 || s.act_width > s.d_out)
      throw std::invalid_argument(where + ": activation width " + std::to_string(s.act_width) + " is not in [0, " +
                                  std::to_string(s.d_out) + "]");
    for (float w : s.weight)
      if (!std::isfinite(w)) throw std::invalid_argument(where + ": weight contains NaN or Inf");
    for (float b : s.bias)
      if (!std::isfinite(b)) throw std::invalid_argument(where + ": bias contains NaN or Inf");
    if (i + 1 < layers.size()) max_hidden_ = std::max(max_hidden_, s.d_out);
    max_d_out_ = std::max(max_d_out_, s.d_out);
  }
  layers_ = std::move(layers);
}

FusedOpCuda::~FusedOpCuda() { free_device_memory(); }

void FusedOpCuda::free_device_memory() noexcept {
  std::lock_guard<std::mutex> lock(mu_);
  plans_.clear();
  weights_.clear();
}

// Weights or biases of every layer in dtype `t` on `device`, uploaded on first use. The upload runs
// on the caller's stream and is waited for before the arrays are published, so calls on any other
// stream only ever see complete data. The host copies stay in layers_.
const FusedOpCuda::DeviceWeights& FusedOpCuda::arrays_on(int device, DType t, bool biases, uintptr_t stream) const {
  std::lock_guard<std::mutex> lock(mu_);
  const std::pair<int, int> key{device, static_cast<int>(t) + (biases ? kNumDTypes : 0)};
  auto it = weights_.find(key);
  if (it != weights_.end()) return *it->second;
  auto w = std::make_unique<DeviceWeights>();
  w->device = device;
  w->ptrs.assign(layers_.size(), nullptr);
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  // 1. Convert on the host (may refuse values out of the float16 range), 2. allocate, 3. copy: the
  // staged host copies must outlive the asynchronous copies, so nothing throws between 3 and the sync.
  std::vector<std::vector<unsigned char>> staged(layers_.size());
  for (size_t i = 0; i < layers_.size(); ++i) {
    const std::vector<float>& src = biases ? layers_[i].bias : layers_[i].weight;
    if (src.empty()) continue;
    try {
      host_convert(src.data(), src.size(), t, staged[i]);
    } catch (const std::invalid_argument& e) {
      throw std::invalid_argument("layer " + std::to_string(i) + (biases ? " bias: " : " weight: ") + e.what());
    }
  }
  for (size_t i = 0; i < layers_.size(); ++i)
    if (!staged[i].empty()) BC_CUDA_CHECK(cudaMalloc(&w->ptrs[i], staged[i].size()));
  cudaError_t copy_err = cudaSuccess;
  for (size_t i = 0; i < layers_.size() && copy_err == cudaSuccess; ++i)
    if (!staged[i].empty())
      copy_err = cudaMemcpyAsync(w->ptrs[i], staged[i].data(), staged[i].size(), cudaMemcpyHostToDevice, s);
  const cudaError_t sync_err = cudaStreamSynchronize(s);
  check(copy_err, "cudaMemcpyAsync(weights, host, bytes, cudaMemcpyHostToDevice, stream)");
  check(sync_err, "cudaStreamSynchronize(stream) after the weight upload");
  return *weights_.emplace(key, std::move(w)).first->second;
}

std::shared_ptr<const FusedOpCuda::Plan> FusedOpCuda::plan_for(int device, size_t layer, int64_t m, DType ab,
                                                               DType d, int epilogue, const void* bias,
                                                               int align_b, int align_d) const {
  const PlanKey key{device, layer, m, static_cast<int>(ab) * kNumDTypes + static_cast<int>(d), epilogue,
                    align_b, align_d, 0};
  std::lock_guard<std::mutex> lock(mu_);
  auto it = plans_.find(key);
  if (it != plans_.end()) return it->second;
  if (plans_.size() >= kMaxPlans) plans_.clear();  // calls in flight hold their own shared_ptr

  const LayerSpec& l = layers_[layer];
  auto p = std::make_shared<Plan>();
  // See the comment at the top: column-major D (d_out x m) = op_T(A = W, k x d_out) * B (X^T, k x m).
  BC_LT_CHECK(cublasLtMatmulDescCreate(&p->desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  const cublasOperation_t op_t = CUBLAS_OP_T, op_n = CUBLAS_OP_N;
  BC_LT_CHECK(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_TRANSA, &op_t, sizeof(op_t)));
  BC_LT_CHECK(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_TRANSB, &op_n, sizeof(op_n)));
  const auto epi = static_cast<cublasLtEpilogue_t>(epilogue);
  BC_LT_CHECK(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &epi, sizeof(epi)));
  // d_out bias values in D's dtype: CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE's default (-1) for fp32/fp16/bf16 D.
  if (bias != nullptr)
    BC_LT_CHECK(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof(bias)));
  const auto k = static_cast<uint64_t>(l.d_in), n_out = static_cast<uint64_t>(l.d_out);
  BC_LT_CHECK(cublasLtMatrixLayoutCreate(&p->a, cuda_type(ab), k, n_out, static_cast<int64_t>(k)));
  BC_LT_CHECK(cublasLtMatrixLayoutCreate(&p->b, cuda_type(ab), k, static_cast<uint64_t>(m), static_cast<int64_t>(k)));
  BC_LT_CHECK(cublasLtMatrixLayoutCreate(&p->d, cuda_type(d), n_out, static_cast<uint64_t>(m),
                                         static_cast<int64_t>(n_out)));

  struct Pref {
    cublasLtMatmulPreference_t p = nullptr;
    ~Pref() {
      if (p != nullptr) (void)cublasLtMatmulPreferenceDestroy(p);
    }
  } pref_owner;
  BC_LT_CHECK(cublasLtMatmulPreferenceCreate(&pref_owner.p));
  const cublasLtMatmulPreference_t pref = pref_owner.p;
  const uint64_t ws_bytes = kLtWorkspaceBytes;
  const uint32_t al_a = 256, al_b = static_cast<uint32_t>(align_b), al_d = static_cast<uint32_t>(align_d);
  BC_LT_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws_bytes,
                                                   sizeof(ws_bytes)));
  // The heuristic assumes 256-byte aligned buffers unless told otherwise; chunks and user tensors may not be.
  BC_LT_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &al_a,
                                                   sizeof(al_a)));
  BC_LT_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &al_b,
                                                   sizeof(al_b)));
  BC_LT_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &al_d,
                                                   sizeof(al_d)));
  BC_LT_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &al_d,
                                                   sizeof(al_d)));
  cublasLtMatmulHeuristicResult_t results[kTuneCandidates]{};
  int found = 0;
  const cublasStatus_t st = cublasLtMatmulAlgoGetHeuristic(static_cast<cublasLtHandle_t>(lt_handle(device)), p->desc,
                                                           p->a, p->b, p->d, p->d, pref, kTuneCandidates, results,
                                                           &found);
  // NOT_SUPPORTED / INVALID_VALUE: no kernel for this type/epilogue/alignment combination. The caller
  // then falls back to the plain fp32 GEMM + own epilogue kernel (or reports the layer).
  if (st != CUBLAS_STATUS_NOT_SUPPORTED && st != CUBLAS_STATUS_INVALID_VALUE)
    check_lt(st, "cublasLtMatmulAlgoGetHeuristic");
  p->ok = st == CUBLAS_STATUS_SUCCESS && found > 0;
  for (int i = 0; p->ok && i < found; ++i)
    if (results[i].state == CUBLAS_STATUS_SUCCESS) p->candidates.push_back(results[i].algo);
  p->ok = !p->candidates.empty();
  if (p->ok) p->algo = p->candidates.front();
  p->tuned = p->candidates.size() < 2 || m < kTuneMinRows;
  plans_.emplace(key, p);
  return p;
}

// The path of one layer. `fused`: the device runs the sm_90a kernels and the arrays are 16-byte aligned.
// The fused kernel takes the final layer's L2 normalisation when the row fits one tile (no activation
// or ReLU): on an H200, 256->256 + bias + L2 in fp16, 8M rows, took 5.5 ms, against 8.0 ms for the
// cuBLASLt + normalise route (measured before that pass was vectorised) and 11.7 ms for torch eager.
// GELU layers do not take it with the direct store: with erf per element in its unrolled register loop
// the MLP ran 2.5x slower than torch eager's addmm + in-place GELU, so they take kLtEpilogue's 16-bit
// route, which does that same work. With the staged store (not yet timed on a GPU), a GELU layer without
// normalisation takes the fused kernel, its GELU applied on the way out (layer_epilogue_sm90.cuh).
// cuBLASLt keeps plain bias/ReLU layers, which its own epilogues already do in one kernel.
FusedOpCuda::Path FusedOpCuda::path_of(size_t layer, DType ct, DType dst_type, bool fused, Sm90Store store) const {
  const LayerSpec& l = layers_[layer];
  const bool norm = layer + 1 == layers_.size() && normalize_;
  const int64_t width = l.act == Act::kNone ? 0 : l.act_width;
  const Act act = width > 0 ? l.act : Act::kNone;
  const bool epilogue_fits = act == Act::kNone || (act == Act::kRelu && width == l.d_out);
  if (fused && layer_gemm_sm90_built() && ct != DType::kFloat32 && dst_type == ct && l.d_in % 8 == 0 &&
      l.d_out % 8 == 0) {
    const bool l2_layer = norm && l.d_out <= kLayerGemmMaxNormWidth && act != Act::kGelu;
    const bool gelu_layer = !norm && act == Act::kGelu && store == Sm90Store::kStaged;
    if (l2_layer || gelu_layer) return Path::kFusedSm90;
  }
  // With normalisation and a 16-bit output, cuBLASLt writes the output dtype and one in-place pass
  // normalises it (2 + 2 bytes per value instead of 4 + 4 through an fp32 buffer; the row is rounded
  // to 16 bits once before scaling). An fp32 output takes kLtEpilogue (same traffic, one rounding).
  if (epilogue_fits && (dst_type == ct || dst_type == DType::kFloat32) && !(norm && dst_type == DType::kFloat32))
    return norm ? Path::kLtNormalize : Path::kLt;
  return Path::kLtEpilogue;
}

std::vector<std::string> FusedOpCuda::layer_paths(DType x_type, DType out_type, bool sm90) const {
  std::vector<std::string> names;
  const Sm90Store store = sm90_variant().store;
  for (size_t i = 0; i < layers_.size(); ++i) {
    switch (path_of(i, x_type, i + 1 == layers_.size() ? out_type : x_type, sm90, store)) {
      case Path::kFusedSm90: names.emplace_back("sm90_fused"); break;
      case Path::kLt: names.emplace_back("cublaslt"); break;
      case Path::kLtNormalize: names.emplace_back("cublaslt+normalize"); break;
      case Path::kLtEpilogue: names.emplace_back("cublaslt+epilogue"); break;
    }
  }
  return names;
}

void FusedOpCuda::run_chunk(const void* x, int64_t m, void* out, DType ct, DType out_type, int device, bool sm90,
                            Sm90Variant variant, uintptr_t stream, void* lt, void* workspace) const {
  auto& ws = *static_cast<Workspace*>(workspace);
  const auto handle = static_cast<cublasLtHandle_t>(lt);
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  const void* in = x;
  for (size_t i = 0; i < layers_.size(); ++i) {
    const LayerSpec& l = layers_[i];
    const bool last = i + 1 == layers_.size();
    const bool has_bias = !l.bias.empty();
    const int64_t width = l.act == Act::kNone ? 0 : l.act_width;
    const Act act = width > 0 ? l.act : Act::kNone;
    void* dst = last ? out : ws.act[i % 2];  // the layer's final values, in dst_type
    const DType dst_type = last ? out_type : ct;
    const void* w = arrays_on(device, ct, false, stream).ptrs[i];
    const int align_in = pointer_alignment(reinterpret_cast<uintptr_t>(in));
    const bool norm = last && normalize_;

    Path path = path_of(i, ct, dst_type, sm90, variant.store);
    if (path == Path::kFusedSm90) {
      // 0. One kernel: GEMM, bias, activation, L2, cast (fp32 bias, as the epilogue kernel's).
      LayerGemmArgs args;
      args.x = in;
      args.w = w;
      args.bias = has_bias ? static_cast<const float*>(arrays_on(device, DType::kFloat32, true, stream).ptrs[i])
                           : nullptr;
      args.out = dst;
      args.m = m;
      args.n = l.d_out;
      args.k = l.d_in;
      args.act = act;
      args.act_width = width;
      args.normalize = norm;
      args.variant = variant;
      if (layer_gemm_sm90_supports(ct, args) && layer_gemm_sm90_workspace(ct, args) <= ws.lt_bytes) {
        layer_gemm_sm90(ct, args, ws.lt, ws.lt_bytes, s);
        in = dst;
        continue;
      }
      path = path_of(i, ct, dst_type, false, variant.store);  // unaligned views: the cuBLASLt paths
    }

    // 1. cuBLASLt does the whole layer when its epilogue fits (bias, relu on every output; its GELU is
    //    the tanh approximation, so never used) and D may be dst's dtype; with normalisation of a
    //    16-bit output, one in-place pass follows (see path_of).
    if (path == Path::kLt || path == Path::kLtNormalize) {
      const cublasLtEpilogue_t epi = act == Act::kRelu ? (has_bias ? CUBLASLT_EPILOGUE_RELU_BIAS : CUBLASLT_EPILOGUE_RELU)
                                                       : (has_bias ? CUBLASLT_EPILOGUE_BIAS : CUBLASLT_EPILOGUE_DEFAULT);
      const void* bias = has_bias ? arrays_on(device, dst_type, true, stream).ptrs[i] : nullptr;
      auto plan = plan_for(device, i, m, ct, dst_type, static_cast<int>(epi), bias, align_in,
                           pointer_alignment(reinterpret_cast<uintptr_t>(dst)));
      if (plan->ok) {
        run_gemm(*plan, handle, w, in, dst, ws.lt, s);
        if (norm) launch_normalize_inplace(dst, m, l.d_out, dst_type, s);
        in = dst;
        continue;
      }
    }
    // 2. A 16-bit layer whose epilogue cuBLASLt cannot finish: cuBLASLt writes the 16-bit result with
    //    its bias, then one in-place pass applies the activation on the leading `width` outputs and L2
    //    (values stay 16-bit between the two, as torch autocast keeps them).
    if (dst_type == ct && ct != DType::kFloat32) {
      const cublasLtEpilogue_t epi = has_bias ? CUBLASLT_EPILOGUE_BIAS : CUBLASLT_EPILOGUE_DEFAULT;
      const void* bias = has_bias ? arrays_on(device, ct, true, stream).ptrs[i] : nullptr;
      auto plan = plan_for(device, i, m, ct, ct, static_cast<int>(epi), bias, align_in,
                           pointer_alignment(reinterpret_cast<uintptr_t>(dst)));
      if (plan->ok) {
        run_gemm(*plan, handle, w, in, dst, ws.lt, s);
        launch_finish_inplace(dst, m, l.d_out, act, width, norm, ct, s);
        in = dst;
        continue;
      }
    }
    // 3. Otherwise an fp32 GEMM result (straight into dst when dst is fp32), then one pass of the
    //    fused epilogue kernel: bias, activation on the leading `width` outputs, L2, cast.
    if (dst_type != DType::kFloat32) ws.ensure(&ws.d32, &ws.d32_bytes, static_cast<size_t>(m * l.d_out * 4));
    float* y = dst_type == DType::kFloat32 ? static_cast<float*>(dst) : static_cast<float*>(ws.d32);
    auto plan = plan_for(device, i, m, ct, DType::kFloat32, static_cast<int>(CUBLASLT_EPILOGUE_DEFAULT), nullptr,
                         align_in, pointer_alignment(reinterpret_cast<uintptr_t>(y)));
    if (!plan->ok)
      throw CudaError("cublasLtMatmulAlgoGetHeuristic found no algorithm for layer " + std::to_string(i) + " (" +
                      std::to_string(l.d_out) + " x " + std::to_string(l.d_in) + ", " + std::to_string(m) +
                      " rows, " + dtype_name(ct) + " in, float32 out)");
    run_gemm(*plan, handle, w, in, y, ws.lt, s);
    if (has_bias || act != Act::kNone || norm || static_cast<void*>(y) != dst) {
      const auto* bias = has_bias ? static_cast<const float*>(arrays_on(device, DType::kFloat32, true, stream).ptrs[i])
                                  : nullptr;
      launch_epilogue(y, m, l.d_out, bias, act, width, norm, dst, dst_type, s);
    }
    in = dst;
  }
}

void FusedOpCuda::apply(uintptr_t x, DType x_type, int64_t n, uintptr_t out, DType out_type, int device,
                        uintptr_t stream, bool trusted) const {
  // Argument checks first: none of them touches CUDA.
  if (n < 0) throw std::invalid_argument("n must be >= 0, got " + std::to_string(n));
  if (device < 0) throw std::invalid_argument("device must be >= 0, got " + std::to_string(device));
  const int64_t widest = std::max(d_in(), max_d_out_);
  if (n > std::numeric_limits<int64_t>::max() / 4 / widest)
    throw std::invalid_argument("n=" + std::to_string(n) + " rows overflow the byte size of the batch");
  if (n == 0) return;
  if (x == 0 || out == 0) throw std::invalid_argument("x_ptr and out_ptr must not be null");
  const auto x_bytes = static_cast<uintptr_t>(n * d_in() * static_cast<int64_t>(dtype_size(x_type)));
  const auto o_bytes = static_cast<uintptr_t>(n * d_out() * static_cast<int64_t>(dtype_size(out_type)));
  if (x < out + o_bytes && out < x + x_bytes) throw std::invalid_argument("the output overlaps the input");

  check_device(device);
  DeviceGuard guard(device);
  if (!trusted) {
    check_device_pointer(x, device, "x_ptr");
    check_device_pointer(out, device, "out_ptr");
  }

  const DType ct = x_type;  // compute dtype: the GEMMs' A/B type
  // Rows per chunk: as many as the scratch budget holds (intermediates in ct, plus an fp32 result
  // where a layer needs one); a single fused or cuBLASLt layer needs no scratch and runs whole.
  // (Chunks of 16-byte aligned arrays stay aligned wherever the fused kernel applies: d_in, d_out % 8 == 0.)
  const bool sm90 = device_is_sm90(device);
  const bool fused = sm90 && x % 16 == 0 && out % 16 == 0;
  const Sm90Variant variant = sm90_variant();  // read once: every layer of this call agrees
  bool needs_d32 = false;
  for (size_t i = 0; i < layers_.size(); ++i) {
    const DType dst_type = i + 1 == layers_.size() ? out_type : ct;
    needs_d32 = needs_d32 || (path_of(i, ct, dst_type, fused, variant.store) == Path::kLtEpilogue &&
                              dst_type != DType::kFloat32 && dst_type != ct);
  }
  const int64_t bytes_per_row = (layers_.size() > 1 ? 2 * max_hidden_ * static_cast<int64_t>(dtype_size(ct)) : 0) +
                                (needs_d32 ? max_d_out_ * 4 : 0);
  const int64_t fit = bytes_per_row > 0 ? static_cast<int64_t>(kScratchBudgetBytes) / bytes_per_row : n;
  const int64_t chunk = std::clamp<int64_t>(fit, 1, std::min(n, kMaxChunkRows));
  Workspace& ws = workspace_for(device, stream);
  std::lock_guard<std::mutex> lock(ws.mu);
  ws.ensure(&ws.lt, &ws.lt_bytes, kLtWorkspaceBytes);
  if (needs_d32) ws.ensure(&ws.d32, &ws.d32_bytes, static_cast<size_t>(chunk * max_d_out_ * 4));
  if (layers_.size() > 1)
    for (int b = 0; b < 2; ++b)
      ws.ensure(&ws.act[b], &ws.act_bytes[b], static_cast<size_t>(chunk * max_hidden_) * dtype_size(ct));
  cublasLtHandle_t handle = lt_handle(device);
  const auto* xb = reinterpret_cast<const unsigned char*>(x);
  auto* ob = reinterpret_cast<unsigned char*>(out);
  for (int64_t r0 = 0; r0 < n; r0 += chunk) {
    const int64_t m = std::min(chunk, n - r0);
    run_chunk(xb + r0 * d_in() * static_cast<int64_t>(dtype_size(x_type)), m,
              ob + r0 * d_out() * static_cast<int64_t>(dtype_size(out_type)), ct, out_type, device, sm90, variant,
              stream, handle, &ws);
  }
}

}  // namespace bc_fast::cuda
