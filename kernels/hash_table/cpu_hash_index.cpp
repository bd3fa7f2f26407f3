// Compiled CPU kernels of dynamic embedding tables (ops in the `gauss_hash` namespace).
//
// The hash index: open addressing with linear probing over packed 12-byte slots
// {int64 key, int32 row}; row == -1 marks an empty slot, so every int64 is a valid key.
// Removal uses backward-shift deletion (no tombstones). The allocator is a stack of freed
// rows (`free_buf[0:free_count]`, popped from the end) and a bump pointer `next_row`.
// Scalar state lives in `meta` = int64[4] {size, next_row, free_count, capacity} so the
// whole index is plain tensors, owned by the Python class CpuHashIndex.
//
// Beside the index: probe + pooling in one pass, the stamps of rows read in training,
// eviction victim selection, gradient accumulation of repeated rows (alone or fused with
// the sparse optimizer update), and deterministic row initialisation. Everything that sums
// floats does so in a fixed order (by position in the batch), so results do not depend on
// the thread count or on which row a key occupies.
//
// Build flags include -ffp-contract=off: a*b+c must round like torch's separate ops.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace {

struct __attribute__((packed)) Slot {
  int64_t key;
  int32_t row;
};
static_assert(sizeof(Slot) == 12, "slots must be 12 bytes");

constexpr int64_t kPrefetch = 32;  // keys whose home slot is prefetched ahead of the probe

enum Meta { kSize = 0, kNextRow = 1, kFreeCount = 2, kCapacity = 3 };

// Prefetch every cache line of one row of `bytes` bytes (rows are read or written whole).
inline void prefetch_row(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(c + off);
}

inline uint64_t fmix64(uint64_t h) {
  h ^= h >> 33;
  h *= 0xFF51AFD7ED558CCDULL;
  h ^= h >> 33;
  h *= 0xC4CEB9FE1A85EC53ULL;
  h ^= h >> 33;
  return h;
}

inline int64_t home_slot(int64_t key, int64_t n) {
  return static_cast<int64_t>(((fmix64(static_cast<uint64_t>(key)) >> 32) * static_cast<uint64_t>(n)) >> 32);
}

inline Slot* slots_of(const at::Tensor& slots) {
  return reinterpret_cast<Slot*>(slots.data_ptr<uint8_t>());
}

inline int64_t num_slots_of(const at::Tensor& slots) { return slots.numel() / 12; }

void check_slots(const at::Tensor& slots) {
  TORCH_CHECK(slots.dtype() == at::kByte && slots.is_contiguous() && slots.numel() % 12 == 0,
              "slots must be a contiguous uint8 tensor of 12-byte slots");
}

void check_keys(const at::Tensor& keys) {
  TORCH_CHECK(keys.dtype() == at::kLong && keys.dim() == 1 && keys.device().is_cpu(),
              "keys must be a 1-D int64 CPU tensor");
}

// Probe for `key`; returns the slot index holding it, or -1 - (empty slot index).
inline int64_t probe(const Slot* s, int64_t n, int64_t key) {
  int64_t p = home_slot(key, n);
  while (true) {
    const int32_t r = s[p].row;
    if (r == -1) return -1 - p;
    if (s[p].key == key) return p;
    if (++p == n) p = 0;
  }
}

inline int64_t find_row(const Slot* s, int64_t n, int64_t key, int64_t dflt) {
  int64_t p = home_slot(key, n);
  while (true) {
    const int32_t r = s[p].row;
    if (r == -1) return dflt;
    if (s[p].key == key) return r;
    if (++p == n) p = 0;
  }
}

// Backward-shift deletion of the entry at slot i.
void erase_at(Slot* s, int64_t n, int64_t i) {
  int64_t j = i;
  while (true) {
    if (++j == n) j = 0;
    if (s[j].row == -1) break;
    const int64_t h = home_slot(s[j].key, n);
    // The entry at j may move to i only if its home is not cyclically inside (i, j].
    const bool stays = (i <= j) ? (i < h && h <= j) : (i < h || h <= j);
    if (stays) continue;
    s[i] = s[j];
    i = j;
  }
  s[i].row = -1;
}

// ------------------------------------------------------------------ index ops
at::Tensor op_find(const at::Tensor& slots, const at::Tensor& keys_in, int64_t dflt) {
  check_slots(slots);
  check_keys(keys_in);
  const at::Tensor keys = keys_in.contiguous();
  const int64_t N = keys.numel();
  at::Tensor rows = at::empty({N}, keys.options());
  const Slot* s = slots_of(slots);
  const int64_t n = num_slots_of(slots);
  const int64_t* k = keys.data_ptr<int64_t>();
  int64_t* out = rows.data_ptr<int64_t>();
  at::parallel_for(0, N, 4096, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      if (i + kPrefetch < e) __builtin_prefetch(&s[home_slot(k[i + kPrefetch], n)]);
      out[i] = find_row(s, n, k[i], dflt);
    }
  });
  return rows;
}

// Stamps of a training read: stamp[row] = stamp_val (the table's version) and, for the
// eviction policy, pol[row] = pol_val (pol_mode 1, e.g. LRU's last step) or pol[row] += 1
// saturating (pol_mode 2, LFU's count); pol_mode 0: none. Rows < 0 and skip_row are not
// stamped. Safe under parallel_for: duplicates write the same value (set) or add atomically.
struct Stamper {
  int32_t* st = nullptr;
  int32_t* pol = nullptr;
  int32_t sv = 0, pv = 0;
  int64_t pol_mode = 0, skip = -1;

  bool active() const { return st != nullptr; }
  void prefetch(int64_t r) const {
    if (!st || r < 0) return;
    __builtin_prefetch(&st[r], 1);
    if (pol_mode != 0) __builtin_prefetch(&pol[r], 1);
  }
  void apply(int64_t r) const {
    if (!st || r < 0 || r == skip) return;
    __atomic_store_n(&st[r], sv, __ATOMIC_RELAXED);
    if (pol_mode == 1) {
      __atomic_store_n(&pol[r], pv, __ATOMIC_RELAXED);
    } else if (pol_mode == 2) {
      int32_t old = __atomic_load_n(&pol[r], __ATOMIC_RELAXED);
      while (old < std::numeric_limits<int32_t>::max() &&
             !__atomic_compare_exchange_n(&pol[r], &old, old + 1, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
      }
    }
  }
};

Stamper make_stamper(const c10::optional<at::Tensor>& stamp, int64_t stamp_val, const c10::optional<at::Tensor>& pol,
                     int64_t pol_mode, int64_t pol_val, int64_t skip_row) {
  Stamper s;
  if (!stamp.has_value() || !stamp->defined()) return s;
  TORCH_CHECK(stamp->dtype() == at::kInt && stamp->is_contiguous(), "stamp must be contiguous int32");
  s.st = stamp->data_ptr<int32_t>();
  s.sv = static_cast<int32_t>(stamp_val);
  s.pol_mode = pol_mode;
  if (pol_mode != 0) {
    TORCH_CHECK(pol.has_value() && pol->dtype() == at::kInt && pol->is_contiguous(), "pol must be contiguous int32");
    s.pol = pol->data_ptr<int32_t>();
  }
  s.pv = static_cast<int32_t>(pol_val);
  s.skip = skip_row;
  return s;
}

void op_stamp_rows(const at::Tensor& rows_in, at::Tensor& stamp, int64_t stamp_val, const c10::optional<at::Tensor>& pol,
                   int64_t pol_mode, int64_t pol_val, int64_t skip_row) {
  const at::Tensor rows = rows_in.contiguous();
  const Stamper sp = make_stamper(stamp, stamp_val, pol, pol_mode, pol_val, skip_row);
  const int64_t* r = rows.data_ptr<int64_t>();
  at::parallel_for(0, rows.numel(), 8192, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      if (i + 16 < e) sp.prefetch(r[i + 16]);
      sp.apply(r[i]);
    }
  });
}

// Returns (rows, is_new, ok). On !ok (out of rows) the index is left as before the call.
std::tuple<at::Tensor, at::Tensor, bool> op_insert(at::Tensor& slots, const at::Tensor& keys_in,
                                                 at::Tensor& meta, at::Tensor& free_buf) {
  check_slots(slots);
  check_keys(keys_in);
  const at::Tensor keys = keys_in.contiguous();
  at::Tensor rows = op_find(slots, keys, -1);
  const int64_t N = keys.numel();
  at::Tensor is_new = at::zeros({N}, keys.options().dtype(at::kBool));
  Slot* s = slots_of(slots);
  const int64_t n = num_slots_of(slots);
  const int64_t* k = keys.data_ptr<int64_t>();
  int64_t* r = rows.data_ptr<int64_t>();
  bool* nw = is_new.data_ptr<bool>();
  int64_t* m = meta.data_ptr<int64_t>();
  const int32_t* fb = free_buf.data_ptr<int32_t>();
  const int64_t saved[4] = {m[0], m[1], m[2], m[3]};
  std::vector<int64_t> inserted;
  for (int64_t i = 0; i < N; ++i) {
    if (r[i] >= 0) continue;
    const int64_t p = probe(s, n, k[i]);
    if (p >= 0) {  // a repeat of a key inserted earlier in this call
      r[i] = s[p].row;
      continue;
    }
    int64_t row;
    if (m[kFreeCount] > 0) {
      row = fb[--m[kFreeCount]];
    } else if (m[kNextRow] < m[kCapacity]) {
      row = m[kNextRow]++;
    } else {  // full: undo this call's inserts; popped free rows are still in free_buf
      for (auto it = inserted.rbegin(); it != inserted.rend(); ++it) erase_at(s, n, probe(s, n, *it));
      std::memcpy(m, saved, sizeof(saved));
      return {rows, is_new, false};
    }
    const int64_t e = -1 - p;
    s[e].key = k[i];
    s[e].row = static_cast<int32_t>(row);
    ++m[kSize];
    r[i] = row;
    nw[i] = true;
    inserted.push_back(k[i]);
  }
  return {rows, is_new, true};
}

