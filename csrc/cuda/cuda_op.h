// bc_fast._cuda: the layer program of FusedOp on NVIDIA GPUs, and thin RAII wrappers around CUDA
// memory, streams and events. Plain C++ (no pybind11, no CUDA headers): pointers travel as
// uintptr_t, so the binding file compiles with the host compiler alone.
//
// Errors: bad arguments -> std::invalid_argument; a failing CUDA/cuBLASLt call -> CudaError naming
// the call and the CUDA error string; out of GPU (or pinned host) memory -> CudaOutOfMemory.
// No function touches the CUDA runtime at load time.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

namespace bc_fast::cuda {

class CudaError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

class CudaOutOfMemory : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };
constexpr int kNumDTypes = 3;

// "float32" | "float16" | "bfloat16"; anything else -> invalid_argument naming `what`.
DType parse_dtype(const std::string& name, const char* what);
size_t dtype_size(DType t);

enum class Act : int { kNone = 0, kRelu = 1, kGelu = 2 };
Act parse_act(const std::string& name, const std::string& where);

// How the fused sm_90a layer kernel (layer_gemm_sm90.h) is built, one instance per pair (and dtype): the
// schedule of its GEMM and the way its epilogue writes the tile (layer_epilogue_sm90.cuh).
// - kCooperative: 128 x 256 tiles, both consumer warpgroups on one tile, the epilogue between tiles.
// - kPingpong: 64 x 256 tiles, one per consumer warpgroup, one's epilogue overlapping the other's MMAs.
enum class Sm90Schedule : int { kCooperative = 0, kPingpong = 1 };
// - kDirect: 4-byte stores from registers. kStaged: through shared memory, 16-byte coalesced row stores;
//   it also takes GELU layers without normalisation (the GELU applied on the values read back).
enum class Sm90Store : int { kDirect = 0, kStaged = 1 };
struct Sm90Variant {
  Sm90Schedule schedule = Sm90Schedule::kCooperative;
  Sm90Store store = Sm90Store::kDirect;
};

struct LayerSpec {
  int64_t d_in = 0;
  int64_t d_out = 0;
  std::vector<float> weight;  // d_out x d_in, row-major
  std::vector<float> bias;    // d_out values, or empty
  Act act = Act::kNone;
  int64_t act_width = 0;      // the activation applies to outputs [0, act_width)
};

struct DeviceProps {
  int index = 0;
  std::string name;
  std::string compute_capability;  // "9.0"
  int64_t total_memory = 0;
};

struct DeviceInfo {
  bool available = false;
  std::string error;
  int device_count = 0;
  int driver_version = 0;
  int runtime_version = 0;
  int64_t cublas_version = 0;
  bool fused_sm90_kernels = false;  // built with the CUTLASS sm_90a layer kernels
  std::vector<DeviceProps> devices;
};

// Never throws for a missing GPU or driver: available=false and error says why.
DeviceInfo device_info();

class FusedOpCuda {
 public:
  // Validates everything on the host (no CUDA call); throws std::invalid_argument.
  FusedOpCuda(std::vector<LayerSpec> layers, bool normalize);
  ~FusedOpCuda();
  FusedOpCuda(const FusedOpCuda&) = delete;
  FusedOpCuda& operator=(const FusedOpCuda&) = delete;

  int64_t d_in() const { return layers_.front().d_in; }
  int64_t d_out() const { return layers_.back().d_out; }
  size_t num_layers() const { return layers_.size(); }

  // out[n x d_out] = program(x[n x d_in]); both C-contiguous device pointers on `device`,
  // enqueued on `stream` (a cudaStream_t; 0 = legacy default stream), asynchronous. `trusted`: the
  // caller has established that both pointers are device memory on `device` (a torch tensor's device,
  // a buffer it allocated there), so the two per-call pointer queries are skipped.
  void apply(uintptr_t x, DType x_type, int64_t n, uintptr_t out, DType out_type, int device, uintptr_t stream,
             bool trusted = false) const;

