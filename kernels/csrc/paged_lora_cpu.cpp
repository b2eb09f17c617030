// Paged LoRA shrink / expand on CPU: torch ops `slora_cpu::shrink`, `slora_cpu::expand`.
//
// Semantics (a = token_adapter[t], -1 = no adapter; r = ranks[a, s], 0 = slice absent):
//   shrink: out[s, t, :r] = x[t] @ A_s(a)^T; every other element of out = 0
//   expand: y[t, slice s] += scalings[a, s] * buf[s, t, :r] @ B_s(a)^T
//           (rows of tokens with a == -1 and slices with r == 0 are not written at all)
// Row j of A_s(a) is pool[a_row_offsets[a, s, j] :][: in_features], row j of B_s(a)^T is
// pool[b_row_offsets[a, s, j] :][: out_sizes[s]] (kernels/page_layout.py).
//
// Design: the tokens are grouped by adapter inside the op (counting sort, O(T)), so one call
// serves every adapter of the step. The work is split into items (adapter, slice, tile of
// rank rows [shrink] or of output columns [expand], tile of tokens) handed out dynamically
// to the threads of torch's intra-op (OpenMP) pool. An item reads each weight vector from
// the pool once and applies it to up to 4 tokens at a time; weights are widened to fp32 in
// registers and everything accumulates in fp32 (y rounds once into its dtype).
//
// ISA: the kernel body (paged_lora_cpu_impl.h) is compiled three times in this file, for
// AVX-512 (f/bw/vl), AVX2+FMA+F16C and portable scalar code, under `#pragma GCC target`,
// so no global -m flag is needed; the path is picked at run time with
// __builtin_cpu_supports. SLORA_CPU_ISA=avx512|avx2|scalar (read on every call) forces a
// path no wider than the CPU supports.

#include <Python.h>

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#define SLORA_X86 1
#include <immintrin.h>
#else
#define SLORA_X86 0
#endif

namespace {

struct bf16_t {
  uint16_t bits;
};
struct fp16_t {
  uint16_t bits;
};

enum class Dt { kF32, kBF16, kF16 };

struct ShrinkItem {
  const int64_t* tokens;  // [n_tok] token ids of one adapter
  int64_t n_tok;
  const int64_t* rows;    // [>= j1] pool offsets of A_s(a)'s rows (a_row_offsets[a, s, :])
  int64_t j0, j1;         // rank rows handled by this item
  float* out;             // out[s] base: out[s, t, j] = out + t * out_stride_t + j
  int64_t out_stride_t;
};

struct ExpandItem {
  const int64_t* tokens;  // [n_tok] token ids of one adapter
  int64_t n_tok;
  const int64_t* rows;    // [>= rank] pool offsets of B_s(a)^T's rows (b_row_offsets[a, s, :])
  int64_t rank;
  int64_t c0, c1;         // columns of slice s handled by this item (slice-local)
  const float* buf;       // buf[s] base: buf[s, t, j] = buf + t * buf_stride_t + j
  int64_t buf_stride_t;
  float scale;
};

// Entry points of one ISA. x / pool / y are typed by `dt`.
struct IsaKernels {
  const char* name;
  void (*shrink)(const ShrinkItem&, Dt, const void* x, int64_t x_stride, const void* pool, int64_t in_features,
                 float* scratch, int64_t padded);
  void (*expand)(const ExpandItem&, Dt, void* y_slice, int64_t y_stride, const void* pool);
};

#define SLORA_DEFINE_ENTRY_POINTS                                                                               \
  static void shrink_entry(const ShrinkItem& it, Dt dt, const void* x, int64_t x_stride, const void* pool,     \
                           int64_t in_features, float* scratch, int64_t padded) {                              \
    switch (dt) {                                                                                                \
      case Dt::kF32:                                                                                             \
        shrink_item(it, static_cast<const float*>(x), x_stride, static_cast<const float*>(pool), in_features,   \
                    scratch, padded);                                                                            \
        break;                                                                                                   \
      case Dt::kBF16:                                                                                            \
        shrink_item(it, static_cast<const bf16_t*>(x), x_stride, static_cast<const bf16_t*>(pool), in_features, \
                    scratch, padded);                                                                            \
        break;                                                                                                   \
      case Dt::kF16:                                                                                             \
        shrink_item(it, static_cast<const fp16_t*>(x), x_stride, static_cast<const fp16_t*>(pool), in_features, \
                    scratch, padded);                                                                            \
        break;                                                                                                   \
    }                                                                                                            \
  }                                                                                                              \
  static void expand_entry(const ExpandItem& it, Dt dt, void* y, int64_t y_stride, const void* pool) {          \
    switch (dt) {                                                                                                \
      case Dt::kF32:                                                                                             \
        expand_item(it, static_cast<float*>(y), y_stride, static_cast<const float*>(pool));                     \
        break;                                                                                                   \
      case Dt::kBF16:                                                                                            \
        expand_item(it, static_cast<bf16_t*>(y), y_stride, static_cast<const bf16_t*>(pool));                   \
        break;                                                                                                   \
      case Dt::kF16:                                                                                             \
        expand_item(it, static_cast<fp16_t*>(y), y_stride, static_cast<const fp16_t*>(pool));                   \
        break;                                                                                                   \
    }                                                                                                            \
  }

}  // namespace