at::Tensor op_remove(at::Tensor& slots, const at::Tensor& keys_in, at::Tensor& meta, at::Tensor& free_buf) {
  check_slots(slots);
  check_keys(keys_in);
  const at::Tensor keys = keys_in.contiguous();
  const int64_t N = keys.numel();
  int64_t* m = meta.data_ptr<int64_t>();
  TORCH_CHECK(free_buf.dtype() == at::kInt && free_buf.numel() >= m[kFreeCount] + N, "free_buf too small");
  at::Tensor rows = at::empty({N}, keys.options());
  Slot* s = slots_of(slots);
  const int64_t n = num_slots_of(slots);
  const int64_t* k = keys.data_ptr<int64_t>();
  int64_t* r = rows.data_ptr<int64_t>();
  int32_t* fb = free_buf.data_ptr<int32_t>();
  bool missed = false;
  // Two passes over each chunk of keys. 1: find their slots, the home slots (and the line
  // after: clusters run on) fetched ahead so the cache misses of many keys overlap (a
  // 10M-row index is ~160 MB of slots), and the lines after each key's slot fetched for
  // the erase, which reads on to the cluster's end (~10 slots at the 0.75 load factor).
  // 2: erase them, sequentially (entries shift back), from cache: a chunk's lines stay in
  // L1/L2 where a whole call's would not. A slot found in pass 1 can have been shifted by an
  // earlier erase (same cluster) or be a repeat's already-erased one: the key is checked
  // there and probed again if it moved. Measured at 10M rows, 6,554 keys: 0.95 ms, against
  // 1.44 ms probing and erasing one key at a time.
  thread_local std::vector<int64_t> pos_tl;
  std::vector<int64_t>& pos = pos_tl;
  pos.resize(N);
  constexpr int64_t kChunk = 256;
  for (int64_t c = 0; c < N; c += kChunk) {
    const int64_t ce = std::min(N, c + kChunk);
    for (int64_t i = c; i < ce; ++i) {
      if (i + kPrefetch < N) {
        const Slot* h = &s[home_slot(k[i + kPrefetch], n)];
        __builtin_prefetch(h, 1);
        __builtin_prefetch(reinterpret_cast<const char*>(h) + 64, 1);
      }
      pos[i] = probe(s, n, k[i]);
      if (pos[i] >= 0) {
        const char* at = reinterpret_cast<const char*>(&s[pos[i]]);
        __builtin_prefetch(at + 64, 1);
        __builtin_prefetch(at + 128, 1);
      }
    }
    for (int64_t i = c; i < ce; ++i) {
      int64_t p = pos[i];
      if (p < 0 || s[p].row == -1 || s[p].key != k[i]) p = probe(s, n, k[i]);
      if (p < 0) {  // absent, or a repeat removed earlier in this call
        r[i] = -1;
        missed = true;
        continue;
      }
      r[i] = s[p].row;
      erase_at(s, n, p);
      fb[m[kFreeCount]++] = static_cast<int32_t>(r[i]);
      --m[kSize];
    }
  }
  if (missed && N > 1) {  // a key repeated in the call reports its row at every position
    std::unordered_map<int64_t, int64_t> removed;
    for (int64_t i = 0; i < N; ++i)
      if (r[i] >= 0) removed.emplace(k[i], r[i]);
    if (!removed.empty())
      for (int64_t i = 0; i < N; ++i)
        if (r[i] < 0) {
          const auto it = removed.find(k[i]);
          if (it != removed.end()) r[i] = it->second;
        }
  }
  return rows;
}

std::tuple<at::Tensor, at::Tensor> op_keys_and_rows(const at::Tensor& slots, int64_t size) {
  check_slots(slots);
  at::Tensor keys = at::empty({size}, at::kLong);
  at::Tensor rows = at::empty({size}, at::kLong);
  const Slot* s = slots_of(slots);
  const int64_t n = num_slots_of(slots);
  int64_t* ko = keys.data_ptr<int64_t>();
  int64_t* ro = rows.data_ptr<int64_t>();
  int64_t c = 0;
  for (int64_t p = 0; p < n; ++p) {
    if (s[p].row == -1) continue;
    TORCH_CHECK(c < size, "index holds more keys than its size says");
    ko[c] = s[p].key;
    ro[c] = s[p].row;
    ++c;
  }
  TORCH_CHECK(c == size, "index holds fewer keys than its size says");
  return {keys, rows};
}

// Write distinct, absent keys with the given rows (rebuilds: rehash, load).
void op_place(at::Tensor& slots, const at::Tensor& keys_in, const at::Tensor& rows_in) {
  check_slots(slots);
  check_keys(keys_in);
  const at::Tensor keys = keys_in.contiguous();
  const at::Tensor rows = rows_in.contiguous().to(at::kLong);
  Slot* s = slots_of(slots);
  const int64_t n = num_slots_of(slots);
  const int64_t* k = keys.data_ptr<int64_t>();
  const int64_t* r = rows.data_ptr<int64_t>();
  for (int64_t i = 0; i < keys.numel(); ++i) {
    const int64_t p = probe(s, n, k[i]);
    TORCH_CHECK(p < 0, "duplicate key in place()");
    s[-1 - p].key = k[i];
    s[-1 - p].row = static_cast<int32_t>(r[i]);
  }
}

// ------------------------------------------------------------------ eviction
// The k live rows of smallest (score, key), for the eviction policies whose score is an
// int32 per row (LRU step, LFU count, TTL time). Rows r < limit are candidates when
// stamp[r] >= 0 (the table marks rows without a key -1) and r is not in `protect`.
// The threshold score comes from a histogram (or nth_element for wide score ranges) over a
// sequential scan of the rows; one scan of the slots then yields the keys. Ties at the
// threshold go to the smallest keys. Returns (keys, rows) of the victims, keys ascending.
// (keys, rows) tensors of the first k (key, row) pairs, in their order: how the victim
// selections return their picks.
std::tuple<at::Tensor, at::Tensor> pairs_to_keys_and_rows(const std::vector<std::pair<int64_t, int64_t>>& pairs,
                                                          int64_t k) {
  at::Tensor keys_out = at::empty({k}, at::kLong), rows_out = at::empty({k}, at::kLong);
  int64_t* ko = keys_out.data_ptr<int64_t>();
  int64_t* ro = rows_out.data_ptr<int64_t>();
  for (int64_t i = 0; i < k; ++i) {
    ko[i] = pairs[i].first;
    ro[i] = pairs[i].second;
  }
  return {keys_out, rows_out};
}

// Sorts the first k (key, row) pairs by (key, row). Victims are thousands of pairs a round:
// an LSD radix sort on the key's bytes (skipping the bytes every key shares, e.g. the high
// bytes of small ids) costs a few passes over them where std::sort took ~0.3 ms for 6,554.
void sort_pairs_by_key(std::vector<std::pair<int64_t, int64_t>>& pairs, int64_t k) {
  if (k < 256) {
    std::sort(pairs.begin(), pairs.begin() + k);
    return;
  }
  using Pair = std::pair<int64_t, int64_t>;
  thread_local std::vector<Pair> tmp_tl;
  std::vector<Pair>& tmp = tmp_tl;
  tmp.resize(k);
  Pair* a = pairs.data();
  Pair* b = tmp.data();
  auto ukey = [](const Pair& p) { return static_cast<uint64_t>(p.first) ^ (uint64_t(1) << 63); };  // signed order
  uint64_t all_or = 0, all_and = ~uint64_t(0);
  for (int64_t i = 0; i < k; ++i) {
    all_or |= ukey(a[i]);
    all_and &= ukey(a[i]);
  }
  const uint64_t varying = all_or ^ all_and;  // bits that differ between keys
  for (int shift = 0; shift < 64; shift += 8) {
    if (((varying >> shift) & 0xFF) == 0) continue;
    int64_t count[257] = {0};
    for (int64_t i = 0; i < k; ++i) ++count[((ukey(a[i]) >> shift) & 0xFF) + 1];
    for (int d = 0; d < 256; ++d) count[d + 1] += count[d];
    for (int64_t i = 0; i < k; ++i) b[count[(ukey(a[i]) >> shift) & 0xFF]++] = a[i];
    std::swap(a, b);
  }
  if (a != pairs.data()) std::copy(a, a + k, pairs.data());
  // Stable passes keep equal keys in input order; a table's live keys are distinct, but
  // order any repeats by row so the result is exactly the (key, row) order.
  for (int64_t i = 1; i < k; ++i)
    if (pairs[i].first == pairs[i - 1].first) {
      int64_t j = i;
      while (j + 1 < k && pairs[j + 1].first == pairs[i].first) ++j;
      std::sort(pairs.begin() + (i - 1), pairs.begin() + j + 1);
      i = j;
    }
}

// The same for the first k pairs sorted by key.
std::tuple<at::Tensor, at::Tensor> keys_and_rows_by_key(std::vector<std::pair<int64_t, int64_t>>& pairs, int64_t k) {
  sort_pairs_by_key(pairs, k);
  return pairs_to_keys_and_rows(pairs, k);
}

std::tuple<at::Tensor, at::Tensor> op_select_victims(const at::Tensor& slots, const at::Tensor& stamp,
                                                     const at::Tensor& scores, const at::Tensor& protect_in,
                                                     int64_t limit, int64_t k) {
  check_slots(slots);
  TORCH_CHECK(stamp.dtype() == at::kInt && scores.dtype() == at::kInt && stamp.is_contiguous() &&
                  scores.is_contiguous() && limit <= stamp.numel() && limit <= scores.numel(),
              "stamp and scores must be contiguous int32 covering the rows");
  const int32_t* st = stamp.data_ptr<int32_t>();
  const int32_t* sc = scores.data_ptr<int32_t>();
  const at::Tensor protect = protect_in.contiguous().to(at::kLong);
  constexpr int64_t kGrain = 1 << 16;
  std::vector<uint8_t> flag(limit, 0);  // 0 candidate, 1 excluded, 2 victim, 3 tie
  const int64_t* pr = protect.data_ptr<int64_t>();
  for (int64_t i = 0; i < protect.numel(); ++i)
    if (pr[i] >= 0 && pr[i] < limit) flag[pr[i]] = 1;
  // pass 1: exclude rows without a key; count the candidates and their score range
  std::mutex mu;
  int64_t live = 0;
  int32_t lo = std::numeric_limits<int32_t>::max(), hi = std::numeric_limits<int32_t>::min();
  at::parallel_for(0, limit, kGrain, [&](int64_t r0, int64_t r1) {
    int64_t c = 0;
    int32_t l = std::numeric_limits<int32_t>::max(), h = std::numeric_limits<int32_t>::min();
    for (int64_t r = r0; r < r1; ++r) {
      flag[r] |= static_cast<uint8_t>(st[r] < 0);
      if (flag[r]) continue;
      ++c;
      l = std::min(l, sc[r]);
      h = std::max(h, sc[r]);
    }
    std::lock_guard<std::mutex> g(mu);
    live += c;
    lo = std::min(lo, l);
    hi = std::max(hi, h);
  });
  k = std::min(k, live);
  if (k <= 0) return {at::empty({0}, at::kLong), at::empty({0}, at::kLong)};
  // pass 2: the threshold t (the k-th smallest score); `below` candidates score < t
  int32_t t;
  int64_t below = 0;
  const int64_t range = static_cast<int64_t>(hi) - lo + 1;
  if (range <= (int64_t(1) << 20)) {
    std::vector<int64_t> hist(range, 0);
    at::parallel_for(0, limit, kGrain, [&](int64_t r0, int64_t r1) {
      std::vector<int64_t> local(range, 0);
      for (int64_t r = r0; r < r1; ++r)
        if (!flag[r]) ++local[sc[r] - static_cast<int64_t>(lo)];
      std::lock_guard<std::mutex> g(mu);
      for (int64_t v = 0; v < range; ++v) hist[v] += local[v];
    });
    int64_t v = 0;
    while (below + hist[v] < k) below += hist[v++];
    t = static_cast<int32_t>(lo + v);
  } else {
    std::vector<int32_t> vals;
    vals.reserve(live);
    for (int64_t r = 0; r < limit; ++r)
      if (!flag[r]) vals.push_back(sc[r]);
    std::nth_element(vals.begin(), vals.begin() + (k - 1), vals.end());
    t = vals[k - 1];
    for (int64_t r = 0; r < limit; ++r)
      if (!flag[r] && sc[r] < t) ++below;
  }
  const int64_t take = k - below;
  // pass 3: mark victims (score < t) and ties (score == t)
  at::parallel_for(0, limit, kGrain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      if (!flag[r]) flag[r] = sc[r] < t ? 2 : (sc[r] == t ? 3 : 0);
  });
  // pass 4: one scan of the slots turns victim rows into keys
  std::vector<std::pair<int64_t, int64_t>> victims, ties;
  victims.reserve(k);
  const Slot* s = slots_of(slots);
  const int64_t n = num_slots_of(slots);
  int64_t ties_seen = 0;
  at::parallel_for(0, n, kGrain, [&](int64_t p0, int64_t p1) {
    // ties: keep only the `take` smallest keys (a bounded max-heap): tie groups can be huge
    std::vector<std::pair<int64_t, int64_t>> v, heap;
    int64_t seen = 0;
    for (int64_t p = p0; p < p1; ++p) {
      const int32_t row = s[p].row;
      if (row < 0 || row >= limit) continue;
      const uint8_t f = flag[row];
      if (f == 2) {
        v.emplace_back(s[p].key, row);
      } else if (f == 3 && take > 0) {
        ++seen;
        if (static_cast<int64_t>(heap.size()) < take) {
          heap.emplace_back(s[p].key, row);
          std::push_heap(heap.begin(), heap.end());
        } else if (s[p].key < heap.front().first) {
          std::pop_heap(heap.begin(), heap.end());
          heap.back() = {s[p].key, row};
          std::push_heap(heap.begin(), heap.end());
        }
      }
    }
    std::lock_guard<std::mutex> g(mu);
    victims.insert(victims.end(), v.begin(), v.end());
    ties.insert(ties.end(), heap.begin(), heap.end());
    ties_seen += seen;
  });
  TORCH_CHECK(static_cast<int64_t>(victims.size()) == below && ties_seen >= take,
              "select_victims: rows and slots disagree (stamp must be -1 exactly for rows without a key)");
  if (take < static_cast<int64_t>(ties.size())) std::nth_element(ties.begin(), ties.begin() + take, ties.end());
  victims.insert(victims.end(), ties.begin(), ties.begin() + take);
  return keys_and_rows_by_key(victims, k);
}

