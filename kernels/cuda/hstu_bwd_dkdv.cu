// HSTU attention backward, dK and dV, and the position-bias table gradient (see
// hstu_api.h for the formula, hstu_common.cuh for the tiling).
//
// One CTA per (block of BM keys, sequence, head) loops over the query blocks that can see
// them (causal: queries from the block's first key on), recomputing S^T = K Q^T and
// dP^T = V dO^T; dV += P^T dO and dK += dS^T Q accumulate in fp32 registers (no atomics).
//
// The position table's gradient: a (key j, query i) pair adds dS to entry
// id(j) - id(i) + pos_center. Inside one (BM x BN) tile those entries span fewer than
// BM + BN consecutive values, so the tile's dS goes into a small shared-memory row with
// shared atomics (cheap), and that row into the (sequence, head)'s fp32 row in global
// memory with at most BM + BN - 1 global atomics per tile; the host sums the rows.
#include "hstu_common.cuh"

namespace gauss_hstu {
namespace {

template <typename T, int D, int NW, int MT, int BN, bool POS>
__global__ void __launch_bounds__(NW * kWarpSize) hstu_bwd_dkdv_kernel(const Params p) {
  constexpr int BM = 16 * MT * NW;
  constexpr int THREADS = NW * kWarpSize;
  constexpr int kWindow = BM + BN;  // > the number of position entries one tile touches
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* k_s = reinterpret_cast<T*>(smem_raw);
  T* v_s = k_s + BM * D;
  T* q_s = v_s + BM * D;  // [2][BN * D]
  T* do_s = q_s + 2 * BN * D;
  float* dpos_s = reinterpret_cast<float*>(do_s + 2 * BN * D);
  PositionWindow window{dpos_s + kWindow, 0};  // kWindow floats

  // grid (B * H, key blocks), x fastest: every (sequence, head)'s first (heaviest, causal:
  // seen by the most queries) block starts before any lighter one
  const int n0 = blockIdx.y * BM;
  const int bh = blockIdx.x;
  const int b = bh / p.H;
  const int h = bh % p.H;
  const Sequence seq = sequence(p, b);
  if (n0 >= seq.n) return;

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
  const bool pos_grad = POS && p.dposition_rows != nullptr;

  // causal: queries i >= j, so from n0 (a multiple of BM, hence of BN) to the end
  const int first_tile = n0 / BN;
  const int num_tiles = (seq.n + BN - 1) / BN;

  load_tile<T, BM, D, THREADS>(k_s, k, seq.start, n0, seq.n, stride_t);
  load_tile<T, BM, D, THREADS>(v_s, v, seq.start, n0, seq.n, stride_t);
  load_tile<T, BN, D, THREADS>(q_s, q, seq.start, first_tile * BN, seq.n, stride_t);
  load_tile<T, BN, D, THREADS>(do_s, go, seq.start, first_tile * BN, seq.n, stride_t);
  cp_async_commit();
  if (pos_grad) {
    for (int e = threadIdx.x; e < kWindow; e += THREADS) dpos_s[e] = 0.f;
  }

  float dk[MT][D / 8][4];
  float dv[MT][D / 8][4];
  zero(dk);
  zero(dv);

  const int warp_row0 = warp * 16 * MT;
  const int row_a = n0 + warp_row0 + g;  // this thread's keys: row_a + 16 m + {0, 8}
  for (int t = first_tile; t < num_tiles; ++t) {
    const int stage = (t - first_tile) & 1;
    if (t + 1 < num_tiles) {
      load_tile<T, BN, D, THREADS>(q_s + (stage ^ 1) * BN * D, q, seq.start, (t + 1) * BN, seq.n, stride_t);
      load_tile<T, BN, D, THREADS>(do_s + (stage ^ 1) * BN * D, go, seq.start, (t + 1) * BN, seq.n, stride_t);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    if (POS) window.load<THREADS>(p, t * BN, BN, n0, BM, seq);
    __syncthreads();
    const T* qt = q_s + stage * BN * D;
    const T* dot = do_s + stage * BN * D;
    float s[MT][BN / 8][4];
    float dp[MT][BN / 8][4];
    zero(s);
    zero(dp);
    mma_abt<T, D, BN, MT>(s, k_s, warp_row0, qt);
    mma_abt<T, D, BN, MT>(dp, v_s, warp_row0, dot);

    const int c0 = t * BN;
    const bool masked = !tile_unmasked(c0, BN, n0, BM, seq);
    // smallest position entry this tile can touch (see the file comment)
    const int base = PositionWindow::first(c0, BN, n0, seq, p.pos_center);
#pragma unroll
    for (int m = 0; m < MT; ++m) {
#pragma unroll
      for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int j = row_a + m * 16 + (e >> 1) * 8;
          const int i = c0 + nt * 8 + 2 * t4 + (e & 1);
          float u = s[m][nt][e] * half_alpha;
          if (POS) u += 0.5f * window.entries[window.offset(i, j, seq, p.pos_center)];
          const float th = tanh_approx(u);
          float silu = u + u * th;
          float ds = dp[m][nt][e] * (1.f + th) * (1.f + (u - u * th));
          if (masked && !valid(i, j, seq)) {
            silu = 0.f;
            ds = 0.f;
          } else if (pos_grad) {
            atomicAdd(dpos_s + (min(j, seq.last) - min(i, seq.last) + p.pos_center - base), ds);
          }
          s[m][nt][e] = silu;
          dp[m][nt][e] = ds;
        }
      }
    }
    uint32_t pf[MT][BN / 16][4];
    pack_a<T, BN, MT>(pf, s);
    mma_pb<T, D, BN, MT>(dv, pf, dot);
    pack_a<T, BN, MT>(pf, dp);
    mma_pb<T, D, BN, MT>(dk, pf, qt);
    __syncthreads();  // the next loads overwrite this stage; the tile's dS sums are complete
    if (pos_grad) {
      float* row = p.dposition_rows + static_cast<int64_t>(bh) * p.pos_table_size;
      const float factor = 0.5f * seq.scale;
      for (int e = threadIdx.x; e < kWindow; e += THREADS) {
        const float x = dpos_s[e];
        if (x != 0.f) {
          atomicAdd(row + base + e, x * factor);
          dpos_s[e] = 0.f;
        }
      }
      // zeroing is ordered before the next tile's adds by the __syncthreads at its top
    }
  }