// ================================ AVX-512 (f, bw, vl) ======================================
#if SLORA_X86
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c"))), apply_to = function)
#endif
namespace {
namespace isa_avx512 {

struct Vec {
  using vf = __m512;
  static constexpr int W = 16;
  static constexpr int kTokens = 4;      // tokens sharing each loaded weight vector
  static constexpr int kShrinkRows = 4;  // A rows sharing each loaded activation vector
  static constexpr int kExpandVecs = 4;  // output vectors per token in the expand block

  static inline __mmask16 mask(int n) { return static_cast<__mmask16>((1u << n) - 1u); }
  static inline vf from_bf16(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }
  static inline __m256i to_bf16(vf v) {  // round to nearest even, NaN -> 0x7FC0 (as c10)
    const __m512i bits = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
    return _mm512_cvtepi32_epi16(r);
  }

  static inline void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0); }
  static inline vf zero() { return _mm512_setzero_ps(); }
  static inline vf bcast(float v) { return _mm512_set1_ps(v); }
  static inline vf fma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
  static inline float hsum(vf v) { return _mm512_reduce_add_ps(v); }

  static inline vf load(const float* p) { return _mm512_loadu_ps(p); }
  static inline vf load(const bf16_t* p) { return from_bf16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static inline vf load(const fp16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static inline vf load_tail(const float* p, int n) { return _mm512_maskz_loadu_ps(mask(n), p); }
  static inline vf load_tail(const bf16_t* p, int n) { return from_bf16(_mm256_maskz_loadu_epi16(mask(n), p)); }
  static inline vf load_tail(const fp16_t* p, int n) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask(n), p)); }

  static inline void store(float* p, vf v) { _mm512_storeu_ps(p, v); }
  static inline void store(bf16_t* p, vf v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), to_bf16(v)); }
  static inline void store(fp16_t* p, vf v) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  static inline void store_tail(float* p, vf v, int n) { _mm512_mask_storeu_ps(p, mask(n), v); }
  static inline void store_tail(bf16_t* p, vf v, int n) { _mm256_mask_storeu_epi16(p, mask(n), to_bf16(v)); }
  static inline void store_tail(fp16_t* p, vf v, int n) {
    _mm256_mask_storeu_epi16(p, mask(n), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
};

#include "paged_lora_cpu_impl.h"
SLORA_DEFINE_ENTRY_POINTS

}  // namespace isa_avx512
}  // namespace
#if defined(__clang__)
#pragma clang attribute pop
#endif
#pragma GCC pop_options

// ================================ AVX2 + FMA + F16C =========================================
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#endif
namespace {
namespace isa_avx2 {

struct Vec {
  using vf = __m256;
  static constexpr int W = 8;
  static constexpr int kTokens = 4;
  static constexpr int kShrinkRows = 2;  // 16 ymm registers: 4 tokens x 2 rows accumulators
  static constexpr int kExpandVecs = 2;