  // How each layer runs for this dtype pair on a device that does (sm90) or does not run the fused
  // sm_90a kernels, for 16-byte aligned arrays: "sm90_fused" (one kernel: GEMM + epilogue),
  // "cublaslt" (cuBLASLt with its own bias/ReLU epilogue), "cublaslt+normalize" (then one L2 pass),
  // "cublaslt+epilogue" (fp32 GEMM result, then one epilogue pass). Host-only: no CUDA call.
  std::vector<std::string> layer_paths(DType x_type, DType out_type, bool sm90) const;

  struct Plan;  // one layer's cuBLASLt GEMM: descriptors and its (timed) algorithm choice

 private:
  struct DeviceWeights;
  enum class Path { kLt, kLtNormalize, kLtEpilogue, kFusedSm90 };
  Path path_of(size_t layer, DType ct, DType dst_type, bool fused, Sm90Store store) const;
  const DeviceWeights& arrays_on(int device, DType t, bool biases, uintptr_t stream) const;
  std::shared_ptr<const Plan> plan_for(int device, size_t layer, int64_t m, DType ab, DType d, int epilogue,
                                       const void* bias, int align_b, int align_d) const;
  void run_chunk(const void* x, int64_t m, void* out, DType ct, DType out_type, int device, bool sm90,
                 Sm90Variant variant, uintptr_t stream, void* lt_handle, void* workspace) const;
  void free_device_memory() noexcept;

  std::vector<LayerSpec> layers_;
  bool normalize_;
  int64_t max_hidden_ = 0;  // widest intermediate (outputs of all but the last layer)
  int64_t max_d_out_ = 0;
  mutable std::mutex mu_;   // guards weights_ and plans_
  // (device, dtype) for weights, (device, kNumDTypes + dtype) for biases
  mutable std::map<std::pair<int, int>, std::unique_ptr<DeviceWeights>> weights_;
  using PlanKey = std::tuple<int, size_t, int64_t, int, int, int, int, int>;
  mutable std::map<PlanKey, std::shared_ptr<const Plan>> plans_;
};

// ---- memory / stream primitives (thin RAII wrappers) ----

class PinnedBuffer {
 public:
  explicit PinnedBuffer(int64_t nbytes);  // cudaHostAlloc (portable)
  ~PinnedBuffer();
  PinnedBuffer(const PinnedBuffer&) = delete;
  PinnedBuffer& operator=(const PinnedBuffer&) = delete;
  void* data() const { return ptr_; }
  int64_t nbytes() const { return nbytes_; }

 private:
  void* ptr_ = nullptr;
  int64_t nbytes_ = 0;
};

class DeviceBuffer {
 public:
  DeviceBuffer(int64_t nbytes, int device);  // cudaMalloc on `device`
  ~DeviceBuffer();
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  uintptr_t ptr() const { return reinterpret_cast<uintptr_t>(ptr_); }
  int64_t nbytes() const { return nbytes_; }
  int device() const { return device_; }

 private:
  void* ptr_ = nullptr;
  int64_t nbytes_ = 0;
  int device_ = 0;
};

class Stream {
 public:
  explicit Stream(int device);  // non-blocking stream on `device`
  ~Stream();
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;
  uintptr_t ptr() const { return handle_; }
  int device() const { return device_; }
  void synchronize() const;

 private:
  uintptr_t handle_ = 0;
  int device_ = 0;
};

class Event {
 public:
  explicit Event(int device);  // timing disabled
  ~Event();
  Event(const Event&) = delete;
  Event& operator=(const Event&) = delete;
  void record(uintptr_t stream) const;
  void synchronize() const;
  bool query() const;  // true when all work captured by the last record() is done
  uintptr_t handle() const { return handle_; }
  int device() const { return device_; }

 private:
  uintptr_t handle_ = 0;
  int device_ = 0;
};

// kind: "h2d" | "d2h" | "d2d" (anything else -> invalid_argument).
void memcpy_async(uintptr_t dst, uintptr_t src, int64_t nbytes, const std::string& kind, uintptr_t stream);
void stream_wait_event(uintptr_t stream, const Event& event);
// The device holding device (or managed) memory at `ptr`; invalid_argument for host/unknown pointers.
int pointer_device(uintptr_t ptr);

}  // namespace bc_fast::cuda