// ------------------------------------------------------------------ change tracking
// A per-thread bitmap of row numbers, all clear between calls: each user clears exactly
// the words it set (so it is never cleared or allocated whole). Its buffers are kept per
// thread too: a fresh multi-MB vector per call costs its page faults every call.
struct RowBitsBuffers {
  std::vector<uint64_t> bits;
  std::vector<int32_t> set_rows;
  bool busy = false;
};

struct RowBits {
  RowBitsBuffers& buf;
  uint64_t* b;
  explicit RowBits(int64_t num_rows) : buf(buffers()) {
    TORCH_CHECK(!buf.busy, "RowBits is not reentrant");
    if (static_cast<int64_t>(buf.bits.size()) * 64 < num_rows) buf.bits.assign((num_rows + 63) / 64, 0);
    buf.set_rows.clear();
    buf.busy = true;
    b = buf.bits.data();
  }
  static RowBitsBuffers& buffers() {
    thread_local RowBitsBuffers one;
    return one;
  }
  // Sets row r's bit; false when it was set already.
  bool add(int64_t r) {
    uint64_t& w = b[r >> 6];
    const uint64_t bit = uint64_t(1) << (r & 63);
    if (w & bit) return false;
    w |= bit;
    buf.set_rows.push_back(static_cast<int32_t>(r));
    return true;
  }
  bool has(int64_t r) const { return (b[r >> 6] >> (r & 63)) & 1; }
  ~RowBits() {
    for (const int32_t r : buf.set_rows) b[r >> 6] = 0;  // words hold only this user's bits
    buf.busy = false;
  }
};

// The rows of change-log chunks whose latest change the stamps place in them, each once,
// with their ids and values: a sync pull's work after it released the training lock, in
// one call. Chunk c keeps row r when stamp[r] == chunk_rel[c] (an exact chunk) or
// stamp[r] > version_rel (not exact); default_row is never kept. Returns (ids ascending,
// rows, values [n, D] in weight's dtype, entries visited). Stamps, ids and values may be
// written meanwhile: the caller drops the rows written since (rows_not_in).
std::tuple<at::Tensor, at::Tensor, at::Tensor, int64_t> op_gather_changed(
    at::TensorList chunks, at::IntArrayRef chunk_rel, at::IntArrayRef exact, int64_t version_rel,
    const at::Tensor& stamp, const at::Tensor& row_ids, const at::Tensor& weight, int64_t default_row) {
  TORCH_CHECK(static_cast<int64_t>(chunks.size()) == static_cast<int64_t>(chunk_rel.size()) &&
                  chunk_rel.size() == exact.size(), "chunks, chunk_rel and exact must have one entry per chunk");
  TORCH_CHECK(stamp.dtype() == at::kInt && stamp.is_contiguous() && row_ids.dtype() == at::kLong &&
                  row_ids.is_contiguous() && row_ids.numel() >= stamp.numel(),
              "stamp must be contiguous int32 and row_ids contiguous int64 over the same rows");
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous() && weight.size(0) >= stamp.numel(),
              "weight must be a contiguous [rows, D] tensor covering the stamps");
  const int64_t num_rows = stamp.numel();
  for (const auto& c : chunks)
    TORCH_CHECK(c.dtype() == at::kLong && c.dim() == 1 && c.is_contiguous(), "chunks must be 1-D contiguous int64");
  const int32_t* st = stamp.data_ptr<int32_t>();
  const int64_t* rid = row_ids.data_ptr<int64_t>();
  RowBits bits(num_rows);
  thread_local std::vector<std::pair<int64_t, int64_t>> found_tl;
  std::vector<std::pair<int64_t, int64_t>>& found = found_tl;  // (id, row); bound once, as above
  found.clear();
  int64_t visited = 0;
  constexpr int64_t kAhead = 16;
  for (size_t c = 0; c < chunks.size(); ++c) {
    const int64_t* r = chunks[c].data_ptr<int64_t>();
    const int64_t n = chunks[c].numel();
    visited += n;
    const bool ex = exact[c] != 0;
    const int64_t want = chunk_rel[c];
    for (int64_t i = 0; i < n; ++i) {
      if (i + kAhead < n) {
        const int64_t a = r[i + kAhead];
        if (a >= 0 && a < num_rows) {
          __builtin_prefetch(&st[a]);
          __builtin_prefetch(&rid[a]);
        }
      }
      const int64_t row = r[i];
      TORCH_CHECK(row >= 0 && row < num_rows, "gather_changed: chunk row ", row, " outside [0, ", num_rows, ")");
      const int64_t sv = st[row];
      if (row == default_row || !(ex ? sv == want : sv > version_rel) || !bits.add(row)) continue;
      found.emplace_back(rid[row], row);
    }
  }
  std::sort(found.begin(), found.end());
  const int64_t n = static_cast<int64_t>(found.size());
  const int64_t D = weight.size(1);
  at::Tensor ids = at::empty({n}, at::kLong), rows = at::empty({n}, at::kLong);
  at::Tensor values = at::empty({n, D}, weight.options());
  int64_t* io = ids.data_ptr<int64_t>();
  int64_t* ro = rows.data_ptr<int64_t>();
  const int64_t row_bytes = D * static_cast<int64_t>(weight.element_size());
  const char* w = static_cast<const char*>(weight.data_ptr());
  char* v = static_cast<char*>(values.data_ptr());
  for (int64_t i = 0; i < n; ++i) {
    if (i + kAhead < n) prefetch_row(w + found[i + kAhead].second * row_bytes, row_bytes);
    io[i] = found[i].first;
    ro[i] = found[i].second;
    std::memcpy(v + i * row_bytes, w + found[i].second * row_bytes, row_bytes);
  }
  return {ids, rows, values, visited};
}

// bool per entry of rows: it is in none of `chunks` (row numbers < num_rows).
at::Tensor op_rows_not_in(const at::Tensor& rows_in, at::TensorList chunks, int64_t num_rows) {
  const at::Tensor rows = rows_in.contiguous();
  TORCH_CHECK(rows.dtype() == at::kLong && rows.dim() == 1, "rows must be 1-D int64");
  RowBits bits(num_rows);
  for (const auto& c : chunks) {
    TORCH_CHECK(c.dtype() == at::kLong && c.dim() == 1 && c.is_contiguous(), "chunks must be 1-D contiguous int64");
    const int64_t* r = c.data_ptr<int64_t>();
    for (int64_t i = 0; i < c.numel(); ++i) {
      TORCH_CHECK(r[i] >= 0 && r[i] < num_rows, "rows_not_in: chunk row ", r[i], " outside [0, ", num_rows, ")");
      bits.add(r[i]);
    }
  }
  at::Tensor keep = at::empty({rows.numel()}, rows.options().dtype(at::kBool));
  const int64_t* r = rows.data_ptr<int64_t>();
  bool* k = keep.data_ptr<bool>();
  for (int64_t i = 0; i < rows.numel(); ++i) {
    TORCH_CHECK(r[i] >= 0 && r[i] < num_rows, "rows_not_in: row ", r[i], " outside [0, ", num_rows, ")");
    k[i] = !bits.has(r[i]);
  }
  return keep;
}

// A relaxed atomic read: a pre-selection on a background thread reads stamps and scores
// while the training thread writes them (see op_sample_candidates); on x86 and ARM this is
// the plain load, but it keeps the race defined.
inline int32_t load_relaxed(const int32_t* p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }

void check_sample_args(const at::Tensor& stamp, const c10::optional<at::Tensor>& scores, const at::Tensor& rng_state,
                       int64_t limit, int64_t k, int64_t m) {
  TORCH_CHECK(stamp.dtype() == at::kInt && stamp.is_contiguous() && limit >= 1 && limit <= stamp.numel() &&
                  limit < (int64_t(1) << 31), "stamp must be contiguous int32 covering rows [0, limit)");
  TORCH_CHECK(rng_state.dtype() == at::kLong && rng_state.numel() == 1 && rng_state.is_contiguous(),
              "rng_state must be one int64");
  TORCH_CHECK(k >= 0 && m >= 0, "k and m must be >= 0");
  if (scores.has_value() && scores->defined())
    TORCH_CHECK(scores->dtype() == at::kInt && scores->is_contiguous() && scores->numel() >= limit,
                "scores must be contiguous int32 covering rows [0, limit)");
}

// Rows are drawn in aligned runs of kRun (see sample_lowest).
constexpr int64_t kRun = 8;

// The starts of `runs` aligned runs of kRun rows, uniform over the runs that cover
// [0, limit), from a splitmix64 stream: rng_state[0] is the stream position and advances by
// `runs`, so a seeded table draws the same rows run after run.
void draw_runs(at::Tensor& rng_state, int64_t limit, int64_t runs, std::vector<int32_t>& start) {
  const uint64_t blocks = static_cast<uint64_t>((limit + kRun - 1) / kRun);
  start.resize(runs);
  const uint64_t pos = static_cast<uint64_t>(rng_state.data_ptr<int64_t>()[0]);
  for (int64_t i = 0; i < runs; ++i) {
    const uint64_t x = fmix64((pos + static_cast<uint64_t>(i) + 1) * 0x9E3779B97F4A7C15ULL);
    start[i] = static_cast<int32_t>(((x >> 32) * blocks) >> 32) * kRun;
  }
  rng_state.data_ptr<int64_t>()[0] = static_cast<int64_t>(pos + static_cast<uint64_t>(runs));
}

