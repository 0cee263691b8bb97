#include "onednn_gemm.h"

#include <dlfcn.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <unordered_map>

#include "kernels/kernels.h"

namespace bc_fast {

namespace {

// The part of oneDNN's C API (oneapi/dnnl/dnnl.h and dnnl_types.h, 3.x) this file calls, declared here because
// the library is optional and loaded by path. onednn_load() checks the enum values below against the library's
// own *2str functions before anything else runs.
using Status = int;
using Handle = void*;  // every dnnl_*_t handle is a pointer to an opaque struct
constexpr Status kSuccess = 0;
constexpr int kCpuEngine = 1;           // dnnl_cpu
constexpr unsigned kInOrderStream = 1;  // dnnl_stream_in_order
constexpr int kBf16 = 2;                // dnnl_bf16
constexpr int kF32 = 3;                 // dnnl_f32
constexpr int kFormatAny = 1;           // dnnl_format_tag_any
constexpr int kScratchpadUser = 1;      // dnnl_scratchpad_mode_user
constexpr int kQueryImplInfo = 8;       // dnnl_query_impl_info_str
constexpr int kQueryWeightsMd = 131;    // dnnl_query_weights_md
constexpr int kQueryScratchpadMd = 136; // dnnl_query_scratchpad_md
constexpr int kArgSrc = 1, kArgDst = 17, kArgWeights = 33, kArgBias = 41, kArgScratchpad = 80;  // DNNL_ARG_*
constexpr unsigned kRuntimeSeq = 1, kRuntimeOmp = 2;  // DNNL_RUNTIME_SEQ, DNNL_RUNTIME_OMP

struct Version {
  int major, minor, patch;
  const char* hash;
  unsigned cpu_runtime, gpu_runtime;
};
struct ExecArg {
  int arg;
  Handle memory;
};

struct Api {
  const Version* (*version)();
  const char* (*alg_kind2str)(int);
  const char* (*dt2str)(int);
  const char* (*fmt_tag2str)(int);
  const char* (*scratchpad_mode2str)(int);
  const char* (*engine_kind2str)(int);
  const char* (*status2str)(Status);
  Status (*engine_create)(Handle*, int, size_t);
  Status (*stream_create)(Handle*, Handle, unsigned);
  Status (*stream_destroy)(Handle);
  Status (*stream_wait)(Handle);
  Status (*md_create_with_strides)(Handle*, int, const int64_t*, int, const int64_t*);
  Status (*md_create_with_tag)(Handle*, int, const int64_t*, int, int);
  Status (*md_destroy)(Handle);
  size_t (*md_get_size)(Handle);
  int (*md_equal)(Handle, Handle);
  Status (*attr_create)(Handle*);
  Status (*attr_destroy)(Handle);
  Status (*attr_set_scratchpad_mode)(Handle, int);
  Status (*attr_set_post_ops)(Handle, Handle);
  Status (*post_ops_create)(Handle*);
  Status (*post_ops_destroy)(Handle);
  Status (*post_ops_append_eltwise)(Handle, int, float, float);
  Status (*matmul_pd_create)(Handle*, Handle, Handle, Handle, Handle, Handle, Handle);
  Status (*reorder_pd_create)(Handle*, Handle, Handle, Handle, Handle, Handle);
  Status (*pd_query)(Handle, int, int, void*);
  Handle (*pd_query_md)(Handle, int, int);
  Status (*pd_destroy)(Handle);
  Status (*primitive_create)(Handle*, Handle);
  Status (*primitive_destroy)(Handle);
  Status (*primitive_execute)(Handle, Handle, int, const ExecArg*);
  Status (*memory_create)(Handle*, Handle, Handle, void*);
  Status (*memory_destroy)(Handle);
  Status (*memory_set_data_handle)(Handle, void*);
  // The OpenMP runtime oneDNN itself resolved (an installed wheel's core may carry a private copy of libgomp
  // while oneDNN binds the system's or torch's); null for a sequential build.
  int (*omp_get_max_threads)();
  void (*omp_set_num_threads)(int);
};

struct Library {
  Api api{};
  Handle engine = nullptr;
  std::string version;
  // dnnl_alg_kind_t values of the eltwise post-ops, found by name (their numbers changed between 3.x releases);
  // -1 where absent.
  int relu_alg = -1, gelu_alg = -1;
};

bool same(const char* got, const char* want) { return got != nullptr && std::strcmp(got, want) == 0; }

// The dnnl_alg_kind_t whose name is `name`, or -1.
int find_alg_kind(const Api& a, const char* name) {
  for (int v = 0; v < 0x400; ++v)
    if (same(a.alg_kind2str(v), name)) return v;
  return -1;
}

std::mutex g_load_mutex;
bool g_load_tried = false;
std::string g_load_error;
std::atomic<const Library*> g_library{nullptr};

template <class F>
bool bind(void* so, const char* name, F& f, std::string& missing) {
  void* p = dlsym(so, name);
  if (p == nullptr) missing += std::string(missing.empty() ? "" : ", ") + name;
  f = reinterpret_cast<F>(p);
  return p != nullptr;
}


std::string load_library(const std::string& path, Library& lib) {
  void* so = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (so == nullptr) {
    const char* err = dlerror();
    return "cannot load " + path + ": " + (err != nullptr ? err : "dlopen failed");
  }
  Api& a = lib.api;
  std::string missing;
  bind(so, "dnnl_version", a.version, missing);
  bind(so, "dnnl_dt2str", a.dt2str, missing);
  bind(so, "dnnl_alg_kind2str", a.alg_kind2str, missing);
  bind(so, "dnnl_fmt_tag2str", a.fmt_tag2str, missing);
  bind(so, "dnnl_scratchpad_mode2str", a.scratchpad_mode2str, missing);
  bind(so, "dnnl_engine_kind2str", a.engine_kind2str, missing);
  bind(so, "dnnl_status2str", a.status2str, missing);
  bind(so, "dnnl_engine_create", a.engine_create, missing);
  bind(so, "dnnl_stream_create", a.stream_create, missing);
  bind(so, "dnnl_stream_destroy", a.stream_destroy, missing);
  bind(so, "dnnl_stream_wait", a.stream_wait, missing);
  bind(so, "dnnl_memory_desc_create_with_strides", a.md_create_with_strides, missing);
  bind(so, "dnnl_memory_desc_create_with_tag", a.md_create_with_tag, missing);
  bind(so, "dnnl_memory_desc_destroy", a.md_destroy, missing);
  bind(so, "dnnl_memory_desc_get_size", a.md_get_size, missing);
  bind(so, "dnnl_memory_desc_equal", a.md_equal, missing);
  bind(so, "dnnl_primitive_attr_create", a.attr_create, missing);
  bind(so, "dnnl_primitive_attr_destroy", a.attr_destroy, missing);
  bind(so, "dnnl_primitive_attr_set_scratchpad_mode", a.attr_set_scratchpad_mode, missing);
  bind(so, "dnnl_primitive_attr_set_post_ops", a.attr_set_post_ops, missing);
  bind(so, "dnnl_post_ops_create", a.post_ops_create, missing);
  bind(so, "dnnl_post_ops_destroy", a.post_ops_destroy, missing);
  bind(so, "dnnl_post_ops_append_eltwise", a.post_ops_append_eltwise, missing);
  bind(so, "dnnl_matmul_primitive_desc_create", a.matmul_pd_create, missing);
  bind(so, "dnnl_reorder_primitive_desc_create", a.reorder_pd_create, missing);
  bind(so, "dnnl_primitive_desc_query", a.pd_query, missing);
  bind(so, "dnnl_primitive_desc_query_md", a.pd_query_md, missing);
  bind(so, "dnnl_primitive_desc_destroy", a.pd_destroy, missing);
  bind(so, "dnnl_primitive_create", a.primitive_create, missing);
  bind(so, "dnnl_primitive_destroy", a.primitive_destroy, missing);
  bind(so, "dnnl_primitive_execute", a.primitive_execute, missing);
  bind(so, "dnnl_memory_create", a.memory_create, missing);
  bind(so, "dnnl_memory_destroy", a.memory_destroy, missing);
  bind(so, "dnnl_memory_set_data_handle", a.memory_set_data_handle, missing);
  // The library stays loaded for the life of the process (primitives and JIT code live in it).
  if (!missing.empty()) return path + " is not oneDNN 3.x: it lacks " + missing;
  // dlsym on the library's handle searches it and then its dependencies: this finds oneDNN's own OpenMP.
  a.omp_get_max_threads = reinterpret_cast<int (*)()>(dlsym(so, "omp_get_max_threads"));
  a.omp_set_num_threads = reinterpret_cast<void (*)(int)>(dlsym(so, "omp_set_num_threads"));
  const Version* v = a.version();
  if (v == nullptr || v->major != 3)
    return path + " is oneDNN " + (v != nullptr ? std::to_string(v->major) : std::string("?")) + ".x; bc_fast needs 3.x";
  lib.version = "oneDNN " + std::to_string(v->major) + "." + std::to_string(v->minor) + "." +
                std::to_string(v->patch) + " (" + path + ")";
  // Nested in the core's OpenMP threads, each call must run on its caller's thread; a TBB or threadpool build
  // would start threads of its own.
  if (v->cpu_runtime != kRuntimeOmp && v->cpu_runtime != kRuntimeSeq)
    return lib.version + " was built with a CPU runtime other than OpenMP (code " + std::to_string(v->cpu_runtime) +
           "); use the onednn-cpu-gomp build";
  if (v->cpu_runtime == kRuntimeOmp && (a.omp_get_max_threads == nullptr || a.omp_set_num_threads == nullptr))
    return lib.version + " uses OpenMP, but its OpenMP runtime's omp_set_num_threads was not found";
  if (!same(a.dt2str(kBf16), "bf16") || !same(a.dt2str(kF32), "f32") || !same(a.fmt_tag2str(kFormatAny), "any") ||
      !same(a.scratchpad_mode2str(kScratchpadUser), "user") || !same(a.engine_kind2str(kCpuEngine), "cpu"))
    return lib.version + " numbers its data types, formats or engines differently from the oneDNN 3 API bc_fast uses";
  if (a.engine_create(&lib.engine, kCpuEngine, 0) != kSuccess) return lib.version + ": no CPU engine";
  lib.relu_alg = find_alg_kind(a, "eltwise_relu");
  lib.gelu_alg = find_alg_kind(a, "eltwise_gelu_erf");
  return "";
}

const Library& library() {
  const Library* lib = g_library.load(std::memory_order_acquire);
  if (lib == nullptr) throw std::runtime_error("oneDNN is not loaded (call onednn_load first)");
  return *lib;
}

void check(Status s, const char* what) {
  if (s == kSuccess) return;
  const char* why = library().api.status2str(s);
  throw std::runtime_error(std::string("oneDNN ") + what + " failed: " + (why != nullptr ? why : "unknown status"));
}

// An owned oneDNN handle, destroyed with the function given.
class Owned {
 public:
  Owned() = default;
  Owned(Handle h, Status (*destroy)(Handle)) : h_(h), destroy_(destroy) {}
  Owned(Owned&& o) noexcept : h_(o.h_), destroy_(o.destroy_) { o.h_ = nullptr; }
  Owned& operator=(Owned&& o) noexcept {
    std::swap(h_, o.h_);
    std::swap(destroy_, o.destroy_);
    return *this;
  }
  Owned(const Owned&) = delete;
  Owned& operator=(const Owned&) = delete;
  ~Owned() {
    if (h_ != nullptr) destroy_(h_);
  }
  Handle get() const { return h_; }