  static inline vf from_bf16(__m128i h) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)); }
  static inline __m128i to_bf16(vf v) {
    const __m256i bits = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
    const __m256i packed = _mm256_packus_epi32(r, r);  // per 128-bit lane: r0-3 r0-3 | r4-7 r4-7
    return _mm256_castsi256_si128(_mm256_permute4x64_epi64(packed, 0xD8));
  }
  template <typename T>
  static inline void copy_n(T* dst, const T* src, int n) {  // T is one of our PODs: internal linkage
    for (int i = 0; i < n; ++i) dst[i] = src[i];
  }

  static inline void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0); }
  static inline vf zero() { return _mm256_setzero_ps(); }
  static inline vf bcast(float v) { return _mm256_set1_ps(v); }
  static inline vf fma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
  static inline float hsum(vf v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
  }

  static inline vf load(const float* p) { return _mm256_loadu_ps(p); }
  static inline vf load(const bf16_t* p) { return from_bf16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static inline vf load(const fp16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  template <typename T>
  static inline vf load_tail(const T* p, int n) {  // reads exactly n elements
    T tmp[W];
    std::memset(tmp, 0, sizeof(tmp));
    copy_n(tmp, p, n);
    return load(tmp);
  }

  static inline void store(float* p, vf v) { _mm256_storeu_ps(p, v); }
  static inline void store(bf16_t* p, vf v) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), to_bf16(v)); }
  static inline void store(fp16_t* p, vf v) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  template <typename T>
  static inline void store_tail(T* p, vf v, int n) {  // writes exactly n elements
    T tmp[W];
    store(tmp, v);
    copy_n(p, tmp, n);
  }
};

#include "paged_lora_cpu_impl.h"
SLORA_DEFINE_ENTRY_POINTS

}  // namespace isa_avx2
}  // namespace
#if defined(__clang__)
#pragma clang attribute pop
#endif
#pragma GCC pop_options
#endif  // SLORA_X86

// ================================ portable scalar ==========================================
namespace {
namespace isa_scalar {

struct Vec {
  using vf = float;
  static constexpr int W = 1;
  static constexpr int kTokens = 4;
  static constexpr int kShrinkRows = 2;
  static constexpr int kExpandVecs = 4;

  static inline void prefetch(const void* p) { __builtin_prefetch(p); }
  static inline vf zero() { return 0.0f; }
  static inline vf bcast(float v) { return v; }
  static inline vf fma(vf a, vf b, vf c) { return a * b + c; }
  static inline float hsum(vf v) { return v; }

  static inline vf load(const float* p) { return *p; }
  static inline vf load(const bf16_t* p) {
    const uint32_t u = static_cast<uint32_t>(p->bits) << 16;
    float f;
    std::memcpy(&f, &u, sizeof(f));
    return f;
  }
  static inline vf load(const fp16_t* p) { return c10::detail::fp16_ieee_to_fp32_value(p->bits); }
  template <typename T>
  static inline vf load_tail(const T* p, int) { return load(p); }  // W == 1: never a partial vector

  static inline void store(float* p, vf v) { *p = v; }
  static inline void store(bf16_t* p, vf v) { p->bits = c10::detail::round_to_nearest_even(v); }
  static inline void store(fp16_t* p, vf v) { p->bits = c10::detail::fp16_ieee_from_fp32_value(v); }
  template <typename T>
  static inline void store_tail(T* p, vf v, int) { store(p, v); }
};

#include "paged_lora_cpu_impl.h"
SLORA_DEFINE_ENTRY_POINTS

}  // namespace isa_scalar
}  // namespace

