// HSTU attention backward, dQ (see hstu_api.h for the formula, hstu_common.cuh for the tiling).
//
// One CTA per (block of BM queries, sequence, head) loops over the key blocks, recomputing
// S = Q K^T and dP = dO V^T, so dQ accumulates in fp32 registers of one CTA: no atomics,
// deterministic, and no rounding of partial sums (the Triton backend's choice too). With
// u = s / 2 and t = tanh(u): 2 silu'(s) = (1 + t)(1 + u - u t); the factors alpha, 1/2 and
// 1 / normaliser are applied once at the end.
#include "hstu_common.cuh"

namespace gauss_hstu {
namespace {

template <typename T, int D, int NW, int MT, int BN, bool POS>
__global__ void __launch_bounds__(NW * kWarpSize) hstu_bwd_dq_kernel(const Params p) {
  constexpr int BM = 16 * MT * NW;
  constexpr int THREADS = NW * kWarpSize;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* q_s = reinterpret_cast<T*>(smem_raw);
  T* do_s = q_s + BM * D;
  T* k_s = do_s + BM * D;  // [2][BN * D]
  T* v_s = k_s + 2 * BN * D;
  PositionWindow window{reinterpret_cast<float*>(v_s + 2 * BN * D), 0};  // BM + BN floats

  // grid (B * H, query blocks): the hardware starts CTAs in order of x fastest, so every
  // (sequence, head)'s last (heaviest, causal) block starts before any lighter one
  const int m_block = gridDim.y - 1 - blockIdx.y;
  const int bh = blockIdx.x;
  const int b = bh / p.H;
  const int h = bh % p.H;
  const Sequence seq = sequence(p, b);
  const int m0 = m_block * BM;
  if (m0 >= seq.n) return;

  const int stride_t = p.H * D;
  const T* q = static_cast<const T*>(p.q) + h * D;
  const T* go = static_cast<const T*>(p.grad_out) + h * D;
  const T* k = static_cast<const T*>(p.k) + h * D;
  const T* v = static_cast<const T*>(p.v) + h * D;
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int g = lane >> 2;
  const int t4 = lane & 3;
  const float half_alpha = 0.5f * p.alpha;

  const int hi = min(m0 + BM, seq.n);
  const int num_tiles = (hi + BN - 1) / BN;

  load_tile<T, BM, D, THREADS>(q_s, q, seq.start, m0, seq.n, stride_t);
  load_tile<T, BM, D, THREADS>(do_s, go, seq.start, m0, seq.n, stride_t);
  load_tile<T, BN, D, THREADS>(k_s, k, seq.start, 0, seq.n, stride_t);
  load_tile<T, BN, D, THREADS>(v_s, v, seq.start, 0, seq.n, stride_t);
  cp_async_commit();

  float acc[MT][D / 8][4];
  zero(acc);

  const int warp_row0 = warp * 16 * MT;
  const int row_a = m0 + warp_row0 + g;  // this thread's queries: row_a + 16 m + {0, 8}
  for (int t = 0; t < num_tiles; ++t) {
    const int stage = t & 1;
    if (t + 1 < num_tiles) {
      load_tile<T, BN, D, THREADS>(k_s + (stage ^ 1) * BN * D, k, seq.start, (t + 1) * BN, seq.n, stride_t);
      load_tile<T, BN, D, THREADS>(v_s + (stage ^ 1) * BN * D, v, seq.start, (t + 1) * BN, seq.n, stride_t);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    if (POS) window.load<THREADS>(p, m0, BM, t * BN, BN, seq);
    __syncthreads();
    const T* kt = k_s + stage * BN * D;
    float s[MT][BN / 8][4];
    float dp[MT][BN / 8][4];
    zero(s);
    zero(dp);
    mma_abt<T, D, BN, MT>(s, q_s, warp_row0, kt);
    mma_abt<T, D, BN, MT>(dp, do_s, warp_row0, v_s + stage * BN * D);

    const int c0 = t * BN;
    const bool masked = !tile_unmasked(m0, BM, c0, BN, seq);
#pragma unroll
    for (int m = 0; m < MT; ++m) {
#pragma unroll
      for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int i = row_a + m * 16 + (e >> 1) * 8;
          const int j = c0 + nt * 8 + 2 * t4 + (e & 1);
          float u = s[m][nt][e] * half_alpha;
          if (POS) u += 0.5f * window.entries[window.offset(i, j, seq, p.pos_center)];
          const float th = tanh_approx(u);
          float ds = dp[m][nt][e] * (1.f + th) * (1.f + (u - u * th));
          if (masked && !valid(i, j, seq)) ds = 0.f;
          s[m][nt][e] = ds;
        }
      }
    }
    uint32_t pf[MT][BN / 16][4];
    pack_a<T, BN, MT>(pf, s);
    mma_pb<T, D, BN, MT>(acc, pf, kt);
    __syncthreads();
  }

  const float factor = 0.5f * p.alpha * seq.scale;
  T* dq = static_cast<T*>(p.dq) + h * D;
#pragma unroll
  for (int m = 0; m < MT; ++m) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int i = row_a + m * 16 + half * 8;
      if (i >= seq.n) continue;
      T* row = dq + (seq.start + i) * static_cast<int64_t>(stride_t);
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt) {
        *reinterpret_cast<uint32_t*>(row + dt * 8 + 2 * t4) =
            TypeTraits<T>::pack(acc[m][dt][2 * half] * factor, acc[m][dt][2 * half + 1] * factor);
      }
    }
  }
}

template <typename T, int D, int NW, int MT, int BN, bool POS>
cudaError_t launch(const Params& p) {
  constexpr int BM = 16 * MT * NW;
  const size_t smem = (2 * BM * D + 4 * BN * D) * sizeof(T) + (POS ? (BM + BN) * sizeof(float) : 0);
  auto kernel = hstu_bwd_dq_kernel<T, D, NW, MT, BN, POS>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  const dim3 grid(p.B * p.H, (p.max_seq_len + BM - 1) / BM);
  if (grid.y > 65535) return cudaErrorInvalidConfiguration;  // max_seq_len above ~4M tokens
  kernel<<<grid, NW * kWarpSize, smem, p.stream>>>(p);
  return cudaGetLastError();
}

template <typename T, int D>
cudaError_t dispatch_len(const Params& p) {
  const bool pos = p.position_bias != nullptr;
  // registers: dQ (16 MT x D fp32) plus the S and dP tiles (16 MT x BN each) per warp. At
  // D = 128 only 16 rows per warp fit, and 32-key tiles with the bias.
  if constexpr (D == 128) {
    return pos ? launch<T, D, 4, 1, 32, true>(p) : launch<T, D, 4, 1, 64, false>(p);
  } else {
    if (p.max_seq_len <= kShortSeqLen) return pos ? launch<T, D, 4, 1, 64, true>(p) : launch<T, D, 4, 1, 64, false>(p);
    return pos ? launch<T, D, 4, 2, 32, true>(p) : launch<T, D, 4, 2, 32, false>(p);
  }
}

template <typename T>
cudaError_t dispatch_d(const Params& p) {
  switch (p.D) {
    case 64: return dispatch_len<T, 64>(p);
    case 128: return dispatch_len<T, 128>(p);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t hstu_backward_dq(const Params& p) {
  if (p.B == 0 || p.H == 0 || p.max_seq_len == 0) return cudaSuccess;
  return p.dtype == DType::kBFloat16 ? dispatch_d<__nv_bfloat16>(p) : dispatch_d<__half>(p);
}

}  // namespace gauss_hstu