// Calls visit(row) for every row of the drawn runs below `limit`, in order, prefetching the
// stamps (and the scores, when separate) of the run kAhead ahead: each run is one random
// cache line, so the reads overlap instead of waiting one by one.
template <typename Visit>
inline void visit_runs(const int32_t* st, const int32_t* sc, const std::vector<int32_t>& start, int64_t runs,
                       int64_t limit, Visit&& visit) {
  constexpr int64_t kAhead = 16;
  for (int64_t i = 0; i < runs; ++i) {
    if (i + kAhead < runs) {
      __builtin_prefetch(&st[start[i + kAhead]]);
      if (sc != st) __builtin_prefetch(&sc[start[i + kAhead]]);
    }
    const int64_t end = std::min<int64_t>(start[i] + kRun, limit);
    for (int64_t r = start[i]; r < end; ++r) visit(r);
  }
}

// The sample shared by op_sample_victims and op_sample_candidates: draw about m rows
// uniformly from [0, limit), in runs of 8 (a splitmix64 stream; rng_state[0] is the stream
// position and advances by the runs drawn, so a seeded table evicts the same rows run after
// run), keep each row once if it holds a key (stamp[row] >= 0) and is not in `protect`
// (rows < 0 in it are ignored), and leave the k of lowest (score, row) first in `cand`
// (unordered), packed as (score + 2^31) << 32 | row. Returns that k (fewer when the sample
// has fewer candidates). The sample's reads of stamp and scores are random and prefetched.
int64_t sample_lowest(const int32_t* st, const int32_t* sc, const at::Tensor& protect_in, at::Tensor& rng_state,
                      int64_t limit, int64_t k, int64_t m, std::vector<uint64_t>& cand) {
  const at::Tensor protect = protect_in.contiguous().to(at::kLong);
  const int64_t* pr = protect.data_ptr<int64_t>();
  const int64_t P = protect.numel();

  // Membership (protected, or drawn before): one bit a row, cache-resident (1.25 MB for
  // 10M rows), unlike the stamps.
  RowBits bits(limit);
  for (int64_t i = 0; i < P; ++i)
    if (pr[i] >= 0 && pr[i] < limit) bits.add(pr[i]);

  // Rows are drawn in aligned runs of kRun (the run's start is uniform over the runs that
  // cover [0, limit); rows past limit are skipped): every row is equally likely to be drawn,
  // and a run's stamps (and scores) share one cache line, so the sample costs m / kRun
  // random reads instead of m. Rows of a run may have related scores (rows inserted
  // together); the victims are still the lowest of the sample.
  const int64_t runs = (m + kRun - 1) / kRun;
  // Buffers kept per thread (no page faults on fresh memory each call), bound once: every
  // use of a thread_local with a constructor would go through its TLS wrapper.
  thread_local std::vector<int32_t> start_tl;
  std::vector<int32_t>& start = start_tl;
  draw_runs(rng_state, limit, runs, start);

  cand.clear();
  cand.reserve(runs * kRun);
  visit_runs(st, sc, start, runs, limit, [&](int64_t r) {
    const int32_t s = load_relaxed(&st[r]);
    if (s < 0 || !bits.add(r)) return;
    const int32_t v = (sc == st) ? s : load_relaxed(&sc[r]);
    const uint64_t score = static_cast<uint64_t>(static_cast<int64_t>(v) + (int64_t(1) << 31));
    cand.push_back(score << 32 | static_cast<uint64_t>(r));
  });
  k = std::min<int64_t>(k, static_cast<int64_t>(cand.size()));
  if (k < static_cast<int64_t>(cand.size())) std::nth_element(cand.begin(), cand.begin() + k, cand.end());
  return k;
}

// Sampled (approximate) victim selection, bounded by the sample and never by the table:
// the k of lowest (score, row) of sample_lowest's sample, score = scores[row] (or
// stamp[row] when scores is absent: LRU). Returns (keys ascending, their rows); fewer than
// k when the sample has fewer candidates (the caller then selects exactly).
std::tuple<at::Tensor, at::Tensor> op_sample_victims(const at::Tensor& stamp, const c10::optional<at::Tensor>& scores,
                                                     const at::Tensor& row_ids, const at::Tensor& protect,
                                                     at::Tensor& rng_state, int64_t limit, int64_t k, int64_t m) {
  check_sample_args(stamp, scores, rng_state, limit, k, m);
  TORCH_CHECK(row_ids.dtype() == at::kLong && row_ids.is_contiguous() && row_ids.numel() >= limit,
              "row_ids must be contiguous int64 covering rows [0, limit)");
  const int32_t* st = stamp.data_ptr<int32_t>();
  const int32_t* sc = (scores.has_value() && scores->defined()) ? scores->data_ptr<int32_t>() : st;
  const int64_t* ids = row_ids.data_ptr<int64_t>();
  thread_local std::vector<uint64_t> cand_tl;
  thread_local std::vector<std::pair<int64_t, int64_t>> victims_tl;
  std::vector<uint64_t>& cand = cand_tl;
  std::vector<std::pair<int64_t, int64_t>>& victims = victims_tl;
  k = sample_lowest(st, sc, protect, rng_state, limit, k, m, cand);
  victims.resize(k);
  constexpr int64_t kAhead = 16;
  for (int64_t i = 0; i < k; ++i) {
    if (i + kAhead < k) __builtin_prefetch(&ids[cand[i + kAhead] & 0xFFFFFFFFULL]);
    const int64_t r = static_cast<int64_t>(cand[i] & 0xFFFFFFFFULL);
    victims[i] = {ids[r], r};
  }
  return keys_and_rows_by_key(victims, k);
}

// Sweep (CLOCK-style) victim selection, the default for int32 scores on large tables.
// Why: a sampled round reads its sample at random over the whole table (tens of MB of
// stamps) and marks the batch's 65k protected rows in a table-sized bitmap; both are cache
// misses. A sweep reads the stamps (and scores) of consecutive rows, which the hardware
// prefetcher streams, and only needs the protected rows inside the range it swept.
//
// 1. Threshold t: draw `probe` rows (runs of kRun from rng_state's stream, as
//    sample_lowest draws) and take the (1/quantile_div)-quantile of the live ones' scores.
// 2. From row hand[0] on (wrapping at limit), take in row order the live rows
//    (stamp >= 0) with score <= t that are not in `protect` (rows; < 0 ignored), until k are
//    taken or max_scan rows were looked at. hand[0] ends just past the last row taken (or
//    looked at), so the next round carries on from there and each row is looked at once a
//    revolution.
// Returns (keys ascending, rows); fewer than k when the sweep fell short (few rows at or
// under t within max_scan rows, or no live row in the probe): the caller then selects
// otherwise. Bad input raises before rng_state or hand change.
std::tuple<at::Tensor, at::Tensor> op_sweep_victims(const at::Tensor& stamp, const c10::optional<at::Tensor>& scores,
                                                    const at::Tensor& row_ids, const at::Tensor& protect_in,
                                                    at::Tensor& rng_state, at::Tensor& hand, int64_t limit,
                                                    int64_t k, int64_t probe, int64_t quantile_div,
                                                    int64_t max_scan) {
  check_sample_args(stamp, scores, rng_state, limit, k, probe);
  TORCH_CHECK(row_ids.dtype() == at::kLong && row_ids.is_contiguous() && row_ids.numel() >= limit,
              "row_ids must be contiguous int64 covering rows [0, limit)");
  TORCH_CHECK(hand.dtype() == at::kLong && hand.numel() == 1 && hand.is_contiguous(), "hand must be one int64");
  TORCH_CHECK(quantile_div >= 1 && max_scan >= 0 && probe >= 1, "quantile_div and probe must be >= 1, max_scan >= 0");
  const at::Tensor protect = protect_in.contiguous().to(at::kLong);
  const int64_t* pr = protect.data_ptr<int64_t>();
  const int64_t P = protect.numel();
  const int32_t* st = stamp.data_ptr<int32_t>();
  const int32_t* sc = (scores.has_value() && scores->defined()) ? scores->data_ptr<int32_t>() : st;
  const int64_t* ids = row_ids.data_ptr<int64_t>();
  thread_local std::vector<std::pair<int64_t, int64_t>> victims_tl;
  std::vector<std::pair<int64_t, int64_t>>& victims = victims_tl;
  victims.clear();
  if (k == 0) return pairs_to_keys_and_rows(victims, 0);

  // 1. the threshold, from a small random probe (a few hundred cache lines)
  thread_local std::vector<int32_t> start_tl, vals_tl;
  std::vector<int32_t>& start = start_tl;
  std::vector<int32_t>& vals = vals_tl;
  const int64_t runs = (probe + kRun - 1) / kRun;
  draw_runs(rng_state, limit, runs, start);
  vals.clear();
  visit_runs(st, sc, start, runs, limit, [&](int64_t r) {
    if (st[r] >= 0) vals.push_back(sc[r]);
  });
  if (vals.empty()) return pairs_to_keys_and_rows(victims, 0);
  const int64_t q = std::max<int64_t>(1, static_cast<int64_t>(vals.size()) / quantile_div) - 1;
  std::nth_element(vals.begin(), vals.begin() + q, vals.end());
  const int32_t t = vals[q];

  // 2. the sweep, a segment at a time: collect rows at or under t (a few more than still
  // needed, for the protected ones), then drop the protected rows of that segment using a
  // bitmap over the segment only (a pass over `protect`, bits in L1/L2).
  int64_t pos = static_cast<int64_t>(static_cast<uint64_t>(hand.data_ptr<int64_t>()[0]) % static_cast<uint64_t>(limit));
  int64_t scanned = 0;
  max_scan = std::min(max_scan, limit);  // each row at most once a call: victims stay distinct
  thread_local std::vector<int32_t> cand_tl;
  thread_local std::vector<uint64_t> bits_tl;
  std::vector<int32_t>& cand = cand_tl;
  std::vector<uint64_t>& bits = bits_tl;
  while (static_cast<int64_t>(victims.size()) < k && scanned < max_scan) {
    const int64_t need = k - static_cast<int64_t>(victims.size());
    const int64_t want = need + need / 8 + 16;
    const int64_t seg_start = pos;
    int64_t seg_len = 0;
    cand.clear();
    while (static_cast<int64_t>(cand.size()) < want && scanned < max_scan) {
      const int64_t end = std::min(limit, pos + (max_scan - scanned));
      int64_t r = pos;
      // Blocks of 32 rows: one branch-free mask of the rows that qualify, then its set bits
      // (~1 in 16 rows qualifies: a branch per row would mispredict on most of them). LRU
      // reads one array: a live row (stamp >= 0) at or under t >= 0 is stamp <= t unsigned.
      const uint32_t ut = static_cast<uint32_t>(t);
      bool full = false;
      while (r < end && !full) {
        const int64_t block = std::min<int64_t>(32, end - r);
        uint32_t mask = 0;
        if (sc == st && t >= 0) {
          for (int64_t j = 0; j < block; ++j) mask |= uint32_t(static_cast<uint32_t>(st[r + j]) <= ut) << j;
        } else {
          for (int64_t j = 0; j < block; ++j) mask |= uint32_t((st[r + j] >= 0) & (sc[r + j] <= t)) << j;
        }
        int64_t next = r + block;
        while (mask) {
          const int64_t row = r + __builtin_ctz(mask);
          mask &= mask - 1;
          cand.push_back(static_cast<int32_t>(row));
          if (static_cast<int64_t>(cand.size()) == want) {
            next = row + 1;
            full = true;
            break;
          }
        }
        r = next;
      }
      scanned += r - pos;
      seg_len += r - pos;
      pos = (r == limit) ? 0 : r;
    }
    if (cand.empty()) break;
    bits.assign((seg_len + 63) / 64, 0);
    for (int64_t i = 0; i < P; ++i) {  // branch-free offset: protected rows are random
      const int64_t p = pr[i];
      if (p < 0 || p >= limit) continue;
      int64_t off = p - seg_start;
      off += limit & -static_cast<int64_t>(off < 0);
      if (off < seg_len) bits[off >> 6] |= uint64_t(1) << (off & 63);
    }
    for (const int32_t r : cand) {
      int64_t off = r - seg_start;
      if (off < 0) off += limit;
      if ((bits[off >> 6] >> (off & 63)) & 1) continue;
      victims.emplace_back(0, r);
      if (static_cast<int64_t>(victims.size()) == k) {
        pos = (r + 1 == limit) ? 0 : r + 1;  // the remaining candidates wait for the next round
        break;
      }
    }
  }
  hand.data_ptr<int64_t>()[0] = pos;
  const int64_t n = static_cast<int64_t>(victims.size());
  constexpr int64_t kAhead = 16;
  for (int64_t i = 0; i < n; ++i) {
    if (i + kAhead < n) __builtin_prefetch(&ids[victims[i + kAhead].second]);
    victims[i].first = ids[victims[i].second];
  }
  return keys_and_rows_by_key(victims, n);
}

