// The only file of bc_fast._cuda that knows Python: converts arguments and translates errors.
// Importing the module makes no CUDA call (device_info() and every class do, when called).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "cuda_op.h"
#include "layer_gemm_sm90.h"

namespace py = pybind11;
namespace bcc = bc_fast::cuda;

namespace {

const char* const kScheduleNames[] = {"cooperative", "pingpong"};
const char* const kStoreNames[] = {"direct", "staged"};

// The index of `name` among `names`, or std::invalid_argument naming the choices.
template <size_t N>
int choice(const std::string& name, const char* const (&names)[N], const char* what) {
  std::string all;
  for (size_t i = 0; i < N; ++i) {
    if (name == names[i]) return static_cast<int>(i);
    all += (i ? ", '" : "'") + std::string(names[i]) + "'";
  }
  throw std::invalid_argument(std::string(what) + " must be one of " + all + ", got '" + name + "'");
}

using FloatArray = py::array_t<float, py::array::c_style | py::array::forcecast>;

bcc::FusedOpCuda* make_op(const std::vector<FloatArray>& weights, const std::vector<std::optional<FloatArray>>& biases,
                          const std::vector<std::string>& activations, const std::vector<int64_t>& activation_widths,
                          bool normalize) {
  const size_t n = weights.size();
  if (biases.size() != n || activations.size() != n || activation_widths.size() != n)
    throw std::invalid_argument("weights, biases, activations and activation_widths must have the same length, got " +
                                std::to_string(n) + ", " + std::to_string(biases.size()) + ", " +
                                std::to_string(activations.size()) + " and " +
                                std::to_string(activation_widths.size()));
  std::vector<bcc::LayerSpec> specs(n);
  for (size_t i = 0; i < n; ++i) {
    const FloatArray& w = weights[i];
    const std::string where = "layer " + std::to_string(i);
    if (w.ndim() != 2)
      throw std::invalid_argument(where + ": weight must be 2-D (d_out, d_in), got " + std::to_string(w.ndim()) +
                                  "-D");
    bcc::LayerSpec& s = specs[i];
    s.d_out = w.shape(0);
    s.d_in = w.shape(1);
    s.weight.assign(w.data(), w.data() + w.size());
    if (biases[i]) {
      const FloatArray& b = *biases[i];
      if (b.ndim() != 1 || b.shape(0) != s.d_out)
        throw std::invalid_argument(where + ": bias must have shape (" + std::to_string(s.d_out) + ",)");
      s.bias.assign(b.data(), b.data() + b.size());
    }
    s.act = bcc::parse_act(activations[i], where);
    s.act_width = activation_widths[i];
  }
  return new bcc::FusedOpCuda(std::move(specs), normalize);
}

void apply(const bcc::FusedOpCuda& op, uintptr_t x_ptr, const std::string& x_dtype, int64_t n, uintptr_t out_ptr,
           const std::string& out_dtype, int device, uintptr_t stream, bool trusted) {
  const bcc::DType xt = bcc::parse_dtype(x_dtype, "x_dtype");
  const bcc::DType ot = bcc::parse_dtype(out_dtype, "out_dtype");
  py::gil_scoped_release release;
  op.apply(x_ptr, xt, n, out_ptr, ot, device, stream, trusted);
}

py::dict device_info_dict() {
  bcc::DeviceInfo info;
  {
    py::gil_scoped_release release;
    info = bcc::device_info();
  }
  py::dict d;
  d["available"] = info.available;
  d["error"] = info.error;
  d["device_count"] = info.device_count;
  d["driver_version"] = info.driver_version;
  d["runtime_version"] = info.runtime_version;
  d["cublas_version"] = info.cublas_version;
  d["fused_sm90_kernels"] = info.fused_sm90_kernels;
  py::list devices;
  for (const auto& p : info.devices) {
    py::dict e;
    e["index"] = p.index;
    e["name"] = p.name;
    e["compute_capability"] = p.compute_capability;
    e["total_memory"] = p.total_memory;
    devices.append(e);
  }
  d["devices"] = devices;
  return d;
}

}  // namespace

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "bc_fast CUDA module: fused embedding transforms on NVIDIA GPUs (cuBLASLt + fused epilogues).";

  // Out of GPU memory is a MemoryError; any other CUDA/cuBLASLt failure a RuntimeError naming the call.
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const bcc::CudaOutOfMemory& e) {
      PyErr_SetString(PyExc_MemoryError, e.what());
    } catch (const bcc::CudaError& e) {
      PyErr_SetString(PyExc_RuntimeError, e.what());
    }
  });

  m.def("device_info", &device_info_dict,
        "CUDA runtime/driver versions and visible devices; never raises for a missing GPU or driver "
        "(available=False, error says why).");

  m.def(
      "sm90_kernel_variant",
      [] {
        const bcc::Sm90Variant v = bcc::sm90_variant();
        return py::make_tuple(kScheduleNames[static_cast<int>(v.schedule)], kStoreNames[static_cast<int>(v.store)]);
      },
      "(schedule, store) of the fused sm_90a layer kernel that later launches use.");
  m.def(
      "set_sm90_kernel_variant",
      [](const std::string& schedule, const std::string& store) {
        bcc::Sm90Variant v;
        v.schedule = static_cast<bcc::Sm90Schedule>(choice(schedule, kScheduleNames, "schedule"));
        v.store = static_cast<bcc::Sm90Store>(choice(store, kStoreNames, "store"));
        bcc::set_sm90_variant(v);
      },
      py::arg("schedule"), py::arg("store"),
      "Picks the fused sm_90a layer kernel's variant for the whole process (for benchmarks and tests): "
      "schedule 'cooperative' (default) or 'pingpong', store 'direct' (default) or 'staged'. RuntimeError "
      "when the module was built without the fused kernels.");

  py::class_<bcc::FusedOpCuda>(m, "CudaFusedOp")
      .def(py::init(&make_op), py::arg("weights"), py::arg("biases"), py::arg("activations"),
           py::arg("activation_widths"), py::arg("normalize") = false,
           "Layer program from float32 (d_out, d_in) weights, optional biases, activations ('none', 'relu', "
           "'gelu' exact), the leading outputs each activation applies to, and final L2 normalisation. "
           "Validates on the host; makes no CUDA call.")
      .def_property_readonly("d_in", &bcc::FusedOpCuda::d_in)
      .def_property_readonly("d_out", &bcc::FusedOpCuda::d_out)
      .def_property_readonly("num_layers", &bcc::FusedOpCuda::num_layers)
      .def(
          "layer_paths",
          [](const bcc::FusedOpCuda& op, const std::string& x_dtype, const std::string& out_dtype, bool sm90) {
            return op.layer_paths(bcc::parse_dtype(x_dtype, "x_dtype"), bcc::parse_dtype(out_dtype, "out_dtype"), sm90);
          },
          py::arg("x_dtype"), py::arg("out_dtype"), py::arg("sm90"),
          "How each layer runs for 16-byte aligned arrays of these dtypes, on a device that does (sm90=True: "
          "compute capability 9.0 and a build with the fused kernels) or does not run the fused sm_90a kernels: "
          "'sm90_fused' (one kernel: GEMM, bias, activation, L2, cast), 'cublaslt', 'cublaslt+normalize' or "
          "'cublaslt+epilogue'. Host-only.")
      .def("apply", &apply, py::arg("x_ptr"), py::arg("x_dtype"), py::arg("n"), py::arg("out_ptr"),
           py::arg("out_dtype"), py::arg("device"), py::arg("stream"), py::arg("trusted") = false,
           "out[n, d_out] = program(x[n, d_in]) for C-contiguous device arrays on `device` (dtypes 'float32', "
           "'float16', 'bfloat16'), enqueued asynchronously on `stream` (cudaStream_t as int, 0 = legacy "
           "default stream). fp32 accumulation always; fp32 inputs use fp32 GEMMs (no TF32), fp16/bf16 inputs "
           "tensor cores with intermediates stored in the input dtype. trusted=True skips the per-call check "
           "that both pointers are device memory on `device`, for callers that know it. GIL released.");

  py::class_<bcc::PinnedBuffer>(m, "PinnedBuffer", py::buffer_protocol())
      .def(py::init<int64_t>(), py::arg("nbytes"), py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("ptr", [](const bcc::PinnedBuffer& b) { return reinterpret_cast<uintptr_t>(b.data()); })
      .def_property_readonly("nbytes", &bcc::PinnedBuffer::nbytes)
      .def_buffer([](bcc::PinnedBuffer& b) {
        return py::buffer_info(b.data(), 1, py::format_descriptor<uint8_t>::format(), 1,
                               {static_cast<py::ssize_t>(b.nbytes())}, {static_cast<py::ssize_t>(1)});
      });

  py::class_<bcc::DeviceBuffer>(m, "DeviceBuffer")
      .def(py::init<int64_t, int>(), py::arg("nbytes"), py::arg("device"), py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("ptr", &bcc::DeviceBuffer::ptr)
      .def_property_readonly("nbytes", &bcc::DeviceBuffer::nbytes)
      .def_property_readonly("device", &bcc::DeviceBuffer::device);

  py::class_<bcc::Stream>(m, "Stream")
      .def(py::init<int>(), py::arg("device"), py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("ptr", &bcc::Stream::ptr)
      .def_property_readonly("device", &bcc::Stream::device)
      .def("synchronize", &bcc::Stream::synchronize, py::call_guard<py::gil_scoped_release>());

  py::class_<bcc::Event>(m, "Event")
      .def(py::init<int>(), py::arg("device"), py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("device", &bcc::Event::device)
      .def("record", &bcc::Event::record, py::arg("stream_ptr"), py::call_guard<py::gil_scoped_release>())
      .def("synchronize", &bcc::Event::synchronize, py::call_guard<py::gil_scoped_release>())
      .def("query", &bcc::Event::query, py::call_guard<py::gil_scoped_release>());

  m.def("memcpy_async", &bcc::memcpy_async, py::arg("dst_ptr"), py::arg("src_ptr"), py::arg("nbytes"),
        py::arg("kind"), py::arg("stream_ptr"), py::call_guard<py::gil_scoped_release>(),
        "cudaMemcpyAsync; kind 'h2d' | 'd2h' | 'd2d'.");
  m.def("stream_wait_event", &bcc::stream_wait_event, py::arg("stream_ptr"), py::arg("event"),
        py::call_guard<py::gil_scoped_release>(), "cudaStreamWaitEvent(stream, event).");
  m.def("pointer_device", &bcc::pointer_device, py::arg("ptr"), py::call_guard<py::gil_scoped_release>(),
        "The CUDA device holding the device/managed memory at ptr (cudaPointerGetAttributes).");
}