// ================================ dispatch ================================================
namespace {

enum class Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

const IsaKernels kKernels[] = {
    {"scalar", isa_scalar::shrink_entry, isa_scalar::expand_entry},
#if SLORA_X86
    {"avx2", isa_avx2::shrink_entry, isa_avx2::expand_entry},
    {"avx512", isa_avx512::shrink_entry, isa_avx512::expand_entry},
#endif
};

Isa detected_isa() {
  static const Isa isa = [] {
#if SLORA_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl"))
      return Isa::kAvx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
      return Isa::kAvx2;
#endif
    return Isa::kScalar;
  }();
  return isa;
}

// The path to use now: the widest the CPU supports, or SLORA_CPU_ISA (never wider).
Isa selected_isa() {
  const Isa best = detected_isa();
  const char* env = std::getenv("SLORA_CPU_ISA");
  if (env == nullptr || env[0] == '\0') return best;
  const std::string want(env);
  Isa isa;
  if (want == "avx512") {
    isa = Isa::kAvx512;
  } else if (want == "avx2") {
    isa = Isa::kAvx2;
  } else if (want == "scalar") {
    isa = Isa::kScalar;
  } else {
    TORCH_CHECK(false, "SLORA_CPU_ISA=", want, " is not one of avx512, avx2, scalar");
  }
  TORCH_CHECK(static_cast<int>(isa) <= static_cast<int>(best), "SLORA_CPU_ISA=", want,
              " asks for a wider ISA than this CPU supports (widest supported: ", kKernels[static_cast<int>(best)].name,
              ")");
  return isa;
}

Dt dt_of(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return Dt::kF32;
    case at::kBFloat16: return Dt::kBF16;
    case at::kHalf: return Dt::kF16;
    default: TORCH_CHECK(false, name, " must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
}

// Tokens grouped by adapter (counting sort, stable): tokens of adapter a are
// order[starts[a] : starts[a + 1]].
struct Grouping {
  std::vector<int64_t> order;
  std::vector<int64_t> starts;
};

Grouping group_tokens(const at::Tensor& token_adapter, int64_t num_adapters) {
  const int32_t* ta = token_adapter.data_ptr<int32_t>();
  const int64_t num_tokens = token_adapter.size(0);
  Grouping g;
  g.starts.assign(num_adapters + 1, 0);
  for (int64_t t = 0; t < num_tokens; ++t) {
    const int32_t a = ta[t];
    TORCH_CHECK(a >= -1 && a < num_adapters, "token_adapter[", t, "] = ", a, " is outside [-1, ", num_adapters, ")");
    if (a >= 0) ++g.starts[a + 1];
  }
  for (int64_t a = 0; a < num_adapters; ++a) g.starts[a + 1] += g.starts[a];
  g.order.resize(g.starts[num_adapters]);
  std::vector<int64_t> cursor(g.starts.begin(), g.starts.end() - 1);
  for (int64_t t = 0; t < num_tokens; ++t)
    if (ta[t] >= 0) g.order[cursor[ta[t]]++] = t;
  return g;
}

void check_tables(const at::Tensor& row_offsets, const at::Tensor& ranks, const at::Tensor& token_adapter,
                  const char* offsets_name) {
  TORCH_CHECK(row_offsets.device().is_cpu() && ranks.device().is_cpu() && token_adapter.device().is_cpu(),
              offsets_name, ", ranks and token_adapter must be CPU tensors");
  TORCH_CHECK(row_offsets.scalar_type() == at::kLong && row_offsets.dim() == 3 && row_offsets.is_contiguous(),
              offsets_name, " must be a contiguous int64 [A, S, R] tensor, got ", row_offsets.scalar_type(), " ",
              row_offsets.sizes());
  TORCH_CHECK(ranks.scalar_type() == at::kInt && ranks.dim() == 2 && ranks.size(0) == row_offsets.size(0) &&
                  ranks.size(1) == row_offsets.size(1) && ranks.is_contiguous(),
              "ranks must be a contiguous int32 [A, S] = [", row_offsets.size(0), ", ", row_offsets.size(1),
              "] tensor, got ", ranks.scalar_type(), " ", ranks.sizes());
  TORCH_CHECK(token_adapter.scalar_type() == at::kInt && token_adapter.dim() == 1 && token_adapter.is_contiguous(),
              "token_adapter must be a contiguous int32 [T] tensor, got ", token_adapter.scalar_type(), " ",
              token_adapter.sizes());
}

void check_pool(const at::Tensor& pool, at::ScalarType dtype, const char* other) {
  TORCH_CHECK(pool.device().is_cpu(), "pool must be a CPU tensor");
  TORCH_CHECK(pool.dim() == 1 && (pool.stride(0) == 1 || pool.numel() <= 1),
              "pool must be a flat contiguous [N] view, got sizes ", pool.sizes(), " strides ", pool.strides());
  TORCH_CHECK(pool.scalar_type() == dtype, "pool dtype ", pool.scalar_type(), " must match ", other, "'s ", dtype);
}

// rank of (a, s), checked against the table width; every row it uses, checked against the pool.
int64_t checked_rank(const int32_t* ranks, const int64_t* rows_base, int64_t a, int64_t s, int64_t num_slices,
                     int64_t width, int64_t row_len, int64_t pool_size, const char* offsets_name) {
  const int64_t r = ranks[a * num_slices + s];
  TORCH_CHECK(r >= 0 && r <= width, "ranks[", a, ", ", s, "] = ", r, " is outside [0, ", width, "] (the width of ",
              offsets_name, ")");
  const int64_t* rows = rows_base + (a * num_slices + s) * width;
  for (int64_t j = 0; j < r; ++j)
    TORCH_CHECK(rows[j] >= 0 && rows[j] + row_len <= pool_size, offsets_name, "[", a, ", ", s, ", ", j, "] = ", rows[j],
                ": the row of ", row_len, " elements leaves the pool of ", pool_size);
  return r;
}

constexpr int64_t kTokenTile = 64;     // tokens per work item (an adapter's long prefill runs split)
constexpr int64_t kShrinkRowTile = 16; // A rows per shrink item
constexpr int64_t kExpandColTile = 256;// output columns per expand item
constexpr int64_t kMinParallelFlops = 1 << 15;  // below this, one thread (fork/join costs more)

// Runs body(item index, thread-local scratch) over items on torch's intra-op pool, handing
// items out dynamically; prologue(part, parts) runs once per part before that thread's items.
template <typename Body, typename Prologue>
void run_items(int64_t num_items, int64_t flops, const Prologue& prologue, const Body& body) {
  const int64_t threads = at::get_num_threads();
  if (threads <= 1 || num_items <= 1 || flops < kMinParallelFlops || at::in_parallel_region()) {
    prologue(0, 1);
    for (int64_t i = 0; i < num_items; ++i) body(i);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t part = begin; part < end; ++part) prologue(part, threads);
    for (int64_t i = next.fetch_add(1, std::memory_order_relaxed); i < num_items;
         i = next.fetch_add(1, std::memory_order_relaxed))
      body(i);
  });
}