// Victim pre-selection, part 1 (runs on a background thread while training runs): the
// same sample as op_sample_victims without a protect set (the batch that will need the
// room is not known yet), returning the k candidates of lowest (score, row) in that order
// with what they read: (rows int64, stamps int32, scores int32; scores == stamps when
// `scores` is absent), and by_key (int64): the candidates' positions ordered by (id, row),
// so that op_take_victims returns its victims by key without sorting them on the training
// thread (~0.35 ms for 6,554). It only reads the table (relaxed loads; rng_state is the
// caller's own stream), so it may run while the training thread writes stamps, scores and
// ids: a row written meanwhile is either seen at its new stamp or rejected by op_take_victims.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> op_sample_candidates(
    const at::Tensor& stamp, const c10::optional<at::Tensor>& scores, const at::Tensor& row_ids,
    at::Tensor& rng_state, int64_t limit, int64_t k, int64_t m) {
  check_sample_args(stamp, scores, rng_state, limit, k, m);
  TORCH_CHECK(row_ids.dtype() == at::kLong && row_ids.is_contiguous() && row_ids.numel() >= limit,
              "row_ids must be contiguous int64 covering rows [0, limit)");
  const int64_t* ids = row_ids.data_ptr<int64_t>();
  const int32_t* st = stamp.data_ptr<int32_t>();
  const int32_t* sc = (scores.has_value() && scores->defined()) ? scores->data_ptr<int32_t>() : st;
  thread_local std::vector<uint64_t> cand_tl;
  std::vector<uint64_t>& cand = cand_tl;
  k = sample_lowest(st, sc, at::empty({0}, at::kLong), rng_state, limit, k, m, cand);
  std::sort(cand.begin(), cand.begin() + k);  // by (score, row): take_victims keeps the first valid ones
  at::Tensor rows = at::empty({k}, at::kLong), stamps = at::empty({k}, at::kInt), vals = at::empty({k}, at::kInt);
  int64_t* ro = rows.data_ptr<int64_t>();
  int32_t* so = stamps.data_ptr<int32_t>();
  int32_t* vo = vals.data_ptr<int32_t>();
  for (int64_t i = 0; i < k; ++i) {
    ro[i] = static_cast<int64_t>(cand[i] & 0xFFFFFFFFULL);
    vo[i] = static_cast<int32_t>(static_cast<int64_t>(cand[i] >> 32) - (int64_t(1) << 31));
    // LRU: the score is the stamp just read. Otherwise the stamp is read again here; a row
    // written between the two reads fails op_take_victims' score check.
    so[i] = (sc == st) ? vo[i] : load_relaxed(&st[ro[i]]);
  }
  thread_local std::vector<std::pair<int64_t, int64_t>> keyed_tl;  // (id, row) -> position
  std::vector<std::pair<int64_t, int64_t>>& keyed = keyed_tl;
  keyed.resize(k);
  thread_local std::vector<int64_t> pos_of_tl;
  std::vector<int64_t>& pos_of = pos_of_tl;
  pos_of.resize(k);
  for (int64_t i = 0; i < k; ++i) keyed[i] = {__atomic_load_n(&ids[ro[i]], __ATOMIC_RELAXED), i};
  std::sort(keyed.begin(), keyed.end());
  at::Tensor by_key = at::empty({k}, at::kLong);
  int64_t* bk = by_key.data_ptr<int64_t>();
  for (int64_t i = 0; i < k; ++i) bk[i] = keyed[i].second;
  return {rows, stamps, vals, by_key};
}

// Victim pre-selection, part 2 (on the training thread, at the eviction round): the first
// k candidates (in score order) that are still what op_sample_candidates saw: a row is
// taken iff stamp[row] == stamps[i] (the row was not written, removed or re-inserted since:
// every such change moves its stamp to a newer version or to -1), scores[row] == vals[i]
// (when scores is given: a policy that counts reads without a new stamp) and it is not in
// `protect` (rows of the batch that needs the room; < 0 ignored) nor taken already.
// Returns (keys ascending, rows); fewer than k when too few candidates are still valid.
// Reads only: bad input raises before anything is returned.
std::tuple<at::Tensor, at::Tensor> op_take_victims(const at::Tensor& stamp, const c10::optional<at::Tensor>& scores,
                                                   const at::Tensor& row_ids, const at::Tensor& cand_rows,
                                                   const at::Tensor& cand_stamps, const at::Tensor& cand_scores,
                                                   const at::Tensor& cand_by_key, const at::Tensor& protect_in,
                                                   int64_t k) {
  TORCH_CHECK(stamp.dtype() == at::kInt && stamp.is_contiguous() && stamp.numel() < (int64_t(1) << 31),
              "stamp must be contiguous int32");
  const int64_t limit = stamp.numel();
  TORCH_CHECK(row_ids.dtype() == at::kLong && row_ids.is_contiguous() && row_ids.numel() >= limit,
              "row_ids must be contiguous int64 covering every row of stamp");
  const int32_t* st = stamp.data_ptr<int32_t>();
  const int64_t* ids = row_ids.data_ptr<int64_t>();
  const int32_t* sc = nullptr;
  if (scores.has_value() && scores->defined()) {
    TORCH_CHECK(scores->dtype() == at::kInt && scores->is_contiguous() && scores->numel() >= limit,
                "scores must be contiguous int32 covering every row of stamp");
    sc = scores->data_ptr<int32_t>();
  }
  TORCH_CHECK(cand_rows.dtype() == at::kLong && cand_stamps.dtype() == at::kInt && cand_scores.dtype() == at::kInt,
              "candidates must be (rows int64, stamps int32, scores int32) as sample_candidates returns them");
  const int64_t C = cand_rows.numel();
  TORCH_CHECK(cand_stamps.numel() == C && cand_scores.numel() == C && cand_by_key.numel() == C,
              "candidate rows, stamps, scores and by_key differ in length");
  TORCH_CHECK(cand_by_key.dtype() == at::kLong, "cand_by_key must be int64 (as sample_candidates returns it)");
  TORCH_CHECK(k >= 0, "k must be >= 0");
  const at::Tensor cr = cand_rows.contiguous(), cs = cand_stamps.contiguous(), cv = cand_scores.contiguous();
  const at::Tensor cb = cand_by_key.contiguous();
  const int64_t* crow = cr.data_ptr<int64_t>();
  const int32_t* cst = cs.data_ptr<int32_t>();
  const int32_t* csc = cv.data_ptr<int32_t>();
  const int64_t* cbk = cb.data_ptr<int64_t>();
  for (int64_t i = 0; i < C; ++i)
    TORCH_CHECK(crow[i] >= 0 && crow[i] < limit, "candidate row ", crow[i], " is outside the table's ", limit, " rows");
  thread_local std::vector<char> chosen_tl;  // per candidate: a permutation check, then "taken"
  std::vector<char>& chosen = chosen_tl;
  chosen.assign(C, 0);
  for (int64_t j = 0; j < C; ++j) {
    TORCH_CHECK(cbk[j] >= 0 && cbk[j] < C && !chosen[cbk[j]], "cand_by_key must be a permutation of the candidates");
    chosen[cbk[j]] = 1;
  }
  std::fill(chosen.begin(), chosen.end(), 0);
  const at::Tensor protect = protect_in.contiguous().to(at::kLong);
  const int64_t* pr = protect.data_ptr<int64_t>();
  // The candidates' rows in a small open-addressing set (a few thousand rows: 4 slots a
  // candidate, L1/L2-resident), which the batch's rows (65,536 at a training step) are
  // looked up in. A bitmap over all rows would be set once per batch row and read at
  // random over MBs: measured ~4x slower at 10M rows.
  int64_t cap = 64;
  while (cap < 4 * C) cap <<= 1;
  const int64_t mask = cap - 1;
  thread_local std::vector<int32_t> set_tl;
  thread_local std::vector<char> state_tl;  // per candidate: 0 free, 1 a repeat, 2 protected
  std::vector<int32_t>& set = set_tl;
  std::vector<char>& state = state_tl;
  set.assign(cap, -1);
  state.assign(C, 0);
  auto slot_of = [&](int64_t r) { return static_cast<int64_t>((static_cast<uint64_t>(r) * 0x9E3779B97F4A7C15ULL) >> 40) & mask; };
  for (int64_t i = 0; i < C; ++i) {  // the set holds candidate indices; a repeated row keeps its first
    int64_t h = slot_of(crow[i]);
    while (set[h] >= 0 && crow[set[h]] != crow[i]) h = (h + 1) & mask;
    if (set[h] >= 0) state[i] = 1;
    else set[h] = static_cast<int32_t>(i);
  }
  for (int64_t j = 0; j < protect.numel(); ++j) {
    const int64_t p = pr[j];
    if (p < 0) continue;
    for (int64_t h = slot_of(p); set[h] >= 0; h = (h + 1) & mask)
      if (crow[set[h]] == p) {
        state[set[h]] = 2;
        break;
      }
  }
  int64_t taken = 0;
  constexpr int64_t kAhead = 16;
  for (int64_t i = 0; i < C && taken < k; ++i) {
    if (i + kAhead < C) {
      __builtin_prefetch(&st[crow[i + kAhead]]);
      if (sc != nullptr) __builtin_prefetch(&sc[crow[i + kAhead]]);
    }
    const int64_t r = crow[i];
    if (state[i] != 0 || st[r] != cst[i] || cst[i] < 0 || (sc != nullptr && sc[r] != csc[i])) continue;
    chosen[i] = 1;
    ++taken;
  }
  // Emit the taken ones in by_key order: a valid candidate's id is the one the order was
  // computed from (a new id comes with a new stamp), so they come out ascending; the
  // check below keeps that promise whatever the input.
  thread_local std::vector<std::pair<int64_t, int64_t>> victims_tl;
  std::vector<std::pair<int64_t, int64_t>>& victims = victims_tl;
  victims.clear();
  bool ascending = true;
  for (int64_t j = 0; j < C; ++j) {
    const int64_t i = cbk[j];
    if (!chosen[i]) continue;
    const int64_t key = ids[crow[i]];
    if (!victims.empty() && key < victims.back().first) ascending = false;
    victims.emplace_back(key, crow[i]);
  }
  if (!ascending) std::sort(victims.begin(), victims.end());
  return pairs_to_keys_and_rows(victims, static_cast<int64_t>(victims.size()));
}