 private:
  Handle h_ = nullptr;
  Status (*destroy_)(Handle) = nullptr;
};

Owned strided_md(int64_t rows, int64_t cols, int type, int64_t row_stride, int64_t col_stride) {
  const Api& a = library().api;
  const int64_t dims[2] = {rows, cols};
  const int64_t strides[2] = {row_stride, col_stride};
  Handle md = nullptr;
  check(a.md_create_with_strides(&md, 2, dims, type, strides), "memory descriptor");
  return Owned(md, a.md_destroy);
}

Owned memory(Handle md, const void* data) {
  const Api& a = library().api;
  Handle mem = nullptr;
  check(a.memory_create(&mem, md, library().engine, const_cast<void*>(data)), "memory");
  return Owned(mem, a.memory_destroy);
}

Handle thread_stream() {
  struct Stream {
    Owned s;
    Stream() {
      const Api& a = library().api;
      Handle h = nullptr;
      check(a.stream_create(&h, library().engine, kInOrderStream), "stream");
      s = Owned(h, a.stream_destroy);
    }
  };
  thread_local Stream stream;
  return stream.s.get();
}

// Memory aligned to 64 bytes, grown as needed, one per thread.
uint8_t* thread_scratch(size_t bytes) {
  thread_local std::vector<uint8_t> buf;
  if (buf.size() < bytes + 64) buf.resize(bytes + 64);
  const auto p = reinterpret_cast<uintptr_t>(buf.data());
  return buf.data() + ((64 - p % 64) % 64);
}

// oneDNN sizes a primitive's thread partition by its OpenMP runtime's omp_get_max_threads() when it is made. Made
// under a one-thread setting (of that runtime, which need not be the core's), every primitive runs its whole block
// on the calling thread, in one fixed order: the core's own threads run the blocks, so the bits cannot depend on
// their number, and no second thread team starts inside them.
class OneThreadPrimitives {
 public:
  OneThreadPrimitives() {
    const Api& a = library().api;
    if (a.omp_set_num_threads == nullptr) return;
    saved_ = a.omp_get_max_threads();
    a.omp_set_num_threads(1);
  }
  ~OneThreadPrimitives() {
    if (saved_ > 0) library().api.omp_set_num_threads(saved_);
  }
  OneThreadPrimitives(const OneThreadPrimitives&) = delete;
  OneThreadPrimitives& operator=(const OneThreadPrimitives&) = delete;