void shrink(const at::Tensor& x,              // [T, in_features], unit column stride
            const at::Tensor& pool,           // [N] flat, x.dtype
            const at::Tensor& a_row_offsets,  // int64 [A, S, R]
            const at::Tensor& ranks,          // int32 [A, S]
            const at::Tensor& token_adapter,  // int32 [T], -1 = no adapter
            at::Tensor& out) {                // float32 [S, T, >= R], unit last stride; overwritten
  TORCH_CHECK(x.device().is_cpu() && out.device().is_cpu(), "x and out must be CPU tensors");
  TORCH_CHECK(x.dim() == 2, "x must be [T, in_features], got ", x.sizes());
  TORCH_CHECK(x.stride(1) == 1 || x.size(1) <= 1, "x must have a unit column stride, got strides ", x.strides());
  const Dt dt = dt_of(x, "x");
  check_pool(pool, x.scalar_type(), "x");
  check_tables(a_row_offsets, ranks, token_adapter, "a_row_offsets");
  const int64_t num_tokens = x.size(0), in_features = x.size(1);
  const int64_t num_adapters = a_row_offsets.size(0), num_slices = a_row_offsets.size(1),
                width = a_row_offsets.size(2);
  TORCH_CHECK(token_adapter.size(0) == num_tokens, "token_adapter must be [T = ", num_tokens, "], got ",
              token_adapter.sizes());
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.dim() == 3 && out.size(0) == num_slices &&
                  out.size(1) == num_tokens && out.size(2) >= width,
              "out must be float32 [S = ", num_slices, ", T = ", num_tokens, ", >= R = ", width, "], got ",
              out.scalar_type(), " ", out.sizes());
  TORCH_CHECK(out.stride(2) == 1 || out.size(2) <= 1, "out must have a unit last stride, got strides ", out.strides());
  if (num_tokens == 0 || out.numel() == 0) return;

  const IsaKernels& kernels = kKernels[static_cast<int>(selected_isa())];
  const Grouping g = group_tokens(token_adapter, num_adapters);
  const int32_t* rk = ranks.data_ptr<int32_t>();
  const int64_t* offsets = a_row_offsets.data_ptr<int64_t>();
  const int32_t* ta = token_adapter.data_ptr<int32_t>();
  float* out_base = out.data_ptr<float>();
  const int64_t os_s = out.stride(0), os_t = out.stride(1), out_width = out.size(2);

  std::vector<ShrinkItem> items;
  int64_t flops = 0;
  for (int64_t a = 0; a < num_adapters; ++a) {
    const int64_t n = g.starts[a + 1] - g.starts[a];
    if (n == 0) continue;
    for (int64_t s = 0; s < num_slices; ++s) {
      const int64_t r = checked_rank(rk, offsets, a, s, num_slices, width, in_features, pool.numel(), "a_row_offsets");
      flops += n * r * in_features;
      for (int64_t t0 = 0; t0 < n; t0 += kTokenTile)
        for (int64_t j0 = 0; j0 < r; j0 += kShrinkRowTile)
          items.push_back({g.order.data() + g.starts[a] + t0, std::min(kTokenTile, n - t0),
                           offsets + (a * num_slices + s) * width, j0, std::min(r, j0 + kShrinkRowTile),
                           out_base + s * os_s, os_t});
    }
  }

  const char* x_ptr = static_cast<const char*>(x.data_ptr());
  const void* pool_ptr = pool.data_ptr();
  const int64_t x_stride = x.stride(0);
  // fp32 copies of a group of 4 token rows, zero padded to a whole vector.
  const int64_t padded = (in_features + 15) / 16 * 16;
  // Zero what no item writes: out[s, t, r:] (all of out[:, t] for tokens without adapter).
  // Items write out[s, t, :r] only, so this needs no barrier before the items.
  auto zero_part = [&](int64_t part, int64_t parts) {
    const int64_t t0 = num_tokens * part / parts, t1 = num_tokens * (part + 1) / parts;
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t s = 0; s < num_slices; ++s) {
        const int64_t r = ta[t] >= 0 ? rk[ta[t] * num_slices + s] : 0;
        if (r < out_width) std::memset(out_base + s * os_s + t * os_t + r, 0, (out_width - r) * sizeof(float));
      }
  };
  run_items(static_cast<int64_t>(items.size()), flops, zero_part, [&](int64_t i) {
    thread_local std::vector<float> scratch;
    if (static_cast<int64_t>(scratch.size()) < 4 * padded) scratch.assign(4 * padded, 0.0f);
    kernels.shrink(items[i], dt, x_ptr, x_stride, pool_ptr, in_features, scratch.data(), padded);
  });
}

