// Host-side pieces of bc_fast._cuda: errors, device queries, and the memory/stream primitives.
#include <cuda_runtime_api.h>

#include <map>
#include <mutex>
#include <string>
#include <utility>

#include "cuda_check.h"
#include "cuda_op.h"
#include "layer_gemm_sm90.h"

namespace bc_fast::cuda {

void throw_cuda(cudaError_t err, const char* call) {
  (void)cudaGetLastError();  // reset the non-sticky error state
  const std::string msg = std::string(call) + " failed: " + cudaGetErrorName(err) + " (" +
                          cudaGetErrorString(err) + ")";
  if (err == cudaErrorMemoryAllocation) throw CudaOutOfMemory("out of CUDA memory: " + msg);
  throw CudaError(msg);
}

DType parse_dtype(const std::string& name, const char* what) {
  if (name == "float32") return DType::kFloat32;
  if (name == "float16") return DType::kFloat16;
  if (name == "bfloat16") return DType::kBFloat16;
  throw std::invalid_argument(std::string(what) + " must be 'float32', 'float16' or 'bfloat16', got '" + name + "'");
}

size_t dtype_size(DType t) { return t == DType::kFloat32 ? 4 : 2; }

Act parse_act(const std::string& name, const std::string& where) {
  if (name == "none") return Act::kNone;
  if (name == "relu") return Act::kRelu;
  if (name == "gelu") return Act::kGelu;
  throw std::invalid_argument(where + ": unknown activation '" + name + "'; expected 'none', 'relu' or 'gelu'");
}

int device_count() {
  int n = 0;
  const cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    throw CudaError(std::string("CUDA is not available: cudaGetDeviceCount failed: ") + cudaGetErrorName(err) +
                    " (" + cudaGetErrorString(err) + ")");
  }
  if (n == 0) throw CudaError("CUDA is not available: no CUDA device is visible");
  return n;
}

void check_device(int device) {
  const int n = device_count();
  if (device < 0 || device >= n)
    throw std::invalid_argument("device must be in [0, " + std::to_string(n - 1) + "], got " + std::to_string(device));
}

int device_attribute(cudaDeviceAttr attr, int device) {
  static std::mutex mu;
  static auto* known = new std::map<std::pair<int, int>, int>();  // leaked: never torn down at exit
  std::lock_guard<std::mutex> lock(mu);
  const std::pair<int, int> key{static_cast<int>(attr), device};
  auto it = known->find(key);
  if (it != known->end()) return it->second;
  int value = 0;
  BC_CUDA_CHECK(cudaDeviceGetAttribute(&value, attr, device));
  return known->emplace(key, value).first->second;
}

DeviceGuard::DeviceGuard(int device) {
  BC_CUDA_CHECK(cudaGetDevice(&previous_));
  if (previous_ != device) BC_CUDA_CHECK(cudaSetDevice(device));
}

DeviceGuard::~DeviceGuard() {
  int now = -1;
  if (cudaGetDevice(&now) == cudaSuccess && now != previous_) (void)cudaSetDevice(previous_);
  (void)cudaGetLastError();
}

DeviceInfo device_info() {
  DeviceInfo info;
  (void)cudaRuntimeGetVersion(&info.runtime_version);
  (void)cudaDriverGetVersion(&info.driver_version);  // 0 without a driver
  info.cublas_version = cublaslt_version();          // a host-only query: works without a GPU
  info.fused_sm90_kernels = layer_gemm_sm90_built();
  int n = 0;
  const cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    info.error = std::string("cudaGetDeviceCount failed: ") + cudaGetErrorName(err) + " (" + cudaGetErrorString(err) +
                 ")";
    return info;
  }
  info.device_count = n;
  if (n == 0) {
    info.error = "no CUDA device is visible";
    return info;
  }
  for (int i = 0; i < n; ++i) {
    cudaDeviceProp p{};
    const cudaError_t e = cudaGetDeviceProperties(&p, i);
    if (e != cudaSuccess) {
      (void)cudaGetLastError();
      info.error = "cudaGetDeviceProperties(" + std::to_string(i) + ") failed: " + cudaGetErrorString(e);
      return info;
    }
    info.devices.push_back(DeviceProps{i, p.name, std::to_string(p.major) + "." + std::to_string(p.minor),
                                       static_cast<int64_t>(p.totalGlobalMem)});
  }
  info.available = true;
  return info;
}

// ---- primitives ----

namespace {
void check_nbytes(int64_t nbytes) {
  if (nbytes < 0) throw std::invalid_argument("nbytes must be >= 0, got " + std::to_string(nbytes));
}
}  // namespace