 private:
  int saved_ = 0;
};

}  // namespace

std::string onednn_load(const std::string& path) {
  const std::lock_guard<std::mutex> lock(g_load_mutex);
  if (g_load_tried) return g_load_error;
  g_load_tried = true;
  auto lib = std::make_unique<Library>();
  g_load_error = load_library(path, *lib);
  if (g_load_error.empty()) g_library.store(lib.release(), std::memory_order_release);  // kept for the process
  return g_load_error;
}

std::string onednn_version() {
  const Library* lib = g_library.load(std::memory_order_acquire);
  return lib != nullptr ? lib->version : "";
}

namespace {

std::atomic<uint64_t> g_next_kernel_id{1};

// A thread's memory objects for one kernel: made once, then only their data pointers change per call.
struct KernelMemories {
  Owned src, weights, bias, dst, scratch;
};

}  // namespace

struct OnednnGemm::Kernel {
  uint64_t id = g_next_kernel_id.fetch_add(1, std::memory_order_relaxed);  // never reused: keys thread caches
  Owned src_md, dst_md, bias_md;
  Owned pd, primitive;
  Handle weights_md = nullptr;  // owned by pd
  Handle scratch_md = nullptr;  // owned by pd
  size_t scratch_bytes = 0;
  std::vector<uint8_t> own_weights;  // W in this primitive's layout, unless it shares another kernel's
  const uint8_t* weights = nullptr;
  std::string impl;
};

bool OnednnGemm::can_fuse(Activation act) {
  const Library* lib = g_library.load(std::memory_order_acquire);
  if (lib == nullptr) return false;
  return act == Activation::kNone || (act == Activation::kRelu && lib->relu_alg >= 0) ||
         (act == Activation::kGelu && lib->gelu_alg >= 0);
}

OnednnGemm::OnednnGemm(const float* weight, const float* bias, int64_t k, int64_t n, int64_t main_rows,
                       bool fused_output, Activation act)
    : k_(k), n_(n), fused_output_(fused_output), act_(act), weight_bf16_(static_cast<size_t>(k * n)),
      bias_(static_cast<size_t>(n), 0.0f) {
  library();  // throws when not loaded
  if (k <= 0 || n <= 0 || main_rows <= 0) throw std::invalid_argument("oneDNN GEMM: sizes must be positive");
  if (!fused_output && act != Activation::kNone)
    throw std::invalid_argument("oneDNN GEMM: an activation needs the fused (bf16) output");
  if (fused_output && !can_fuse(act)) throw std::invalid_argument("oneDNN GEMM: this oneDNN lacks the activation");
  for (size_t i = 0; i < weight_bf16_.size(); ++i) weight_bf16_[i] = float_to_bf16_bits(weight[i]);
  if (bias != nullptr) std::copy(bias, bias + n, bias_.begin());
  main_rows_ = padded_rows(main_rows);
  auto main = make_kernel(main_rows_, nullptr);
  impl_ = main->impl;
  if (impl_.rfind("ref", 0) == 0)
    throw std::runtime_error("oneDNN has only its reference kernel (" + impl_ + ") for a bf16 matmul on this CPU");
  kernels_.emplace(main_rows_, std::move(main));
}

OnednnGemm::~OnednnGemm() = default;

std::unique_ptr<OnednnGemm::Kernel> OnednnGemm::make_kernel(int64_t rows, const Kernel* like) const {
  const Api& a = library().api;
  const Handle engine = library().engine;
  const OneThreadPrimitives one_thread;
  auto kn = std::make_unique<Kernel>();
  kn->src_md = strided_md(rows, k_, kBf16, k_, 1);
  kn->dst_md = strided_md(rows, n_, fused_output_ ? kBf16 : kF32, n_, 1);
  kn->bias_md = strided_md(1, n_, kF32, n_, 1);
  Handle attr_h = nullptr;
  check(a.attr_create(&attr_h), "attribute");
  const Owned attr(attr_h, a.attr_destroy);
  check(a.attr_set_scratchpad_mode(attr.get(), kScratchpadUser), "scratchpad mode");
  if (act_ != Activation::kNone) {  // applied to the fp32 sums, before the rounding to bf16
    Handle ops_h = nullptr;
    check(a.post_ops_create(&ops_h), "post-ops");
    const Owned ops(ops_h, a.post_ops_destroy);
    const int alg = act_ == Activation::kRelu ? library().relu_alg : library().gelu_alg;
    check(a.post_ops_append_eltwise(ops.get(), alg, 0.0f, 0.0f), "activation post-op");
    check(a.attr_set_post_ops(attr.get(), ops.get()), "post-ops");
  }

  auto query_impl = [&](Handle pd) {
    const char* name = nullptr;
    check(a.pd_query(pd, kQueryImplInfo, 0, &name), "implementation query");
    return std::string(name != nullptr ? name : "");
  };
  Handle pd = nullptr;
  if (like != nullptr &&
      a.matmul_pd_create(&pd, engine, kn->src_md.get(), like->weights_md, kn->bias_md.get(), kn->dst_md.get(),
                         attr.get()) == kSuccess) {
    if (query_impl(pd) == like->impl) {
      kn->pd = Owned(pd, a.pd_destroy);
      kn->weights = like->weights;  // same kernel family and W layout: share the packed weights
    } else {
      a.pd_destroy(pd);
    }
  }
  if (kn->pd.get() == nullptr) {
    const int64_t dims[2] = {k_, n_};
    Handle any_h = nullptr;
    check(a.md_create_with_tag(&any_h, 2, dims, kBf16, kFormatAny), "memory descriptor");
    const Owned any(any_h, a.md_destroy);
    pd = nullptr;
    check(a.matmul_pd_create(&pd, engine, kn->src_md.get(), any.get(), kn->bias_md.get(), kn->dst_md.get(),
                             attr.get()),
          "bf16 matmul");
    kn->pd = Owned(pd, a.pd_destroy);
  }
  kn->impl = query_impl(kn->pd.get());
  kn->weights_md = a.pd_query_md(kn->pd.get(), kQueryWeightsMd, 0);
  kn->scratch_md = a.pd_query_md(kn->pd.get(), kQueryScratchpadMd, 0);
  if (kn->weights_md == nullptr) throw std::runtime_error("oneDNN matmul reported no weights layout");
  kn->scratch_bytes = kn->scratch_md != nullptr ? a.md_get_size(kn->scratch_md) : 0;
  Handle prim = nullptr;
  check(a.primitive_create(&prim, kn->pd.get()), "bf16 matmul primitive");
  kn->primitive = Owned(prim, a.primitive_destroy);

  if (kn->weights == nullptr) {  // reorder W (k x n, element (i, j) at W[j][i]) to the primitive's layout
    kn->own_weights.assign(a.md_get_size(kn->weights_md), 0);
    const Owned user_md = strided_md(k_, n_, kBf16, 1, k_);
    Handle rpd_h = nullptr;
    check(a.reorder_pd_create(&rpd_h, user_md.get(), engine, kn->weights_md, engine, nullptr), "weights reorder");
    const Owned rpd(rpd_h, a.pd_destroy);
    Handle rprim_h = nullptr;
    check(a.primitive_create(&rprim_h, rpd.get()), "weights reorder primitive");
    const Owned rprim(rprim_h, a.primitive_destroy);
    const Owned from = memory(user_md.get(), weight_bf16_.data());
    const Owned to = memory(kn->weights_md, kn->own_weights.data());
    const ExecArg args[2] = {{kArgSrc, from.get()}, {kArgDst, to.get()}};
    check(a.primitive_execute(rprim.get(), thread_stream(), 2, args), "weights reorder");
    check(a.stream_wait(thread_stream()), "weights reorder");
    kn->weights = kn->own_weights.data();
  }
  return kn;
}

const OnednnGemm::Kernel& OnednnGemm::kernel(int64_t rows) const {
  const std::lock_guard<std::mutex> lock(mutex_);
  auto it = kernels_.find(rows);
  if (it != kernels_.end()) return *it->second;
  auto kn = make_kernel(rows, kernels_.at(main_rows_).get());
  return *kernels_.emplace(rows, std::move(kn)).first->second;
}

namespace {

// This thread's memory objects for a kernel, made on first use; a cache that has grown past its bound (kernels of
// destroyed operators leave entries behind) starts again.
KernelMemories& thread_memories(uint64_t id, const std::function<KernelMemories()>& make) {
  thread_local std::unordered_map<uint64_t, KernelMemories> cache;
  auto it = cache.find(id);
  if (it != cache.end()) return it->second;
  if (cache.size() >= 256) cache.clear();
  return cache.emplace(id, make()).first->second;
}

}  // namespace

void OnednnGemm::run(const uint16_t* a, int64_t m, void* y) const {
  const Kernel& kn = kernel(padded_rows(m));
  const Api& api = library().api;
  const Handle stream = thread_stream();
  uint8_t* scratch = kn.scratch_bytes > 0 ? thread_scratch(kn.scratch_bytes) : nullptr;
  KernelMemories& mem = thread_memories(kn.id, [&] {
    KernelMemories made;
    made.src = memory(kn.src_md.get(), a);
    made.weights = memory(kn.weights_md, kn.weights);
    made.bias = memory(kn.bias_md.get(), bias_.data());
    made.dst = memory(kn.dst_md.get(), y);
    if (scratch != nullptr) made.scratch = memory(kn.scratch_md, scratch);
    return made;
  });
  check(api.memory_set_data_handle(mem.src.get(), const_cast<uint16_t*>(a)), "bf16 matmul input");
  check(api.memory_set_data_handle(mem.dst.get(), y), "bf16 matmul output");
  int nargs = 4;
  ExecArg args[5] = {{kArgSrc, mem.src.get()}, {kArgWeights, mem.weights.get()}, {kArgBias, mem.bias.get()},
                     {kArgDst, mem.dst.get()}};
  if (scratch != nullptr) {
    check(api.memory_set_data_handle(mem.scratch.get(), scratch), "bf16 matmul scratchpad");  // may have moved
    args[nargs++] = {kArgScratchpad, mem.scratch.get()};
  }
  check(api.primitive_execute(kn.primitive.get(), stream, nargs, args), "bf16 matmul");
  check(api.stream_wait(stream), "bf16 matmul");
}

}  // namespace bc_fast