void expand(const at::Tensor& buf,            // float32 [S, T, >= R], unit last stride, any other strides
            const at::Tensor& pool,           // [N] flat, y.dtype
            const at::Tensor& b_row_offsets,  // int64 [A, S, R]
            const at::Tensor& ranks,          // int32 [A, S]
            const at::Tensor& scalings,       // float32 [A, S]
            const at::Tensor& token_adapter,  // int32 [T], -1 = no adapter
            at::Tensor& y,                    // [T, sum(out_sizes)], unit column stride; updated in place
            c10::IntArrayRef out_sizes) {     // width of every slice of y
  TORCH_CHECK(buf.device().is_cpu() && y.device().is_cpu() && scalings.device().is_cpu(),
              "buf, y and scalings must be CPU tensors");
  TORCH_CHECK(y.dim() == 2, "y must be [T, sum(out_sizes)], got ", y.sizes());
  TORCH_CHECK(y.stride(1) == 1 || y.size(1) <= 1, "y must have a unit column stride, got strides ", y.strides());
  const Dt dt = dt_of(y, "y");
  check_pool(pool, y.scalar_type(), "y");
  check_tables(b_row_offsets, ranks, token_adapter, "b_row_offsets");
  const int64_t num_tokens = y.size(0);
  const int64_t num_adapters = b_row_offsets.size(0), num_slices = b_row_offsets.size(1),
                width = b_row_offsets.size(2);
  TORCH_CHECK(token_adapter.size(0) == num_tokens, "token_adapter must be [T = ", num_tokens, "], got ",
              token_adapter.sizes());
  TORCH_CHECK(static_cast<int64_t>(out_sizes.size()) == num_slices, "out_sizes must have S = ", num_slices,
              " entries, got ", out_sizes);
  int64_t total = 0;
  for (const int64_t size : out_sizes) {
    TORCH_CHECK(size > 0, "out_sizes entries must be positive, got ", out_sizes);
    total += size;
  }
  TORCH_CHECK(total == y.size(1), "out_sizes ", out_sizes, " must sum to y's width ", y.size(1));
  TORCH_CHECK(buf.scalar_type() == at::kFloat && buf.dim() == 3 && buf.size(0) == num_slices &&
                  buf.size(1) == num_tokens && buf.size(2) >= width,
              "buf must be float32 [S = ", num_slices, ", T = ", num_tokens, ", >= R = ", width, "], got ",
              buf.scalar_type(), " ", buf.sizes());
  TORCH_CHECK(buf.stride(2) == 1 || buf.size(2) <= 1, "buf must have a unit last stride, got strides ", buf.strides());
  TORCH_CHECK(scalings.scalar_type() == at::kFloat && scalings.dim() == 2 && scalings.size(0) == num_adapters &&
                  scalings.size(1) == num_slices && scalings.is_contiguous(),
              "scalings must be a contiguous float32 [A, S] = [", num_adapters, ", ", num_slices, "] tensor, got ",
              scalings.scalar_type(), " ", scalings.sizes());
  if (num_tokens == 0) return;

  const IsaKernels& kernels = kKernels[static_cast<int>(selected_isa())];
  const Grouping g = group_tokens(token_adapter, num_adapters);
  const int32_t* rk = ranks.data_ptr<int32_t>();
  const int64_t* offsets = b_row_offsets.data_ptr<int64_t>();
  const float* scal = scalings.data_ptr<float>();
  const float* buf_base = buf.data_ptr<float>();
  const int64_t bs_s = buf.stride(0), bs_t = buf.stride(1);
  std::vector<int64_t> slice_start(num_slices, 0);
  for (int64_t s = 1; s < num_slices; ++s) slice_start[s] = slice_start[s - 1] + out_sizes[s - 1];

  struct Placed {
    ExpandItem item;
    int64_t slice;
  };
  std::vector<Placed> items;
  int64_t flops = 0;
  for (int64_t a = 0; a < num_adapters; ++a) {
    const int64_t n = g.starts[a + 1] - g.starts[a];
    if (n == 0) continue;
    for (int64_t s = 0; s < num_slices; ++s) {
      const int64_t r =
          checked_rank(rk, offsets, a, s, num_slices, width, out_sizes[s], pool.numel(), "b_row_offsets");
      if (r == 0) continue;
      flops += n * r * out_sizes[s];
      for (int64_t t0 = 0; t0 < n; t0 += kTokenTile)
        for (int64_t c0 = 0; c0 < out_sizes[s]; c0 += kExpandColTile)
          items.push_back({{g.order.data() + g.starts[a] + t0, std::min(kTokenTile, n - t0),
                            offsets + (a * num_slices + s) * width, r, c0, std::min(out_sizes[s], c0 + kExpandColTile),
                            buf_base + s * bs_s, bs_t, scal[a * num_slices + s]},
                           s});
    }
  }

  char* y_ptr = static_cast<char*>(y.data_ptr());
  const int64_t y_stride = y.stride(0), elem = y.element_size();
  const void* pool_ptr = pool.data_ptr();
  run_items(
      static_cast<int64_t>(items.size()), flops, [](int64_t, int64_t) {},
      [&](int64_t i) {
        kernels.expand(items[i].item, dt, y_ptr + slice_start[items[i].slice] * elem, y_stride, pool_ptr);
      });
}

