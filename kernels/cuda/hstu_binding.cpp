// Python binding of the HSTU attention kernels (torch tensors -> gauss_hstu::Params).
// Built by gauss_kernels.hstu.cuda_attention through torch.utils.cpp_extension; the
// kernels themselves (the .cu files) include no torch header. Outputs are allocated by the
// caller (so tests can poison them) and checked here: a wrong layout raises before any
// launch, so nothing is written.
//
// The caller passes the current CUDA stream as an integer and runs under the tensors'
// device (torch.cuda.current_stream(device).cuda_stream): then only torch/extension.h is
// needed here, which also compiles against a CPU-only torch (CI checks this file's syntax).
#include <torch/extension.h>

#include "hstu_api.h"

namespace {

using gauss_hstu::DType;
using gauss_hstu::Params;

void check_qkv(const torch::Tensor& t, const torch::Tensor& q, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.device() == q.device(), name, " must be on ", q.device());
  TORCH_CHECK(t.dim() == 3 && t.sizes() == q.sizes(), name, " must be [T, H, D] like q, got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), name, " must be ", q.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

Params make_params(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                   const torch::Tensor& offsets, const c10::optional<torch::Tensor>& num_targets,
                   const c10::optional<torch::Tensor>& position_bias, int64_t max_seq_len, double alpha,
                   bool scale_by_seq_len, int64_t stream) {
  TORCH_CHECK(q.is_cuda() && q.dim() == 3, "q must be a CUDA [T, H, D] tensor");
  TORCH_CHECK(q.scalar_type() == torch::kBFloat16 || q.scalar_type() == torch::kHalf,
              "the CUDA HSTU kernels take bf16 or fp16, got ", q.scalar_type());
  TORCH_CHECK(q.size(2) == 64 || q.size(2) == 128, "the CUDA HSTU kernels take head dim 64 or 128, got ", q.size(2));
  check_qkv(q, q, "q");
  check_qkv(k, q, "k");
  check_qkv(v, q, "v");
  TORCH_CHECK(offsets.is_cuda() && offsets.scalar_type() == torch::kInt64 && offsets.dim() == 1 &&
                  offsets.is_contiguous() && offsets.size(0) >= 1,
              "offsets must be a contiguous CUDA int64 [B + 1] tensor");
  TORCH_CHECK(max_seq_len >= 1 && max_seq_len < (1 << 30), "max_seq_len must be in [1, 2^30), got ", max_seq_len);
  Params p;
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.offsets = offsets.data_ptr<int64_t>();
  p.B = static_cast<int>(offsets.size(0) - 1);
  p.H = static_cast<int>(q.size(1));
  p.D = static_cast<int>(q.size(2));
  p.max_seq_len = static_cast<int>(max_seq_len);
  p.alpha = static_cast<float>(alpha);
  p.scale_by_seq_len = scale_by_seq_len;
  p.dtype = q.scalar_type() == torch::kBFloat16 ? DType::kBFloat16 : DType::kFloat16;
  if (num_targets.has_value()) {
    const auto& nt = *num_targets;
    TORCH_CHECK(nt.is_cuda() && nt.scalar_type() == torch::kInt64 && nt.is_contiguous() && nt.dim() == 1 &&
                    nt.size(0) == p.B,
                "num_targets must be a contiguous CUDA int64 [B] tensor");
    p.num_targets = nt.data_ptr<int64_t>();
  }
  if (position_bias.has_value()) {
    const auto& pb = *position_bias;
    TORCH_CHECK(pb.is_cuda() && pb.scalar_type() == torch::kFloat32 && pb.is_contiguous() && pb.dim() == 1 &&
                    pb.size(0) >= 2 * max_seq_len - 1 && pb.size(0) < (1 << 30),
                "position_bias must be a contiguous CUDA fp32 [2L - 1] tensor with L >= max_seq_len");
    p.position_bias = pb.data_ptr<float>();
    p.pos_table_size = static_cast<int>(pb.size(0));
    p.pos_center = (p.pos_table_size - 1) / 2;
  }
  p.stream = reinterpret_cast<cudaStream_t>(stream);
  return p;
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "gauss CUDA HSTU ", what, " launch failed: ", cudaGetErrorString(err));
}

void forward(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, const torch::Tensor& offsets,
             const c10::optional<torch::Tensor>& num_targets, const c10::optional<torch::Tensor>& position_bias,
             int64_t max_seq_len, double alpha, bool scale_by_seq_len, torch::Tensor out, int64_t stream) {
  Params p = make_params(q, k, v, offsets, num_targets, position_bias, max_seq_len, alpha, scale_by_seq_len, stream);
  check_qkv(out, q, "out");
  p.out = out.data_ptr();
  if (q.size(0) == 0) return;
  check_launch(gauss_hstu::hstu_forward(p), "forward");
}

void backward(const torch::Tensor& grad_out, const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
              const torch::Tensor& offsets, const c10::optional<torch::Tensor>& num_targets,
              const c10::optional<torch::Tensor>& position_bias, int64_t max_seq_len, double alpha,
              bool scale_by_seq_len, torch::Tensor dq, torch::Tensor dk, torch::Tensor dv,
              const c10::optional<torch::Tensor>& dposition_rows, int64_t stream) {
  Params p = make_params(q, k, v, offsets, num_targets, position_bias, max_seq_len, alpha, scale_by_seq_len, stream);
  check_qkv(grad_out, q, "grad_out");
  check_qkv(dq, q, "dq");
  check_qkv(dk, q, "dk");
  check_qkv(dv, q, "dv");
  p.grad_out = grad_out.data_ptr();
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  if (dposition_rows.has_value()) {
    const auto& rows = *dposition_rows;
    TORCH_CHECK(p.position_bias != nullptr, "dposition_rows given without position_bias");
    TORCH_CHECK(rows.is_cuda() && rows.scalar_type() == torch::kFloat32 && rows.is_contiguous() &&
                    rows.dim() == 2 && rows.size(0) == static_cast<int64_t>(p.B) * p.H &&
                    rows.size(1) == p.pos_table_size,
                "dposition_rows must be a zeroed contiguous CUDA fp32 [B * H, table size] tensor");
    p.dposition_rows = rows.data_ptr<float>();
  }
  if (q.size(0) == 0) return;
  check_launch(gauss_hstu::hstu_backward_dkdv(p), "dK/dV");
  check_launch(gauss_hstu::hstu_backward_dq(p), "dQ");
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "gauss-plugins HSTU attention kernels for sm_90 (CUDA C++)";
  m.def("forward", &forward, "HSTU attention forward into out");
  m.def("backward", &backward, "HSTU attention backward into dq, dk, dv (and the position-table rows)");
}
