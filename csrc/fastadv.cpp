// Every fastadv op schema, once. Kernels live in cpu/*.cpp and cuda/*.cu and
// register with TORCH_LIBRARY_IMPL(fastadv, CPU|CUDA, m).
//
// Conventions shared by the Lp ops (the Python layer in fastadv/ops.py
// guarantees them before calling):
//   * x, x0, grad, delta, out are 2-D (B, N) row-major contiguous views of a
//     batch: row b is sample b in memory order (so channels_last and
//     contiguous batches need no copy); all share one dtype
//     (float32 | float16 | bfloat16 | float64) and one device.
//   * alpha, eps are float32 (B,) tensors: one value per sample.
//   * lo, hi bound the box (-inf, +inf for no box). For projections the box is
//     lo <= x0 + d <= hi and applies only when x0 is given.
//   * every op writes its result into `out` (B, N), so an attack loop
//     allocates nothing per step; arithmetic is float32 (float64 for float64).
#include <Python.h>
#include <torch/library.h>

#include <string>

namespace fastadv {

static std::string build_info() {
  std::string s = "cpu";
#ifdef _OPENMP
  s += "+openmp";
#endif
#ifdef FASTADV_WITH_CUDA
  s += ",cuda";
#endif
  return s;
}

TORCH_LIBRARY(fastadv, m) {
  m.def("build_info() -> str", &build_info);

  // ---- Lp PGD steps and projections (issue: foundation) ----
  m.def("linf_step(Tensor x, Tensor x0, Tensor grad, Tensor alpha, Tensor eps, float lo, float hi, Tensor(a!) out) -> ()");
  m.def("l2_step(Tensor x, Tensor x0, Tensor grad, Tensor alpha, Tensor eps, float lo, float hi, Tensor(a!) out) -> ()");
  // The steps with the public op's value check on x0 folded into their pass
  // (CPU): the same write to out, and the number of x0 entries outside
  // [lo, hi] or NaN as a 0-d int64 tensor (0: x0 passed the check).
  m.def("linf_step_checked(Tensor x, Tensor x0, Tensor grad, Tensor alpha, Tensor eps, float lo, float hi, Tensor(a!) out) -> Tensor");
  m.def("l2_step_checked(Tensor x, Tensor x0, Tensor grad, Tensor alpha, Tensor eps, float lo, float hi, Tensor(a!) out) -> Tensor");
  m.def("l1_step(Tensor x, Tensor x0, Tensor grad, Tensor alpha, Tensor eps, float sparsity, float lo, float hi, Tensor(a!) out) -> ()");
  m.def("project_linf(Tensor delta, Tensor eps, Tensor? x0, float lo, float hi, Tensor(a!) out) -> ()");
  m.def("project_l2(Tensor delta, Tensor eps, Tensor? x0, float lo, float hi, Tensor(a!) out) -> ()");
  m.def("project_l1(Tensor delta, Tensor eps, Tensor? x0, float lo, float hi, Tensor(a!) out) -> ()");

  // ---- Sinkhorn / Wasserstein (issue: batched Sinkhorn) ----
  // FASTADV_SINKHORN_SCHEMAS (schemas for the Sinkhorn ops go below this line)
  // a (B, n), b (B, m), cost (B or 1, n, m): contiguous float32 | float64.
  // Returns the KL-form potentials f (B, n), g (B, m), iterations (B,) int32
  // and the final row-marginal error ||P 1 - a||_1 (B,).
  m.def("sinkhorn(Tensor a, Tensor b, Tensor cost, float reg, int max_iter, float tol) -> (Tensor, Tensor, Tensor, Tensor)");
  // x, x0 (B, C, H, W) contiguous float32 | float64, eps (B,) in x's dtype;
  // upper: the box 0 <= z <= upper (+inf: the ball only).
  // Returns z (B, C, H, W), iterations (B,) int32, residual (B,), psi (B,).
  m.def("wasserstein_project(Tensor x, Tensor x0, Tensor eps, int kernel_size, float p, float reg, int max_iter, float tol, float upper) -> (Tensor, Tensor, Tensor, Tensor)");
}

}  // namespace fastadv

// A plain extension module: importing fastadv._C runs the static registrations
// above. No pybind11 module body is needed, which keeps compile time down.
extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