// ------------------------------------------------------------------ lookup + pooling
// mode: 0 sum, 1 mean. offsets: int64[B+1]. Returns (pooled float32[B, D], rows int64[N]);
// absent ids read row `dflt` (the table's default row).
constexpr int64_t kRowPrefetch = 16;  // rows fetched ahead while pooling (latency hiding)

// One bag's arithmetic, shared by pool_bags and probe_pool_bags so that both pool exactly
// alike: acc += psw[i] * row (or row), then the mean's 1/len and the copy out of registers.
template <typename scalar_t>
inline __attribute__((always_inline)) void add_row(float* __restrict__ acc, const scalar_t* __restrict__ src,
                                                   int64_t D, const float* psw, int64_t i) {
  if (psw) {
    const float a = psw[i];
    for (int64_t d = 0; d < D; ++d) acc[d] += a * static_cast<float>(src[d]);
  } else {
    for (int64_t d = 0; d < D; ++d) acc[d] += static_cast<float>(src[d]);
  }
}

template <int kD>
inline __attribute__((always_inline)) void finish_bag(float* acc, float* out_b, int64_t D, int64_t len,
                                                      int64_t mode) {
  if (mode == 1 && len > 0) {
    const float inv = 1.f / static_cast<float>(len);
    for (int64_t d = 0; d < D; ++d) acc[d] *= inv;
  }
  if (kD > 0) std::memcpy(out_b, acc, D * sizeof(float));
}

// Pool bags [b0, b1). kD > 0: the dimension is a compile-time constant and each bag's sum
// stays in registers; kD == 0: any dimension, summed in `out` directly. Same arithmetic
// either way: out = sum over the bag, in order, of psw[i] * w[rows[i]] (then * 1/len).
template <typename scalar_t, int kD>
void pool_bags(const scalar_t* w, int64_t D_rt, const int64_t* rows, const int64_t* off, const float* psw,
               int64_t mode, float* out, int64_t b0, int64_t b1, const Stamper& sp) {
  const int64_t D = kD > 0 ? kD : D_rt;
  const int64_t row_bytes = D * static_cast<int64_t>(sizeof(scalar_t));
  const int64_t end = off[b1];
  for (int64_t i = off[b0]; i < std::min(end, off[b0] + kRowPrefetch); ++i) {
    prefetch_row(w + rows[i] * D, row_bytes);
    sp.prefetch(rows[i]);
  }
  float acc_fixed[kD > 0 ? kD : 1];
  for (int64_t b = b0; b < b1; ++b) {
    float* acc = kD > 0 ? acc_fixed : out + b * D;
    for (int64_t d = 0; d < D; ++d) acc[d] = 0.f;
    const int64_t s0 = off[b], s1 = off[b + 1];
    for (int64_t i = s0; i < s1; ++i) {
      if (i + kRowPrefetch < end) {
        prefetch_row(w + rows[i + kRowPrefetch] * D, row_bytes);
        sp.prefetch(rows[i + kRowPrefetch]);
      }
      sp.apply(rows[i]);
      const scalar_t* __restrict__ src = w + rows[i] * D;
      add_row(acc, src, D, psw, i);
    }
    finish_bag<kD>(acc, out + b * D, D, s1 - s0, mode);
  }
}

// Probe and pool in one software pipeline over ids [off[b0], off[b1]): the home slot of id
// i + 2P is prefetched, id i + P is probed and its row prefetched, id i is accumulated; so
// slot misses and row misses overlap. Arithmetic identical to pool_bags.
template <typename scalar_t, int kD>
void probe_pool_bags(const Slot* s, int64_t n, const int64_t* k, int64_t dflt, int64_t* r, const scalar_t* w,
                     int64_t D_rt, const int64_t* off, const float* psw, int64_t mode, float* out, int64_t b0,
                     int64_t b1) {
  const int64_t D = kD > 0 ? kD : D_rt;
  const int64_t row_bytes = D * static_cast<int64_t>(sizeof(scalar_t));
  const int64_t begin = off[b0], end = off[b1];
  constexpr int64_t P = kRowPrefetch;
  for (int64_t i = begin; i < std::min(end, begin + 2 * P); ++i) __builtin_prefetch(&s[home_slot(k[i], n)]);
  for (int64_t i = begin; i < std::min(end, begin + P); ++i) {
    r[i] = find_row(s, n, k[i], dflt);
    prefetch_row(w + r[i] * D, row_bytes);
  }
  float acc_fixed[kD > 0 ? kD : 1];
  for (int64_t b = b0; b < b1; ++b) {
    float* acc = kD > 0 ? acc_fixed : out + b * D;
    for (int64_t d = 0; d < D; ++d) acc[d] = 0.f;
    const int64_t s0 = off[b], s1 = off[b + 1];
    for (int64_t i = s0; i < s1; ++i) {
      if (i + 2 * P < end) __builtin_prefetch(&s[home_slot(k[i + 2 * P], n)]);
      if (i + P < end) {
        r[i + P] = find_row(s, n, k[i + P], dflt);
        prefetch_row(w + r[i + P] * D, row_bytes);
      }
      const scalar_t* __restrict__ src = w + r[i] * D;
      add_row(acc, src, D, psw, i);
    }
    finish_bag<kD>(acc, out + b * D, D, s1 - s0, mode);
  }
}

template <typename scalar_t>
void probe_pool_impl(const Slot* s, int64_t n, const int64_t* k, int64_t dflt, int64_t* r, const scalar_t* w,
                     int64_t D, const int64_t* off, const float* psw, int64_t mode, float* out, int64_t b0,
                     int64_t b1) {
  switch (D) {
    case 16: return probe_pool_bags<scalar_t, 16>(s, n, k, dflt, r, w, D, off, psw, mode, out, b0, b1);
    case 32: return probe_pool_bags<scalar_t, 32>(s, n, k, dflt, r, w, D, off, psw, mode, out, b0, b1);
    case 64: return probe_pool_bags<scalar_t, 64>(s, n, k, dflt, r, w, D, off, psw, mode, out, b0, b1);
    case 128: return probe_pool_bags<scalar_t, 128>(s, n, k, dflt, r, w, D, off, psw, mode, out, b0, b1);
    default: return probe_pool_bags<scalar_t, 0>(s, n, k, dflt, r, w, D, off, psw, mode, out, b0, b1);
  }
}

template <typename scalar_t>
void pool_impl(const scalar_t* w, int64_t D, const int64_t* rows, const int64_t* off, const float* psw,
               int64_t mode, float* out, int64_t b0, int64_t b1, const Stamper& sp) {
  switch (D) {
    case 16: return pool_bags<scalar_t, 16>(w, D, rows, off, psw, mode, out, b0, b1, sp);
    case 32: return pool_bags<scalar_t, 32>(w, D, rows, off, psw, mode, out, b0, b1, sp);
    case 64: return pool_bags<scalar_t, 64>(w, D, rows, off, psw, mode, out, b0, b1, sp);
    case 128: return pool_bags<scalar_t, 128>(w, D, rows, off, psw, mode, out, b0, b1, sp);
    default: return pool_bags<scalar_t, 0>(w, D, rows, off, psw, mode, out, b0, b1, sp);
  }
}

std::tuple<at::Tensor, at::Tensor> op_lookup_pool(const at::Tensor& slots, const at::Tensor& ids_in,
                                               const at::Tensor& offsets_in, const at::Tensor& weight,
                                               const c10::optional<at::Tensor>& psw_in, int64_t mode, int64_t dflt) {
  check_slots(slots);
  check_keys(ids_in);
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous(), "weight must be a contiguous 2-D tensor");
  const at::Tensor ids = ids_in.contiguous();
  const at::Tensor off = offsets_in.contiguous();
  const int64_t B = off.numel() - 1, D = weight.size(1), N = ids.numel();
  at::Tensor rows = at::empty({N}, ids.options());
  at::Tensor out = at::empty({B, D}, weight.options().dtype(at::kFloat));
  at::Tensor psw;
  if (psw_in.has_value()) psw = psw_in->contiguous().to(at::kFloat);
  const Slot* s = slots_of(slots);
  const int64_t n = num_slots_of(slots);
  const int64_t* k = ids.data_ptr<int64_t>();
  const int64_t* o = off.data_ptr<int64_t>();
  int64_t* r = rows.data_ptr<int64_t>();
  const float* pw = psw.defined() ? psw.data_ptr<float>() : nullptr;
  float* outp = out.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "lookup_pool", [&] {
    const scalar_t* w = weight.data_ptr<scalar_t>();
    at::parallel_for(0, B, 64, [&](int64_t b0, int64_t b1) {
      probe_pool_impl<scalar_t>(s, n, k, dflt, r, w, D, o, pw, mode, outp, b0, b1);
    });
  });
  return {out, rows};
}

// Pooling of rows already resolved (training path); same arithmetic as op_lookup_pool. With
// a stamp tensor, every row read is stamped as in op_stamp_rows (skip_row: the default row).
at::Tensor op_pool_rows(const at::Tensor& weight, const at::Tensor& rows_in, const at::Tensor& offsets_in,
                        const c10::optional<at::Tensor>& psw_in, int64_t mode, const c10::optional<at::Tensor>& stamp,
                        int64_t stamp_val, const c10::optional<at::Tensor>& pol, int64_t pol_mode, int64_t pol_val,
                        int64_t skip_row) {
  const Stamper sp = make_stamper(stamp, stamp_val, pol, pol_mode, pol_val, skip_row);
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous(), "weight must be a contiguous 2-D tensor");
  const at::Tensor rows = rows_in.contiguous();
  const at::Tensor off = offsets_in.contiguous();
  const int64_t B = off.numel() - 1, D = weight.size(1);
  at::Tensor out = at::empty({B, D}, weight.options().dtype(at::kFloat));
  at::Tensor psw;
  if (psw_in.has_value()) psw = psw_in->contiguous().to(at::kFloat);
  const int64_t* r = rows.data_ptr<int64_t>();
  const int64_t* o = off.data_ptr<int64_t>();
  const float* pw = psw.defined() ? psw.data_ptr<float>() : nullptr;
  float* outp = out.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "pool_rows", [&] {
    const scalar_t* w = weight.data_ptr<scalar_t>();
    at::parallel_for(0, B, 64, [&](int64_t b0, int64_t b1) { pool_impl<scalar_t>(w, D, r, o, pw, mode, outp, b0, b1, sp); });
  });
  return out;
}