PinnedBuffer::PinnedBuffer(int64_t nbytes) : nbytes_(nbytes) {
  check_nbytes(nbytes);
  // At least one byte, so that an empty buffer still has a valid address for the buffer protocol.
  BC_CUDA_CHECK(cudaHostAlloc(&ptr_, static_cast<size_t>(nbytes > 0 ? nbytes : 1), cudaHostAllocPortable));
}

PinnedBuffer::~PinnedBuffer() {
  if (ptr_ != nullptr) (void)cudaFreeHost(ptr_);
  (void)cudaGetLastError();
}

DeviceBuffer::DeviceBuffer(int64_t nbytes, int device) : nbytes_(nbytes), device_(device) {
  check_nbytes(nbytes);
  check_device(device);
  DeviceGuard guard(device);
  if (nbytes > 0) BC_CUDA_CHECK(cudaMalloc(&ptr_, static_cast<size_t>(nbytes)));
}

DeviceBuffer::~DeviceBuffer() {
  if (ptr_ == nullptr) return;
  try {
    DeviceGuard guard(device_);
    (void)cudaFree(ptr_);
  } catch (...) {  // destructors never throw; at interpreter exit the runtime may be gone
  }
  (void)cudaGetLastError();
}

Stream::Stream(int device) : device_(device) {
  check_device(device);
  DeviceGuard guard(device);
  cudaStream_t s = nullptr;
  BC_CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  handle_ = reinterpret_cast<uintptr_t>(s);
}

Stream::~Stream() {
  try {
    DeviceGuard guard(device_);
    cudaStream_t s = reinterpret_cast<cudaStream_t>(handle_);
    // Finish first: a later stream may get the same handle, and bc_fast caches scratch per handle.
    (void)cudaStreamSynchronize(s);
    (void)cudaStreamDestroy(s);
  } catch (...) {
  }
  (void)cudaGetLastError();
}

void Stream::synchronize() const {
  BC_CUDA_CHECK(cudaStreamSynchronize(reinterpret_cast<cudaStream_t>(handle_)));
}

Event::Event(int device) : device_(device) {
  check_device(device);
  DeviceGuard guard(device);
  cudaEvent_t e = nullptr;
  BC_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
  handle_ = reinterpret_cast<uintptr_t>(e);
}

Event::~Event() {
  try {
    DeviceGuard guard(device_);
    (void)cudaEventDestroy(reinterpret_cast<cudaEvent_t>(handle_));
  } catch (...) {
  }
  (void)cudaGetLastError();
}

void Event::record(uintptr_t stream) const {
  DeviceGuard guard(device_);
  BC_CUDA_CHECK(cudaEventRecord(reinterpret_cast<cudaEvent_t>(handle_), reinterpret_cast<cudaStream_t>(stream)));
}

void Event::synchronize() const { BC_CUDA_CHECK(cudaEventSynchronize(reinterpret_cast<cudaEvent_t>(handle_))); }

bool Event::query() const {
  const cudaError_t err = cudaEventQuery(reinterpret_cast<cudaEvent_t>(handle_));
  if (err == cudaSuccess) return true;
  if (err == cudaErrorNotReady) {
    (void)cudaGetLastError();
    return false;
  }
  throw_cuda(err, "cudaEventQuery");
}

void memcpy_async(uintptr_t dst, uintptr_t src, int64_t nbytes, const std::string& kind, uintptr_t stream) {
  cudaMemcpyKind k;
  if (kind == "h2d") {
    k = cudaMemcpyHostToDevice;
  } else if (kind == "d2h") {
    k = cudaMemcpyDeviceToHost;
  } else if (kind == "d2d") {
    k = cudaMemcpyDeviceToDevice;
  } else {
    throw std::invalid_argument("kind must be 'h2d', 'd2h' or 'd2d', got '" + kind + "'");
  }
  check_nbytes(nbytes);
  if (nbytes == 0) return;
  if (dst == 0 || src == 0) throw std::invalid_argument("memcpy_async: null pointer");
  BC_CUDA_CHECK(cudaMemcpyAsync(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src),
                                static_cast<size_t>(nbytes), k, reinterpret_cast<cudaStream_t>(stream)));
}

void stream_wait_event(uintptr_t stream, const Event& event) {
  BC_CUDA_CHECK(cudaStreamWaitEvent(reinterpret_cast<cudaStream_t>(stream),
                                    reinterpret_cast<cudaEvent_t>(event.handle()), 0));
}

int pointer_device(uintptr_t ptr) {
  if (ptr == 0) throw std::invalid_argument("pointer_device: null pointer");
  cudaPointerAttributes attr{};
  BC_CUDA_CHECK(cudaPointerGetAttributes(&attr, reinterpret_cast<const void*>(ptr)));
  if (attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged)
    throw std::invalid_argument("pointer " + std::to_string(ptr) + " is not CUDA device memory");
  return attr.device;
}

}  // namespace bc_fast::cuda