  const float dk_factor = 0.5f * p.alpha * seq.scale;
  T* dk_out = static_cast<T*>(p.dk) + h * D;
  T* dv_out = static_cast<T*>(p.dv) + h * D;
#pragma unroll
  for (int m = 0; m < MT; ++m) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int j = row_a + m * 16 + half * 8;
      if (j >= seq.n) continue;
      const int64_t offset = (seq.start + j) * static_cast<int64_t>(stride_t);
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt) {
        *reinterpret_cast<uint32_t*>(dk_out + offset + dt * 8 + 2 * t4) =
            TypeTraits<T>::pack(dk[m][dt][2 * half] * dk_factor, dk[m][dt][2 * half + 1] * dk_factor);
        *reinterpret_cast<uint32_t*>(dv_out + offset + dt * 8 + 2 * t4) =
            TypeTraits<T>::pack(dv[m][dt][2 * half] * seq.scale, dv[m][dt][2 * half + 1] * seq.scale);
      }
    }
  }
}

template <typename T, int D, int NW, int MT, int BN, bool POS>
cudaError_t launch(const Params& p) {
  constexpr int BM = 16 * MT * NW;
  const size_t smem = (2 * BM * D + 4 * BN * D) * sizeof(T) + 2 * (BM + BN) * sizeof(float);
  auto kernel = hstu_bwd_dkdv_kernel<T, D, NW, MT, BN, POS>;
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
  // registers: two fp32 accumulators of 16 MT x D per warp (dK, dV) plus the S and dP tiles.
  // At D = 128, 16 keys per warp and 32-query tiles; at D = 64 without the bias, 32 keys per
  // warp on long sequences (each Q / dO fragment then feeds two products; with the bias's
  // index arithmetic that would spill).
  if constexpr (D == 128) {
    return pos ? launch<T, D, 4, 1, 32, true>(p) : launch<T, D, 4, 1, 32, false>(p);
  } else {
    if (pos) return launch<T, D, 4, 1, 64, true>(p);
    return p.max_seq_len <= kShortSeqLen ? launch<T, D, 4, 1, 64, false>(p) : launch<T, D, 4, 2, 32, false>(p);
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

cudaError_t hstu_backward_dkdv(const Params& p) {
  if (p.B == 0 || p.H == 0 || p.max_seq_len == 0) return cudaSuccess;
  return p.dtype == DType::kBFloat16 ? dispatch_d<__nv_bfloat16>(p) : dispatch_d<__half>(p);
}

}  // namespace gauss_hstu