// bag[i] = b for offsets[b] <= i < offsets[b+1] (offsets int64[B+1]): the source row of each
// position's gradient in a pooled lookup (torch.repeat_interleave(arange(B), lengths)).
at::Tensor op_bag_index(const at::Tensor& offsets_in) {
  const at::Tensor off = offsets_in.contiguous();
  const int64_t B = off.numel() - 1;
  const int64_t* o = off.data_ptr<int64_t>();
  at::Tensor out = at::empty({B > 0 ? o[B] : 0}, off.options());
  int64_t* bag = out.data_ptr<int64_t>();
  at::parallel_for(0, B, 1024, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      for (int64_t i = o[b]; i < o[b + 1]; ++i) bag[i] = b;
  });
  return out;
}

// ------------------------------------------------------------------ gradients
// Positions grouped by row: uniq rows ascending; the positions of uniq[u] are
// order[start[u]:start[u+1]], ascending. A stable LSD radix sort on the row (11 bits a pass):
// linear time, and the updates then walk the rows in address order.
struct Groups {
  std::vector<int64_t> uniq;
  std::vector<int32_t> start, order;
};

Groups group_positions(const int64_t* r, int64_t N) {
  Groups g;
  int64_t max_row = 0;
  for (int64_t i = 0; i < N; ++i) {
    TORCH_CHECK(r[i] >= 0 && r[i] < (int64_t(1) << 31), "row out of range");
    max_row = std::max(max_row, r[i]);
  }
  // (row, position) pairs sorted by row; each pass splits the input into one chunk per
  // thread: counts per chunk, then every chunk scatters to its own offsets (stable).
  std::vector<int64_t> cur(N), tmp(N);
  for (int64_t i = 0; i < N; ++i) cur[i] = (r[i] << 32) | i;  // row < 2**31, position < 2**31
  constexpr int kBits = 11, kBuckets = 1 << kBits;
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), N / 16384));
  const int64_t per = (N + chunks - 1) / chunks;
  std::vector<int32_t> count(chunks * kBuckets);
  for (int shift = 32; shift == 32 || (max_row >> (shift - 32)) > 0; shift += kBits) {
    std::fill(count.begin(), count.end(), 0);
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c)
        for (int64_t i = c * per; i < std::min(N, (c + 1) * per); ++i)
          ++count[c * kBuckets + ((cur[i] >> shift) & (kBuckets - 1))];
    });
    int32_t total = 0;  // exclusive prefix over (bucket, chunk): chunk order keeps the sort stable
    for (int b = 0; b < kBuckets; ++b)
      for (int64_t c = 0; c < chunks; ++c) {
        const int32_t v = count[c * kBuckets + b];
        count[c * kBuckets + b] = total;
        total += v;
      }
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c)
        for (int64_t i = c * per; i < std::min(N, (c + 1) * per); ++i)
          tmp[count[c * kBuckets + ((cur[i] >> shift) & (kBuckets - 1))]++] = cur[i];
    });
    cur.swap(tmp);
  }
  g.order.resize(N);
  for (int64_t j = 0; j < N; ++j) g.order[j] = static_cast<int32_t>(cur[j] & 0xFFFFFFFF);
  g.uniq.reserve(N);
  g.start.reserve(N + 1);
  for (int64_t j = 0; j < N; ++j) {
    const int64_t row = cur[j] >> 32;
    if (j == 0 || row != g.uniq.back()) {
      g.uniq.push_back(row);
      g.start.push_back(static_cast<int32_t>(j));
    }
  }
  g.start.push_back(static_cast<int32_t>(N));
  return g;
}

// acc = sum over the positions p of group u (ascending) of scale[p] * src[src_idx[p]],
// starting from 0. Returns false if a sum is inf/nan.
inline bool sum_group(float* __restrict__ acc, int64_t D, const float* g, const int64_t* si, const float* sc,
                      const Groups& grp, int64_t u) {
  for (int64_t d = 0; d < D; ++d) acc[d] = 0.f;
  for (int32_t j = grp.start[u]; j < grp.start[u + 1]; ++j) {
    const int64_t p = grp.order[j];
    const float* __restrict__ src_row = g + (si ? si[p] : p) * D;
    if (sc) {
      const float a = sc[p];
      for (int64_t d = 0; d < D; ++d) acc[d] += a * src_row[d];
    } else {
      for (int64_t d = 0; d < D; ++d) acc[d] += src_row[d];
    }
  }
  uint32_t bad = 0;  // inf/nan: all exponent bits set (integer ops: vectorizable)
  for (int64_t d = 0; d < D; ++d) {
    uint32_t bits;
    std::memcpy(&bits, &acc[d], 4);
    bad |= static_cast<uint32_t>((bits & 0x7f800000u) == 0x7f800000u);
  }
  return !bad;
}

// Sum the gradients of repeated rows. Gradient of position i is
//   scale[i] * src[src_idx[i]]   (src_idx empty: i; scale empty: 1).
// Returns (distinct rows ascending, summed grads float32[U, D], all_finite).
// Each row's sum runs over its positions in ascending order, whatever the thread count.
std::tuple<at::Tensor, at::Tensor, bool> op_accumulate_grads(const at::Tensor& rows_in, const at::Tensor& src_in,
                                                           const at::Tensor& src_idx_in, const at::Tensor& scale_in) {
  const at::Tensor rows = rows_in.contiguous();
  const at::Tensor src = src_in.contiguous().to(at::kFloat);
  const at::Tensor src_idx = src_idx_in.contiguous();
  const at::Tensor scale = scale_in.defined() && scale_in.numel() ? scale_in.contiguous().to(at::kFloat) : at::Tensor();
  const int64_t N = rows.numel(), D = src.size(1);
  const int64_t* si = src_idx.numel() ? src_idx.data_ptr<int64_t>() : nullptr;
  const float* sc = scale.defined() ? scale.data_ptr<float>() : nullptr;
  const float* g = src.data_ptr<float>();
  const Groups grp = group_positions(rows.data_ptr<int64_t>(), N);
  const int64_t U = static_cast<int64_t>(grp.uniq.size());
  at::Tensor urows = at::empty({U}, at::kLong);
  std::memcpy(urows.data_ptr<int64_t>(), grp.uniq.data(), U * sizeof(int64_t));
  at::Tensor out = at::empty({U, D}, at::kFloat);
  float* op = out.data_ptr<float>();
  std::atomic<bool> all_finite{true};
  at::parallel_for(0, U, 512, [&](int64_t u0, int64_t u1) {
    bool ok = true;
    for (int64_t u = u0; u < u1; ++u) ok = sum_group(op + u * D, D, g, si, sc, grp, u) && ok;
    if (!ok) all_finite = false;
  });
  return {urows, out, all_finite.load()};
}

// ------------------------------------------------------------------ sparse optimizers
// kind: 0 SGD, 1 Adagrad, 2 row-wise Adagrad, 3 Adam. state1: Adagrad sum [R, D] /
// row-wise sum [R] / Adam exp_avg [R, D]; state2: Adam exp_avg_sq [R, D]; steps: Adam
// per-row step count int64[R]. hp = {lr, eps, beta1, beta2, weight_decay}.
struct OptState {
  int64_t kind;
  float* s1;
  float* s2;
  int64_t* steps;
  float lr, eps, wd, w1, b2, w2;
  double lr_d, beta1, beta2;
};

OptState make_opt_state(int64_t kind, const c10::optional<at::Tensor>& state1, const c10::optional<at::Tensor>& state2,
                        const c10::optional<at::Tensor>& steps, const std::vector<double>& hp) {
  TORCH_CHECK(hp.size() == 5, "hp = {lr, eps, beta1, beta2, weight_decay}");
  OptState o;
  o.kind = kind;
  o.s1 = state1.has_value() && state1->defined() ? state1->data_ptr<float>() : nullptr;
  o.s2 = state2.has_value() && state2->defined() ? state2->data_ptr<float>() : nullptr;
  o.steps = steps.has_value() && steps->defined() ? steps->data_ptr<int64_t>() : nullptr;
  TORCH_CHECK(kind >= 0 && kind <= 3, "unknown optimizer kind");
  TORCH_CHECK(kind == 0 || o.s1, "optimizer state missing");
  TORCH_CHECK(kind != 3 || (o.s2 && o.steps), "Adam state missing");
  o.lr = static_cast<float>(hp[0]);
  o.eps = static_cast<float>(hp[1]);
  o.wd = static_cast<float>(hp[4]);
  o.lr_d = hp[0];
  o.beta1 = hp[2];
  o.beta2 = hp[3];
  // torch.optim.Adam: exp_avg.lerp_(g, 1 - beta1); exp_avg_sq.mul_(beta2).addcmul_(g, g, 1 - beta2),
  // with 1 - beta computed in double before rounding to float.
  o.w1 = static_cast<float>(1.0 - hp[2]);
  o.b2 = static_cast<float>(hp[3]);
  o.w2 = static_cast<float>(1.0 - hp[3]);
  return o;
}

template <typename scalar_t>
inline void prefetch_opt_row(const OptState& o, const scalar_t* w, int64_t D, int64_t row) {
  prefetch_row(w + row * D, D * static_cast<int64_t>(sizeof(scalar_t)));
  if (o.kind == 1 || o.kind == 3) prefetch_row(o.s1 + row * D, D * 4);
  if (o.kind == 2) __builtin_prefetch(o.s1 + row);
  if (o.kind == 3) prefetch_row(o.s2 + row * D, D * 4);
}

