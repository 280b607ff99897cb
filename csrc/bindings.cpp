// The only file that sees Python. CPU entry points take numpy arrays (the
// Python layer turns torch CPU tensors into numpy views with np.from_dlpack),
// check dtype/ndim/contiguity here again -- never converting -- and release the
// GIL around the kernel. CUDA entry points take raw device pointers (from
// __cuda_array_interface__ / data_ptr()), sizes and the caller's stream as
// integers and check them likewise; the Python layer allocates outputs and
// workspaces with the caller's framework.
#include <pybind11/pybind11.h>
#include <pybind11/numpy.h>

#include <string>

#include "common.h"
#include "cpu/simd.h"
#include "kcenter.h"
#include "knn.h"
#include "lof.h"
#include "pairwise.h"
#include "runtime.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace py = pybind11;
using sp::index_t;

namespace {

// Checks one array argument and returns its data pointer. `ndim` < 0: any.
template <class T>
T* checked_ptr(const py::array& arr, const char* op, const char* name, int ndim,
               bool writable) {
  std::string where = std::string(op) + ": argument '" + name + "'";
  if (!arr.dtype().is(py::dtype::of<T>()))
    throw py::type_error(where + " must have dtype " +
                         std::string(py::str(py::dtype::of<T>())) + ", got " +
                         std::string(py::str(arr.dtype())));
  if (ndim >= 0 && arr.ndim() != ndim)
    throw py::value_error(where + " must be " + std::to_string(ndim) +
                          "-dimensional, got " + std::to_string(arr.ndim()) + " dimensions");
  if (!(arr.flags() & py::array::c_style))
    throw py::value_error(where + " must be C-contiguous");
  if (writable && !arr.writeable())
    throw py::value_error(where + " must be writable");
  return static_cast<T*>(const_cast<void*>(arr.data()));
}

template <class T>
T* optional_ptr(const py::object& obj, const char* op, const char* name, int ndim,
                bool writable) {
  if (obj.is_none()) return nullptr;
  return checked_ptr<T>(py::cast<py::array>(obj), op, name, ndim, writable);
}

void expect(bool ok, const char* op, const std::string& what) {
  if (!ok) throw py::value_error(std::string(op) + ": " + what);
}

// ---------------------------------------------------------------- CPU ops
void pairwise_sqdist_cpu(const py::array& a, const py::array& b, const py::array& out) {
  const char* op = "pairwise_sqdist";
  const float* pa = checked_ptr<float>(a, op, "a", 3, false);
  const float* pb = checked_ptr<float>(b, op, "b", 3, false);
  float* po = checked_ptr<float>(out, op, "out", 3, true);
  index_t B = a.shape(0), n = a.shape(1), d = a.shape(2), m = b.shape(1);
  expect(b.shape(0) == B && b.shape(2) == d, op, "a and b must agree in batch and feature dimensions");
  expect(out.shape(0) == B && out.shape(1) == n && out.shape(2) == m, op, "out must have shape [B, n, m]");
  py::gil_scoped_release nogil;
  sp::pairwise_sqdist_cpu(pa, pb, po, B, n, m, d);
}

void knn_cpu(const py::array& queries, const py::array& bank, index_t k,
             const py::object& weights, const py::array& out_dist,
             const py::array& out_idx, const py::object& out_score,
             index_t tile_q, index_t tile_m) {
  const char* op = "knn";
  const float* pq = checked_ptr<float>(queries, op, "queries", 2, false);
  const float* pb = checked_ptr<float>(bank, op, "bank", 2, false);
  const float* pw = optional_ptr<float>(weights, op, "weights", 1, false);
  float* pd = checked_ptr<float>(out_dist, op, "out_dist", 2, true);
  index_t* pi = checked_ptr<index_t>(out_idx, op, "out_idx", 2, true);
  float* ps = optional_ptr<float>(out_score, op, "out_score", 1, true);
  index_t q = queries.shape(0), d = queries.shape(1), m = bank.shape(0);
  expect(bank.shape(1) == d, op, "queries and bank must have the same feature dimension");
  expect(k >= 1 && k <= m, op, "k must be in [1, m]");
  expect(out_dist.shape(0) == q && out_dist.shape(1) == k, op, "out_dist must have shape [q, k]");
  expect(out_idx.shape(0) == q && out_idx.shape(1) == k, op, "out_idx must have shape [q, k]");
  expect(!pw || py::cast<py::array>(weights).shape(0) == m, op, "weights must have shape [m]");
  expect(!ps || py::cast<py::array>(out_score).shape(0) == q, op, "out_score must have shape [q]");
  expect(!ps || pw, op, "out_score needs weights");
  py::gil_scoped_release nogil;
  sp::knn_cpu(pq, q, pb, m, d, k, pw, pd, pi, ps, tile_q, tile_m);
}

void lof_cpu(const py::array& x, index_t k, const py::array& out) {
  const char* op = "lof";
  const float* px = checked_ptr<float>(x, op, "x", 3, false);
  float* po = checked_ptr<float>(out, op, "out", 2, true);
  index_t B = x.shape(0), n = x.shape(1), d = x.shape(2);
  expect(out.shape(0) == B && out.shape(1) == n, op, "out must have shape [B, n]");
  expect(n >= 2 && k >= 1 && k <= n - 1, op, "need n >= 2 and 1 <= k <= n - 1");
  py::gil_scoped_release nogil;
  sp::lof_cpu(px, B, n, d, k, po);
}

// The k-center entry points return how many indices they wrote (kcenter.h).
index_t kcenter_greedy_cpu(const py::array& x, index_t m, index_t start,
                           const py::object& sample_weight, const py::array& out_idx) {
  const char* op = "kcenter_greedy";
  const float* px = checked_ptr<float>(x, op, "x", 2, false);
  const float* pw = optional_ptr<float>(sample_weight, op, "sample_weight", 1, false);
  index_t* po = checked_ptr<index_t>(out_idx, op, "out_idx", 1, true);
  index_t n = x.shape(0), d = x.shape(1);
  expect(out_idx.shape(0) == m && m >= 1 && m <= n, op, "out_idx must have shape [m], 1 <= m <= n");
  expect(start >= 0 && start < n, op, "start must be in [0, n)");
  expect(!pw || py::cast<py::array>(sample_weight).shape(0) == n, op, "sample_weight must have shape [n]");
  py::gil_scoped_release nogil;
  return sp::kcenter_greedy_cpu(px, n, d, m, start, pw, po);
}

index_t kcenter_greedy_approx_cpu(const py::array& x, index_t m, const py::array& anchors,
                                  const py::object& sample_weight, const py::array& out_idx) {
  const char* op = "kcenter_greedy_approx";
  const float* px = checked_ptr<float>(x, op, "x", 2, false);
  const index_t* pa = checked_ptr<index_t>(anchors, op, "anchors", 1, false);
  const float* pw = optional_ptr<float>(sample_weight, op, "sample_weight", 1, false);
  index_t* po = checked_ptr<index_t>(out_idx, op, "out_idx", 1, true);
  index_t n = x.shape(0), d = x.shape(1), na = anchors.shape(0);
  expect(out_idx.shape(0) == m && m >= 1 && m <= n, op, "out_idx must have shape [m], 1 <= m <= n");
  expect(na >= 1, op, "anchors must not be empty");
  for (index_t i = 0; i < na; ++i) expect(pa[i] >= 0 && pa[i] < n, op, "anchors must be in [0, n)");
  expect(!pw || py::cast<py::array>(sample_weight).shape(0) == n, op, "sample_weight must have shape [n]");
  py::gil_scoped_release nogil;
  return sp::kcenter_greedy_approx_cpu(px, n, d, m, pa, na, pw, po);
}

// ---------------------------------------------------------------- CUDA ops
#ifdef SOFTPATCH_WITH_CUDA
// The Python layer passes device pointers and sizes as integers. Checked here,
// as the CPU entry points check their arrays, before any CUDA call: sizes,
// null and misaligned pointers, the dtype code, the workspace size. (Output
// buffers are allocated by the Python layer from these same sizes.)
template <class T>
T* device_ptr(uintptr_t p, const char* op, const char* name, size_t align = alignof(T)) {
  const std::string where = std::string(op) + ": argument '" + name + "'";
  if (p == 0) throw py::value_error(where + " is a null device pointer");
  if (p % align)
    throw py::value_error(where + " must be aligned to " + std::to_string(align) + " bytes");
  return reinterpret_cast<T*>(p);
}

template <class T>
T* optional_device_ptr(uintptr_t p, const char* op, const char* name) {
  return p ? device_ptr<T>(p, op, name) : nullptr;
}

sp::DType dtype_code(int code, const char* op) {
  expect(code == int(sp::DType::F32) || code == int(sp::DType::F16), op,
         "unknown dtype code " + std::to_string(code) + " (0: float32, 1: float16)");
  return sp::DType(code);
}

// Element alignment of a feature array of `dtype`.
size_t feature_align(sp::DType dtype) { return dtype == sp::DType::F16 ? 2 : 4; }

void expect_workspace(index_t have, index_t need, const char* op) {
  expect(have >= need, op, "workspace has " + std::to_string(have) + " floats, needs " +
                               std::to_string(need));
}

void pairwise_sqdist_cuda(uintptr_t a, uintptr_t b, uintptr_t out, index_t B, index_t n,
                          index_t m, index_t d, int dtype, bool tf32, uintptr_t stream) {
  const char* op = "pairwise_sqdist";
  const sp::DType dt = dtype_code(dtype, op);
  expect(B >= 1 && n >= 1 && m >= 1 && d >= 1, op, "need B, n, m, d >= 1");
  const void* pa = device_ptr<const void>(a, op, "a", feature_align(dt));
  const void* pb = device_ptr<const void>(b, op, "b", feature_align(dt));
  float* po = device_ptr<float>(out, op, "out");
  py::gil_scoped_release nogil;
  sp::pairwise_sqdist_cuda(pa, pb, po, B, n, m, d, dt, tf32, stream);
}

void knn_cuda(uintptr_t queries, index_t q, uintptr_t bank, index_t m, index_t d, index_t k,
              uintptr_t weights, uintptr_t out_dist, uintptr_t out_idx, uintptr_t out_score,
              int dtype, bool tf32, uintptr_t workspace, index_t workspace_floats,
              uintptr_t stream) {
  const char* op = "knn";
  const sp::DType dt = dtype_code(dtype, op);
  expect(q >= 1 && m >= 1 && d >= 1, op, "need q, m, d >= 1");
  expect(k >= 1 && k <= m, op, "k must be in [1, m]");
  const void* pq = device_ptr<const void>(queries, op, "queries", feature_align(dt));
  const void* pb = device_ptr<const void>(bank, op, "bank", feature_align(dt));
  const float* pw = optional_device_ptr<const float>(weights, op, "weights");
  float* pd = device_ptr<float>(out_dist, op, "out_dist");
  index_t* pi = device_ptr<index_t>(out_idx, op, "out_idx");
  float* ps = optional_device_ptr<float>(out_score, op, "out_score");
  expect(!ps || pw, op, "out_score needs weights");
  float* pws = device_ptr<float>(workspace, op, "workspace");
  expect_workspace(workspace_floats, sp::knn_cuda_workspace_floats(q, m, k), op);
  py::gil_scoped_release nogil;
  sp::knn_cuda(pq, q, pb, m, d, k, pw, pd, pi, ps, dt, tf32, pws, stream);
}

void lof_cuda(uintptr_t x, index_t B, index_t n, index_t d, index_t k, uintptr_t out,
              uintptr_t workspace, index_t workspace_floats, uintptr_t stream) {
  const char* op = "lof";
  expect(B >= 1 && d >= 1, op, "need B >= 1 and d >= 1");
  expect(n >= 2 && k >= 1 && k <= n - 1, op, "need n >= 2 and 1 <= k <= n - 1");
  const float* px = device_ptr<const float>(x, op, "x");
  float* po = device_ptr<float>(out, op, "out");
  // The workspace starts with doubles.
  float* pws = device_ptr<float>(workspace, op, "workspace", alignof(double));
  expect_workspace(workspace_floats, sp::lof_cuda_workspace_floats(B, n, k), op);
  py::gil_scoped_release nogil;
  sp::lof_cuda(px, B, n, d, k, po, pws, stream);
}

void kcenter_greedy_cuda(uintptr_t x, index_t n, index_t d, index_t m, index_t start,
                         uintptr_t anchors, index_t n_anchors, uintptr_t sample_weight,
                         uintptr_t out_idx, int dtype, uintptr_t workspace,
                         index_t workspace_floats, uintptr_t stream) {
  const char* op = start >= 0 ? "kcenter_greedy" : "kcenter_greedy_approx";
  const sp::DType dt = dtype_code(dtype, op);
  expect(n >= 1 && d >= 1, op, "need n, d >= 1");
  expect(m >= 1 && m <= n, op, "need 1 <= m <= n");
  expect(start < n, op, "start must be in [0, n)");
  const void* px = device_ptr<const void>(x, op, "x", feature_align(dt));
  const index_t* pa = start >= 0 ? nullptr : device_ptr<const index_t>(anchors, op, "anchors");
  expect(start >= 0 || n_anchors >= 1, op, "anchors must not be empty");
  const float* pw = optional_device_ptr<const float>(sample_weight, op, "sample_weight");
  index_t* po = device_ptr<index_t>(out_idx, op, "out_idx");
  // The workspace holds int64 partials.
  float* pws = device_ptr<float>(workspace, op, "workspace", alignof(int64_t));
  expect_workspace(workspace_floats, sp::kcenter_cuda_workspace_floats(n), op);
  py::gil_scoped_release nogil;
  sp::kcenter_greedy_cuda(px, n, d, m, start, pa, n_anchors, pw, po, dt, pws, stream);
}
#endif  // SOFTPATCH_WITH_CUDA

py::dict build_info() {
  py::dict info;
  info["version"] = SOFTPATCH_VERSION;
  info["cuda_compiled"] = sp::cuda_compiled();
  info["cuda_version"] = std::string(SOFTPATCH_CUDA_VERSION_STR);
  info["cuda_architectures"] = std::string(SOFTPATCH_CUDA_ARCHS);
  info["cuda_option"] = std::string(SOFTPATCH_CUDA_OPTION);  // AUTO | ON | OFF at configure time
  info["compiler"] = std::string(SOFTPATCH_COMPILER);
  info["openmp"] = bool(SOFTPATCH_OPENMP);
#ifdef _OPENMP
  info["openmp_max_threads"] = omp_get_max_threads();
#else
  info["openmp_max_threads"] = 1;
#endif
  // CPU distance kernels: instruction sets usable here, best first (the
  // default; env SOFTPATCH_CPU_ISA picks another one at call time).
  py::list isas;
  for (auto isa : {sp::cpu::Isa::Avx512, sp::cpu::Isa::Avx2, sp::cpu::Isa::Scalar})
    if (sp::cpu::isa_supported(isa)) isas.append(sp::cpu::isa_name(isa));
  info["cpu_isas"] = isas;
  return info;
}

py::dict cuda_probe() {
  sp::CudaProbe p;
  {
    py::gil_scoped_release nogil;
    p = sp::cuda_probe();
  }
  py::dict d;
  d["device_count"] = p.device_count;
  d["runtime_version"] = p.runtime_version;
  d["driver_version"] = p.driver_version;
  d["reason"] = p.reason;
  return d;
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "softpatch_cuda compiled kernels (private; use softpatch_cuda.ops; typed in _core.pyi)";
  static py::exception<sp::CudaError> cuda_error(m, "CudaError", PyExc_RuntimeError);
  (void)cuda_error;
  using py::arg;

  m.def("build_info", &build_info);
  m.def("cuda_probe", &cuda_probe);
  m.def("cuda_device_name", &sp::cuda_device_name, arg("ordinal"));

  m.def("pairwise_sqdist_cpu", &pairwise_sqdist_cpu, arg("a"), arg("b"), arg("out"));
  m.def("knn_cpu", &knn_cpu, arg("queries"), arg("bank"), arg("k"), arg("weights"),
        arg("out_dist"), arg("out_idx"), arg("out_score"), arg("tile_q") = 0, arg("tile_m") = 0);
  m.def("lof_cpu", &lof_cpu, arg("x"), arg("k"), arg("out"));
  m.def("kcenter_greedy_cpu", &kcenter_greedy_cpu, arg("x"), arg("m"), arg("start"),
        arg("sample_weight"), arg("out_idx"));
  m.def("kcenter_greedy_approx_cpu", &kcenter_greedy_approx_cpu, arg("x"), arg("m"),
        arg("anchors"), arg("sample_weight"), arg("out_idx"));

#ifdef SOFTPATCH_WITH_CUDA
  // Raw-pointer CUDA entry points: (pointers..., sizes..., dtype, ..., stream);
  // every argument is checked (cuda_* above) before the kernel is queued.
  m.def("pairwise_sqdist_cuda", &pairwise_sqdist_cuda, arg("a"), arg("b"), arg("out"), arg("B"),
        arg("n"), arg("m"), arg("d"), arg("dtype"), arg("allow_tf32"), arg("stream"));
  m.def("knn_cuda_workspace_floats", &sp::knn_cuda_workspace_floats, arg("q"), arg("m"), arg("k"));
  m.def("knn_cuda", &knn_cuda, arg("queries"), arg("q"), arg("bank"), arg("m"), arg("d"), arg("k"),
        arg("weights"), arg("out_dist"), arg("out_idx"), arg("out_score"), arg("dtype"),
        arg("allow_tf32"), arg("workspace"), arg("workspace_floats"), arg("stream"));
  m.def("lof_cuda_workspace_floats", &sp::lof_cuda_workspace_floats, arg("B"), arg("n"), arg("k"));
  m.def("lof_cuda", &lof_cuda, arg("x"), arg("B"), arg("n"), arg("d"), arg("k"), arg("out"),
        arg("workspace"), arg("workspace_floats"), arg("stream"));
  m.def("kcenter_cuda_workspace_floats", &sp::kcenter_cuda_workspace_floats, arg("n"));
  m.def("kcenter_greedy_cuda", &kcenter_greedy_cuda, arg("x"), arg("n"), arg("d"), arg("m"),
        arg("start"), arg("anchors"), arg("n_anchors"), arg("sample_weight"), arg("out_idx"),
        arg("dtype"), arg("workspace"), arg("workspace_floats"), arg("stream"));
#endif
}
