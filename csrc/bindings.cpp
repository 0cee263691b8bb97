// The only file that knows Python: converts numpy arrays to pointers and sizes for FusedOp.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "fused_op.h"
#include "kernels/dispatch.h"
#include "routed_op.h"
#include "small_pool.h"

namespace py = pybind11;
using bc_fast::DType;
using bc_fast::FusedOp;
using bc_fast::LayerSpec;
using bc_fast::RoutedOp;
using bc_fast::RoutedSpec;

namespace {

using FloatArray = py::array_t<float, py::array::c_style | py::array::forcecast>;

DType batch_dtype(const py::array& a, const char* name) {
  const py::dtype dt = a.dtype();
  const char order = dt.byteorder();
  const uint16_t probe = 1;
  const bool little = *reinterpret_cast<const unsigned char*>(&probe) == 1;
  const bool native = order == '=' || order == '|' || order == (little ? '<' : '>');
  if (native && dt.kind() == 'f' && dt.itemsize() == 4) return DType::kFloat32;
  if (native && dt.kind() == 'f' && dt.itemsize() == 2) return DType::kFloat16;
  // ml_dtypes.bfloat16 (what torch bf16 tensors are viewed as): a 2-byte numpy type named "bfloat16".
  if (native && dt.itemsize() == 2 && py::str(dt.attr("name")).cast<std::string>() == "bfloat16")
    return DType::kBFloat16;
  throw py::type_error(std::string(name) + " must be native-endian float32, float16 or bfloat16");
}

void check_batch(const py::array& a, const char* name, int64_t dim) {
  if (a.ndim() != 2) throw std::invalid_argument(std::string(name) + " must be 2-D");
  if (a.shape(1) != dim)
    throw std::invalid_argument(std::string(name) + " has " + std::to_string(a.shape(1)) + " columns, expected " +
                                std::to_string(dim));
  if (!(a.flags() & py::array::c_style)) throw std::invalid_argument(std::string(name) + " must be C-contiguous");
  if (!(a.flags() & py::detail::npy_api::NPY_ARRAY_ALIGNED_))
    throw std::invalid_argument(std::string(name) + " is not aligned to its item size");
}

FusedOp make_op(const std::vector<FloatArray>& weights, const std::vector<std::optional<FloatArray>>& biases,
                const std::vector<std::string>& activations, const std::vector<int64_t>& activation_widths,
                bool normalize, const std::string& precision, const std::string& bf16_backend,
                int64_t onednn_min_rows) {
  const size_t n = weights.size();
  if (biases.size() != n || activations.size() != n || activation_widths.size() != n)
    throw std::invalid_argument("weights, biases, activations and activation_widths must have the same length");
  std::vector<LayerSpec> specs(n);
  for (size_t i = 0; i < n; ++i) {
    const FloatArray& w = weights[i];
    if (w.ndim() != 2) throw std::invalid_argument("weight " + std::to_string(i) + " must be 2-D (d_out, d_in)");
    LayerSpec& s = specs[i];
    s.d_out = w.shape(0);
    s.d_in = w.shape(1);
    s.weight.assign(w.data(), w.data() + w.size());
    if (biases[i]) {
      const FloatArray& b = *biases[i];
      if (b.ndim() != 1 || b.shape(0) != s.d_out)
        throw std::invalid_argument("bias " + std::to_string(i) + " must have shape (d_out,)");
      s.bias.assign(b.data(), b.data() + b.size());
    }
    s.activation = bc_fast::parse_activation(activations[i]);
    s.activation_width = activation_widths[i];
  }
  return FusedOp(std::move(specs), normalize, bc_fast::parse_precision(precision),
                 bc_fast::parse_bf16_backend(bf16_backend), onednn_min_rows);
}

std::vector<float> values(const FloatArray& a, std::initializer_list<int64_t> shape, const char* name) {
  bool ok = a.ndim() == static_cast<py::ssize_t>(shape.size());
  size_t i = 0;
  for (int64_t d : shape) ok = ok && a.shape(i++) == d;
  if (!ok) throw std::invalid_argument(std::string("routed op: ") + name + " has the wrong shape");
  return std::vector<float>(a.data(), a.data() + a.size());
}

RoutedOp make_routed(const FloatArray& score_weight, const FloatArray& score_bias, const FloatArray& weight,
                     const FloatArray& bias, int64_t m, float temperature, bool normalize) {
  if (score_weight.ndim() != 2 || weight.ndim() != 3)
    throw std::invalid_argument("routed op: score_weight must be (k, d_in) and weight (k, d_out, d_in)");
  RoutedSpec s;
  s.k = score_weight.shape(0);
  s.d_in = score_weight.shape(1);
  s.d_out = weight.shape(1);
  s.m = m;
  s.temperature = temperature;
  s.score_weight = values(score_weight, {s.k, s.d_in}, "score_weight");
  s.score_bias = values(score_bias, {s.k}, "score_bias");
  s.weight = values(weight, {s.k, s.d_out, s.d_in}, "weight");
  s.bias = values(bias, {s.k, s.d_out}, "bias");
  return RoutedOp(std::move(s), normalize);
}

template <class Op>
py::object apply(const Op& op, const py::array& x, py::object out, bool out_float16, int64_t threads) {
  check_batch(x, "x", op.d_in());
  const DType xt = batch_dtype(x, "x");
  const int64_t n = x.shape(0);
  py::array out_arr;
  if (out.is_none()) {
    if (out_float16)
      out_arr = py::array(py::dtype("float16"), {n, op.d_out()});
    else
      out_arr = py::array_t<float>({n, op.d_out()});
  } else {
    if (!py::isinstance<py::array>(out)) throw py::type_error("out must be a numpy array");
    out_arr = py::reinterpret_borrow<py::array>(out);
    check_batch(out_arr, "out", op.d_out());
    if (out_arr.shape(0) != n) throw std::invalid_argument("out and x must have the same number of rows");
    if (!out_arr.writeable()) throw std::invalid_argument("out is read-only");
  }
  const DType ot = batch_dtype(out_arr, "out");
  const void* xp = x.data();
  void* op_out = out_arr.mutable_data();
  // Not py::gil_scoped_release: a daemon thread that takes the GIL back while the interpreter
  // finalises is ended by pthread_exit, whose unwinding must not pass a (noexcept) destructor, or
  // the process dies in std::terminate at exit.
  PyThreadState* state = PyEval_SaveThread();
  try {
    op.apply(xp, xt, n, op_out, ot, threads);
  } catch (...) {
    PyEval_RestoreThread(state);
    throw;
  }
  PyEval_RestoreThread(state);
  return std::move(out_arr);
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "bc_fast compiled core: fused embedding transforms applied to batches.";

  py::class_<FusedOp>(m, "FusedOp")
      .def(py::init(&make_op), py::arg("weights"), py::arg("biases"), py::arg("activations"),
           py::arg("activation_widths"), py::arg("normalize") = false, py::arg("precision") = "fp32",
           py::arg("bf16_backend") = "native", py::arg("onednn_min_rows") = FusedOp::kSmallBatchRows + 1,
           "Build a layer program from float32 (d_out, d_in) weights, optional biases, activations "
           "('none', 'relu', 'gelu'), the number of leading outputs each activation applies to, whether "
           "to L2-normalise the output rows, and the GEMM precision ('fp32', or 'bf16': bf16 operands with "
           "fp32 accumulation; RuntimeError naming the missing CPU feature where it cannot run). bf16_backend "
           "'onednn' runs the bf16 GEMMs with oneDNN (onednn_load first) for batches of at least onednn_min_rows rows "
           "(smaller ones on the native bf16 kernels where the CPU has them; tests lower it to reach oneDNN).")
      .def_property_readonly("bf16_backend", [](const FusedOp& op) {
        return op.bf16_backend() == bc_fast::Bf16Backend::kOnednn ? "onednn" : "native";
      })
      .def_property_readonly("bf16_impl", &FusedOp::bf16_impl)
      .def_property_readonly("precision", [](const FusedOp& op) {
        return op.precision() == bc_fast::Precision::kBFloat16 ? "bf16" : "fp32";
      })
      .def_property_readonly("d_in", &FusedOp::d_in)
      .def_property_readonly("d_out", &FusedOp::d_out)
      .def_property_readonly("num_layers", &FusedOp::num_layers)
      .def("apply", &apply<FusedOp>, py::arg("x"), py::arg("out") = py::none(), py::arg("out_float16") = false,
           py::arg("threads") = 0,
           "out[n, d_out] = program(x[n, d_in]) for C-contiguous float32/float16 arrays, GIL released; "
           "allocates out (float32, or float16 if out_float16) when None and returns it. "
           "threads <= 0 uses get_num_threads(); a forked child always runs on one thread.");

  py::class_<RoutedOp>(m, "RoutedOp")
      .def(py::init(&make_routed), py::arg("score_weight"), py::arg("score_bias"), py::arg("weight"),
           py::arg("bias"), py::arg("m"), py::arg("temperature"), py::arg("normalize") = false,
           "A mixture of k affine maps: each row goes to the m clusters with the largest scores "
           "x . score_weight[c] + score_bias[c] (ties to the lower index), blended by softmax(score / "
           "temperature): y = sum_j w_j (weight[c_j] x + bias[c_j]), then optionally L2-normalised.")
      .def_property_readonly("d_in", &RoutedOp::d_in)
      .def_property_readonly("d_out", &RoutedOp::d_out)
      .def_property_readonly("k", &RoutedOp::k)
      .def_property_readonly("m", &RoutedOp::m)
      .def("apply", &apply<RoutedOp>, py::arg("x"), py::arg("out") = py::none(), py::arg("out_float16") = false,
           py::arg("threads") = 0,
           "out[n, d_out] = the routed map of x[n, d_in], as FusedOp.apply (GIL released, bit-identical for "
           "every thread count).")
      .def("route", [](const RoutedOp& op, const py::array& x) {
        check_batch(x, "x", op.d_in());
        const DType xt = batch_dtype(x, "x");
        const int64_t n = x.shape(0);
        py::array_t<int64_t> clusters({n, op.m()});
        py::array_t<float> weights({n, op.m()});
        const void* xp = x.data();
        int64_t* cp = clusters.mutable_data();
        float* wp = weights.mutable_data();
        {
          py::gil_scoped_release release;
          op.route(xp, xt, n, cp, wp);
        }
        return py::make_tuple(clusters, weights);
      }, py::arg("x"), "The clusters (n, m; best first) and blend weights (n, m) of each row.");

  m.def("build_info", [] {
    const bc_fast::BuildInfo info = bc_fast::build_info();
    py::dict d;
    d["kernel"] = info.kernel;
    d["cpu"] = info.cpu;
    d["cpu_vendor"] = bc_fast::cpu_vendor();
    d["blas"] = info.blas;
    d["openmp"] = info.openmp;
    d["max_threads"] = info.max_threads;
    d["cpus"] = info.cpus;
    d["blas_threads"] = info.blas_threads;
    d["forked_child"] = info.forked_child;
    d["small_batch_rows"] = FusedOp::kSmallBatchRows;
    d["small_split"] = bc_fast::small_split_enabled();
    d["compiler"] = info.compiler;
    const std::string why = bc_fast::bf16_unavailable_reason();
    d["bf16"] = why.empty();
    d["bf16_unavailable"] = why;
    return d;
  }, "How the core was built and which kernel it picked.");
  m.def("get_num_threads", &bc_fast::num_threads,
        "The core's default thread count: set_num_threads() if called, else BC_FAST_NUM_THREADS, else the "
        "CPUs this process may run on. Independent of OpenMP's and torch's settings.");
  m.def("set_num_threads", &bc_fast::set_num_threads, py::arg("n"),
        "Set the core's default thread count for this process (1..1024).");
  m.def("_threads_in_use", &bc_fast::threads_in_use,
        "Private, for tests: threads held now by running parallel applies (0 when none runs).");
  m.def("_set_small_split", &bc_fast::set_small_split_mode, py::arg("mode"),
        "Private, for tests and benchmarks: 0 turns the small-batch column split off, 1 on (the default "
        "unless BC_FAST_SMALL_SPLIT=0), 2 on with every chunk left to the helper thread.");
  m.def("_small_split_helper_jobs", &bc_fast::small_split_helper_jobs,
        "Private, for tests: jobs the small-batch split's helper thread has run chunks of.");
  m.def("_mark_forked_child", &bc_fast::mark_forked_child,
        "Run single-threaded from now on: this process was forked before the core was loaded.");
  m.def("set_simd_level", &bc_fast::set_simd_level, py::arg("level"),
        "Select the kernel set: 'generic', 'avx2' or 'avx512' (testing and benchmarking); ValueError lists "
        "the usable levels.");
  m.def("bf16_unavailable_reason", &bc_fast::bf16_unavailable_reason,
        "Why precision='bf16' cannot run now (missing AVX512_BF16, SIMD level forced below avx512, or "
        "a build without the kernels), or '' where it can.");
  m.def("onednn_load", &bc_fast::onednn_load, py::arg("path"),
        "Load oneDNN 3.x (libdnnl.so.3, OpenMP or sequential runtime) from path, once per process: '' on "
        "success, else why not. Later calls return the first call's answer.");
  m.def("onednn_version", &bc_fast::onednn_version, "'oneDNN x.y.z (path)' once loaded, else ''.");
  m.def("usable_simd_levels", &bc_fast::usable_simd_levels,
        "The kernel sets this build can run on this CPU, lowest first.");
}