// Update one row with its summed gradient g (modified in place by weight decay).
template <typename scalar_t>
inline void update_row(const OptState& o, scalar_t* __restrict__ wr, int64_t row, float* __restrict__ gg, int64_t D) {
  if (o.wd != 0.f)
    for (int64_t d = 0; d < D; ++d) gg[d] = gg[d] + o.wd * static_cast<float>(wr[d]);
  switch (o.kind) {
    case 0:
      for (int64_t d = 0; d < D; ++d) wr[d] = static_cast<scalar_t>(static_cast<float>(wr[d]) - o.lr * gg[d]);
      break;
    case 1: {
      float* st = o.s1 + row * D;
      for (int64_t d = 0; d < D; ++d) {
        st[d] += gg[d] * gg[d];
        const float den = std::sqrt(st[d]) + o.eps;
        wr[d] = static_cast<scalar_t>(static_cast<float>(wr[d]) - o.lr * (gg[d] / den));
      }
      break;
    }
    case 2: {
      // 8 partial sums combined in a fixed order: vectorizable and deterministic
      float part[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
      int64_t d = 0;
      for (; d + 8 <= D; d += 8)
        for (int q = 0; q < 8; ++q) part[q] += gg[d + q] * gg[d + q];
      for (; d < D; ++d) part[d % 8] += gg[d] * gg[d];
      const float sq = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
      o.s1[row] += sq / static_cast<float>(D);
      const float mult = o.lr / (std::sqrt(o.s1[row]) + o.eps);
      for (int64_t e = 0; e < D; ++e) wr[e] = static_cast<scalar_t>(static_cast<float>(wr[e]) - mult * gg[e]);
      break;
    }
    case 3: {
      float* m = o.s1 + row * D;
      float* v = o.s2 + row * D;
      const int64_t t = ++o.steps[row];
      const double bc1 = 1.0 - std::pow(o.beta1, static_cast<double>(t));
      const double bc2 = 1.0 - std::pow(o.beta2, static_cast<double>(t));
      const float step_size = static_cast<float>(o.lr_d / bc1);
      const float bc2_sqrt = static_cast<float>(std::sqrt(bc2));
      for (int64_t d = 0; d < D; ++d) {
        m[d] = m[d] + o.w1 * (gg[d] - m[d]);
        v[d] = v[d] * o.b2 + o.w2 * (gg[d] * gg[d]);
        const float den = std::sqrt(v[d]) / bc2_sqrt + o.eps;
        wr[d] = static_cast<scalar_t>(static_cast<float>(wr[d]) - step_size * (m[d] / den));
      }
      break;
    }
  }
}

constexpr int64_t kOptPrefetch = 16;  // rows (and their state) fetched ahead of the update

void op_sparse_update(int64_t kind, at::Tensor& weight, const at::Tensor& rows_in, const at::Tensor& grads_in,
                      const c10::optional<at::Tensor>& state1, const c10::optional<at::Tensor>& state2,
                      const c10::optional<at::Tensor>& steps, std::vector<double> hp) {
  TORCH_CHECK(weight.is_contiguous() && weight.dim() == 2, "weight must be contiguous 2-D");
  const OptState o = make_opt_state(kind, state1, state2, steps, hp);
  const at::Tensor rows = rows_in.contiguous();
  const at::Tensor grads = grads_in.contiguous().to(at::kFloat);
  const int64_t U = rows.numel(), D = weight.size(1);
  const int64_t* r = rows.data_ptr<int64_t>();
  const float* g = grads.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "sparse_update", [&] {
    scalar_t* w = weight.data_ptr<scalar_t>();
    at::parallel_for(0, U, 256, [&](int64_t u0, int64_t u1) {
      std::vector<float> buf(D);
      for (int64_t u = u0; u < u1; ++u) {
        if (u + kOptPrefetch < u1) prefetch_opt_row(o, w, D, r[u + kOptPrefetch]);
        std::memcpy(buf.data(), g + u * D, D * sizeof(float));
        update_row<scalar_t>(o, w + r[u] * D, r[u], buf.data(), D);
      }
    });
  });
}

// Fused: sum the gradients of repeated rows (as accumulate_grads) and update each row right
// away, in one parallel pass over the distinct rows, setting stamp[row] = stamp_val; rows
// equal to skip_row get no update.
// Only for gradients already checked finite with no possible overflow in the sums (the
// caller checks max|src| * max|scale| * N), so no row can see inf/nan.
// Returns the distinct rows (ascending, skip_row included if present).
at::Tensor op_accumulate_update(int64_t kind, at::Tensor& weight, const c10::optional<at::Tensor>& state1,
                                const c10::optional<at::Tensor>& state2, const c10::optional<at::Tensor>& steps,
                                std::vector<double> hp, const at::Tensor& rows_in, const at::Tensor& src_in,
                                const at::Tensor& src_idx_in, const at::Tensor& scale_in, int64_t skip_row,
                                at::Tensor& stamp, int64_t stamp_val) {
  TORCH_CHECK(weight.is_contiguous() && weight.dim() == 2, "weight must be contiguous 2-D");
  TORCH_CHECK(stamp.dtype() == at::kInt && stamp.is_contiguous() && stamp.numel() >= weight.size(0),
              "stamp must be contiguous int32 with a slot per row");
  int32_t* st = stamp.data_ptr<int32_t>();
  const int32_t sv = static_cast<int32_t>(stamp_val);
  const OptState o = make_opt_state(kind, state1, state2, steps, hp);
  const at::Tensor rows = rows_in.contiguous();
  const at::Tensor src = src_in.contiguous().to(at::kFloat);
  const at::Tensor src_idx = src_idx_in.contiguous();
  const at::Tensor scale = scale_in.defined() && scale_in.numel() ? scale_in.contiguous().to(at::kFloat) : at::Tensor();
  const int64_t N = rows.numel(), D = weight.size(1);
  TORCH_CHECK(src.size(1) == D, "gradient width differs from the table's");
  const int64_t* si = src_idx.numel() ? src_idx.data_ptr<int64_t>() : nullptr;
  const float* sc = scale.defined() ? scale.data_ptr<float>() : nullptr;
  const float* g = src.data_ptr<float>();
  const Groups grp = group_positions(rows.data_ptr<int64_t>(), N);
  const int64_t U = static_cast<int64_t>(grp.uniq.size());
  at::Tensor urows = at::empty({U}, at::kLong);
  std::memcpy(urows.data_ptr<int64_t>(), grp.uniq.data(), U * sizeof(int64_t));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "accumulate_update", [&] {
    scalar_t* w = weight.data_ptr<scalar_t>();
    // Threads take the rows round-robin (u = t, t + T, ...): the hot rows, whose sums are
    // long, have the lowest numbers and would otherwise all land on the first thread.
    const int64_t T = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), U / 256));
    at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
      std::vector<float> buf(D);
      for (int64_t t = t0; t < t1; ++t) {
        for (int64_t u = t; u < U; u += T) {
          const int64_t ahead = u + kOptPrefetch * T;
          if (ahead < U) {
            prefetch_opt_row(o, w, D, grp.uniq[ahead]);
            __builtin_prefetch(&st[grp.uniq[ahead]], 1);
          }
          const int64_t row = grp.uniq[u];
          if (row == skip_row) continue;
          sum_group(buf.data(), D, g, si, sc, grp, u);
          update_row<scalar_t>(o, w + row * D, row, buf.data(), D);
          st[row] = sv;
        }
      }
    });
  });
  return urows;
}

// ------------------------------------------------------------------ initialisation
// weight[rows[i], j] = low + (high - low) * u(seed, ids[i], j), u uniform in [0, 1) from 24 bits
// of a counter-based hash (two columns per hash): the same bits as the torch fallback.
void op_init_uniform(at::Tensor& weight, const at::Tensor& rows_in, const at::Tensor& ids_in, int64_t seed,
                  double low, double high) {
  const at::Tensor rows = rows_in.contiguous();
  const at::Tensor ids = ids_in.contiguous();
  const int64_t N = rows.numel(), D = weight.size(1);
  const int64_t* r = rows.data_ptr<int64_t>();
  const int64_t* k = ids.data_ptr<int64_t>();
  const uint64_t sd = fmix64(static_cast<uint64_t>(seed) + 0x9E3779B97F4A7C15ULL);
  const float lo = static_cast<float>(low), span = static_cast<float>(high - low);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "init_uniform", [&] {
    scalar_t* w = weight.data_ptr<scalar_t>();
    at::parallel_for(0, N, 256, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const uint64_t base = fmix64(static_cast<uint64_t>(k[i]) ^ sd);
        scalar_t* wr = w + r[i] * D;
        // One 64-bit hash per pair of columns: column 2p takes bits 40..63, column 2p+1 bits 16..39.
        for (int64_t j = 0; j < D; ++j) {
          const uint64_t h = fmix64(base + static_cast<uint64_t>(j / 2 + 1) * 0x9E3779B97F4A7C15ULL);
          const uint64_t bits = (j % 2 == 0) ? (h >> 40) : ((h >> 16) & 0xFFFFFF);
          const float u = static_cast<float>(bits) * (1.0f / 16777216.0f);
          const float v = u * span;
          wr[j] = static_cast<scalar_t>(v + lo);
        }
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY(gauss_hash, m) {
  m.def("find(Tensor slots, Tensor keys, int dflt) -> Tensor", &op_find);
  m.def("stamp_rows(Tensor rows, Tensor(a!) stamp, int stamp_val, Tensor(b!)? pol, int pol_mode, int pol_val, int skip_row) -> ()", &op_stamp_rows);
  m.def("insert(Tensor(a!) slots, Tensor keys, Tensor(b!) meta, Tensor(c!) free_buf) -> (Tensor, Tensor, bool)", &op_insert);
  m.def("remove(Tensor(a!) slots, Tensor keys, Tensor(b!) meta, Tensor(c!) free_buf) -> Tensor", &op_remove);
  m.def("keys_and_rows(Tensor slots, int size) -> (Tensor, Tensor)", &op_keys_and_rows);
  m.def("place(Tensor(a!) slots, Tensor keys, Tensor rows) -> ()", &op_place);
  m.def("select_victims(Tensor slots, Tensor stamp, Tensor scores, Tensor protect, int limit, int k) -> (Tensor, Tensor)", &op_select_victims);
  m.def("sample_victims(Tensor stamp, Tensor? scores, Tensor row_ids, Tensor protect, Tensor(a!) rng_state, int limit, int k, int m) -> (Tensor, Tensor)", &op_sample_victims);
  m.def("sweep_victims(Tensor stamp, Tensor? scores, Tensor row_ids, Tensor protect, Tensor(a!) rng_state, Tensor(b!) hand, int limit, int k, int probe, int quantile_div, int max_scan) -> (Tensor, Tensor)", &op_sweep_victims);
  m.def("sample_candidates(Tensor stamp, Tensor? scores, Tensor row_ids, Tensor(a!) rng_state, int limit, int k, int m) -> (Tensor, Tensor, Tensor, Tensor)", &op_sample_candidates);
  m.def("take_victims(Tensor stamp, Tensor? scores, Tensor row_ids, Tensor cand_rows, Tensor cand_stamps, Tensor cand_scores, Tensor cand_by_key, Tensor protect, int k) -> (Tensor, Tensor)", &op_take_victims);
  m.def("gather_changed(Tensor[] chunks, int[] chunk_rel, int[] exact, int version_rel, Tensor stamp, Tensor row_ids, Tensor weight, int default_row) -> (Tensor, Tensor, Tensor, int)", &op_gather_changed);
  m.def("rows_not_in(Tensor rows, Tensor[] chunks, int num_rows) -> Tensor", &op_rows_not_in);
  m.def("lookup_pool(Tensor slots, Tensor ids, Tensor offsets, Tensor weight, Tensor? psw, int mode, int dflt) -> (Tensor, Tensor)", &op_lookup_pool);
  m.def("pool_rows(Tensor weight, Tensor rows, Tensor offsets, Tensor? psw, int mode, Tensor(a!)? stamp, int stamp_val, Tensor(b!)? pol, int pol_mode, int pol_val, int skip_row) -> Tensor", &op_pool_rows);
  m.def("bag_index(Tensor offsets) -> Tensor", &op_bag_index);
  m.def("accumulate_grads(Tensor rows, Tensor src, Tensor src_idx, Tensor scale) -> (Tensor, Tensor, bool)", &op_accumulate_grads);
  m.def("accumulate_update(int kind, Tensor(a!) weight, Tensor(b!)? state1, Tensor(c!)? state2, Tensor(d!)? steps, float[] hp, Tensor rows, Tensor src, Tensor src_idx, Tensor scale, int skip_row, Tensor(e!) stamp, int stamp_val) -> Tensor", &op_accumulate_update);
  m.def("sparse_update(int kind, Tensor(a!) weight, Tensor rows, Tensor grads, Tensor(b!)? state1, Tensor(c!)? state2, Tensor(d!)? steps, float[] hp) -> ()", &op_sparse_update);
  m.def("init_uniform(Tensor(a!) weight, Tensor rows, Tensor ids, int seed, float low, float high) -> ()", &op_init_uniform);
}
