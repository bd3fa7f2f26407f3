// HSTU attention forward (see hstu_api.h for the formula, hstu_common.cuh for the tiling).
//
// One CTA per (block of BM queries, sequence, head), launched heaviest first (the longest
// causal rows), so the tail of the grid is short programs. The warp's query fragments stay
// in registers; K and V tiles stream through a two-stage cp.async pipeline. Scores work
// with u = s / 2: silu(s) = u (1 + tanh(u)), one tanh.approx and two FMAs per score, as in
// the Triton backend; 1 / normaliser is applied once to the accumulator at the end.
#include "hstu_common.cuh"

namespace gauss_hstu {
namespace {

template <typename T, int D, int NW, int BN, bool POS>
__global__ void __launch_bounds__(NW * kWarpSize) hstu_fwd_kernel(const Params p) {
  constexpr int BM = 16 * NW;
  constexpr int THREADS = NW * kWarpSize;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* q_s = reinterpret_cast<T*>(smem_raw);
  T* k_s = q_s + BM * D;  // [2][BN * D]
  T* v_s = k_s + 2 * BN * D;

  const int m_block = gridDim.x - 1 - blockIdx.x;  // heaviest first
  const int bh = blockIdx.y;
  const int b = bh / p.H;
  const int h = bh % p.H;
  const Sequence seq = sequence(p, b);
  const int m0 = m_block * BM;
  if (m0 >= seq.n) return;

  const int stride_t = p.H * D;
  const T* q = static_cast<const T*>(p.q) + h * D;
  const T* k = static_cast<const T*>(p.k) + h * D;
  const T* v = static_cast<const T*>(p.v) + h * D;
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int g = lane >> 2;
  const int t4 = lane & 3;
  const float half_alpha = 0.5f * p.alpha;

  const int hi = min(m0 + BM, seq.n);  // causal: keys up to the last query of the block
  const int num_tiles = (hi + BN - 1) / BN;

  load_tile<T, BM, D, THREADS>(q_s, q, seq.start, m0, seq.n, stride_t);
  load_tile<T, BN, D, THREADS>(k_s, k, seq.start, 0, seq.n, stride_t);
  load_tile<T, BN, D, THREADS>(v_s, v, seq.start, 0, seq.n, stride_t);
  cp_async_commit();

  float acc[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
  uint32_t qf[D / 16][4];

  const int row_a = m0 + warp * 16 + g;  // this thread's two query rows: row_a, row_a + 8
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
    __syncthreads();
    if (t == 0) load_a_frags<D>(qf, q_s, warp * 16);

    float s[BN / 8][4];
#pragma unroll
    for (int i = 0; i < BN / 8; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
    mma_abt_regs<T, D, BN>(s, qf, k_s + stage * BN * D);

    const int c0 = t * BN;
    const bool masked = !tile_unmasked(m0, BM, c0, BN, seq);
#pragma unroll
    for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = row_a + (e >> 1) * 8;
        const int j = c0 + nt * 8 + 2 * t4 + (e & 1);
        float u = s[nt][e] * half_alpha;
        if (POS) u += 0.5f * __ldg(p.position_bias + position_index(i, j, seq, p.pos_center));
        float silu = u + u * tanh_approx(u);
        if (masked && !valid(i, j, seq)) silu = 0.f;
        s[nt][e] = silu;
      }
    }
    uint32_t pf[BN / 16][4];
    pack_a<T, BN>(pf, s);
    mma_pb<T, D, BN>(acc, pf, v_s + stage * BN * D);
    __syncthreads();  // the next iteration's loads overwrite this stage
  }

  T* out = static_cast<T*>(p.out) + h * D;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int i = row_a + half * 8;
    if (i >= seq.n) continue;
    T* row = out + (seq.start + i) * static_cast<int64_t>(stride_t);
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
      *reinterpret_cast<uint32_t*>(row + dt * 8 + 2 * t4) =
          TypeTraits<T>::pack(acc[dt][2 * half] * seq.scale, acc[dt][2 * half + 1] * seq.scale);
    }
  }
}

template <typename T, int D, int NW, int BN, bool POS>
cudaError_t launch(const Params& p) {
  constexpr int BM = 16 * NW;
  const size_t smem = (BM * D + 4 * BN * D) * sizeof(T);
  auto kernel = hstu_fwd_kernel<T, D, NW, BN, POS>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  const dim3 grid((p.max_seq_len + BM - 1) / BM, p.B * p.H);
  kernel<<<grid, NW * kWarpSize, smem, p.stream>>>(p);
  return cudaGetLastError();
}

template <typename T, int D>
cudaError_t dispatch_pos(const Params& p) {
  // 4 warps x 64 keys: the accumulators of a 16 x 128 output and a 16 x 64 score tile
  // per warp fit in registers without spilling
  return p.position_bias != nullptr ? launch<T, D, 4, 64, true>(p) : launch<T, D, 4, 64, false>(p);
}

template <typename T>
cudaError_t dispatch_d(const Params& p) {
  switch (p.D) {
    case 64: return dispatch_pos<T, 64>(p);
    case 128: return dispatch_pos<T, 128>(p);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t hstu_forward(const Params& p) {
  if (p.B == 0 || p.H == 0 || p.max_seq_len == 0) return cudaSuccess;
  return p.dtype == DType::kBFloat16 ? dispatch_d<__nv_bfloat16>(p) : dispatch_d<__half>(p);
}

}  // namespace gauss_hstu