std::string isa() { return kKernels[static_cast<int>(selected_isa())].name; }

std::string detected() { return kKernels[static_cast<int>(detected_isa())].name; }

}  // namespace

TORCH_LIBRARY(slora_cpu, m) {
  m.def(
      "shrink(Tensor x, Tensor pool, Tensor a_row_offsets, Tensor ranks, Tensor token_adapter, Tensor(a!) out) -> ()");
  m.def(
      "expand(Tensor buf, Tensor pool, Tensor b_row_offsets, Tensor ranks, Tensor scalings, Tensor token_adapter, "
      "Tensor(a!) y, int[] out_sizes) -> ()");
  m.def("isa() -> str", &isa);                // the path the next call uses (SLORA_CPU_ISA applied)
  m.def("detected_isa() -> str", &detected);  // the widest path this CPU supports
}

TORCH_LIBRARY_IMPL(slora_cpu, CPU, m) {
  m.impl("shrink", &shrink);
  m.impl("expand", &expand);
}

// A Python module so that `import vllm_slora._paged_lora_cpu` loads the library (and runs
// the registrations above); the ops themselves live in torch.ops.slora_cpu.
static struct PyModuleDef slora_cpu_module = {PyModuleDef_HEAD_INIT, "_paged_lora_cpu",
                                              "Registers torch.ops.slora_cpu.{shrink,expand,isa,detected_isa}.", -1,
                                              nullptr};

extern "C" PyMODINIT_FUNC PyInit__paged_lora_cpu(void) { return PyModule_Create(&slora_cpu_module); }
