// Templated body of the paged LoRA shrink/expand CPU kernels (one work item at a time).
//
// Included once per ISA by paged_lora_cpu.cpp, inside an anonymous namespace, a per-ISA
// namespace and a `#pragma GCC target` region. Before including, that namespace defines
// `struct Vec` (the vector ISA: width W, register blocking, loads/stores per dtype) and
// this file must only use `Vec`, plain C++ and raw pointers: any std:: or c10 template
// instantiated here could be compiled with the wider ISA and then shared (COMDAT) with
// code that runs on CPUs without it. Everything here has internal linkage.
//
// Data model (see paged_lora_cpu.cpp for the checks that establish it):
//   pool        [N] flat, element type T (float / bf16_t / fp16_t)
//   row_offsets int64 [A, S, R] contiguous: pool offset of row j of A_s(a) / B_s(a)^T
//   tokens      the adapter's token ids (int64), already grouped by adapter
// ShrinkItem / ExpandItem are defined by the including file (plain structs, shared by all ISAs).
// All accumulation is fp32; weights are widened to fp32 in registers.

// -------- small helpers (internal linkage; no std:: templates) --------------------------

static inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

// Widen `n` elements of `src` into fp32 `dst`; dst is padded with zeros to a multiple of W.
template <typename T>
static inline void widen_row(float* dst, const T* src, int64_t n) {
  int64_t k = 0;
  for (; k + Vec::W <= n; k += Vec::W) Vec::store(dst + k, Vec::load(src + k));
  if (k < n) Vec::store(dst + k, Vec::load_tail(src + k, static_cast<int>(n - k)));
}

// -------- shrink --------------------------------------------------------------------------


// acc[k][i] = x_k . A_row(i) for NT tokens and NR rows; each loaded weight vector is used
// NT times, each loaded activation vector NR times.
// `next` (or nullptr): rows the caller processes next, prefetched a vector at a time so
// their first cache misses overlap this block's arithmetic (rows start at arbitrary pages).
template <int NT, int NR, typename T>
static inline void shrink_block(const float* const* xs, const T* const* a_rows, const T* const* next,
                                int64_t in_features, float* const* dst) {
  typename Vec::vf acc[NT][NR];
  for (int k = 0; k < NT; ++k)
    for (int i = 0; i < NR; ++i) acc[k][i] = Vec::zero();
  int64_t c = 0;
  for (; c + Vec::W <= in_features; c += Vec::W) {
    typename Vec::vf w[NR];
    for (int i = 0; i < NR; ++i) w[i] = Vec::load(a_rows[i] + c);
    if (next != nullptr)
      for (int i = 0; i < NR; ++i) Vec::prefetch(next[i] + c);
    for (int k = 0; k < NT; ++k) {
      const typename Vec::vf xv = Vec::load(xs[k] + c);
      for (int i = 0; i < NR; ++i) acc[k][i] = Vec::fma(xv, w[i], acc[k][i]);
    }
  }
  if (c < in_features) {  // tail: read only the row's own elements; xs is zero padded
    const int n = static_cast<int>(in_features - c);
    typename Vec::vf w[NR];
    for (int i = 0; i < NR; ++i) w[i] = Vec::load_tail(a_rows[i] + c, n);
    for (int k = 0; k < NT; ++k) {
      const typename Vec::vf xv = Vec::load(xs[k] + c);
      for (int i = 0; i < NR; ++i) acc[k][i] = Vec::fma(xv, w[i], acc[k][i]);
    }
  }
  for (int k = 0; k < NT; ++k)
    for (int i = 0; i < NR; ++i) dst[k][i] = Vec::hsum(acc[k][i]);
}

template <int NT, typename T>
static inline void shrink_tokens(const ShrinkItem& it, const T* pool, const float* const* xs,
                                 const int64_t* tok, int64_t in_features) {
  constexpr int NR = Vec::kShrinkRows;
  for (int64_t j = it.j0; j < it.j1;) {
    float* dst[NT];
    for (int k = 0; k < NT; ++k) dst[k] = it.out + tok[k] * it.out_stride_t + j;
    const T* a_rows[NR];
    if (it.j1 - j >= NR) {
      for (int i = 0; i < NR; ++i) a_rows[i] = pool + it.rows[j + i];
      const T* next[NR];
      const bool prefetch = it.j1 - j >= 2 * NR;
      if (prefetch)
        for (int i = 0; i < NR; ++i) next[i] = pool + it.rows[j + NR + i];
      float vals[NT][NR];
      float* vp[NT];
      for (int k = 0; k < NT; ++k) vp[k] = vals[k];
      shrink_block<NT, NR>(xs, a_rows, prefetch ? next : static_cast<const T* const*>(nullptr), in_features, vp);
      for (int k = 0; k < NT; ++k)
        for (int i = 0; i < NR; ++i) dst[k][i] = vals[k][i];
      j += NR;
    } else {
      a_rows[0] = pool + it.rows[j];
      float vals[NT][1];
      float* vp[NT];
      for (int k = 0; k < NT; ++k) vp[k] = vals[k];
      shrink_block<NT, 1>(xs, a_rows, static_cast<const T* const*>(nullptr), in_features, vp);
      for (int k = 0; k < NT; ++k) dst[k][0] = vals[k][0];
      j += 1;
    }
  }
}

// One item: rows [j0, j1) of A_s(a) for all tokens of the item. `x` rows are widened into
// `scratch` (kTokens rows of `padded` floats) a group of kTokens tokens at a time.
template <typename T>
static void shrink_item(const ShrinkItem& it, const T* x, int64_t x_stride, const T* pool,
                        int64_t in_features, float* scratch, int64_t padded) {
  constexpr int G = Vec::kTokens;
  const float* xs[G];
  for (int k = 0; k < G; ++k) xs[k] = scratch + k * padded;
  for (int64_t t0 = 0; t0 < it.n_tok; t0 += G) {
    const int64_t* tok = it.tokens + t0;
    const int nt = static_cast<int>(imin(G, it.n_tok - t0));
    for (int k = 0; k < nt; ++k) widen_row(scratch + k * padded, x + tok[k] * x_stride, in_features);
    switch (nt) {
      case 4: shrink_tokens<4 <= G ? 4 : 1>(it, pool, xs, tok, in_features); break;
      case 3: shrink_tokens<3 <= G ? 3 : 1>(it, pool, xs, tok, in_features); break;
      case 2: shrink_tokens<2 <= G ? 2 : 1>(it, pool, xs, tok, in_features); break;
      default: shrink_tokens<1>(it, pool, xs, tok, in_features); break;
    }
  }
}

// -------- expand --------------------------------------------------------------------------


// y[t, c : c + NV*W] += scale * sum_j buf[t, j] * B^T[j, c : c + NV*W] for NT tokens.
// `n_tail` > 0: a single partial vector of n_tail columns (NV == 1).
template <int NT, int NV, typename T>
static inline void expand_block(const ExpandItem& it, const T* pool, const float* const* bt, T* const* yt,
                                int64_t c, int n_tail) {
  typename Vec::vf acc[NT][NV];
  for (int k = 0; k < NT; ++k)
    for (int v = 0; v < NV; ++v) acc[k][v] = Vec::zero();
  for (int64_t j = 0; j < it.rank; ++j) {
    const T* row = pool + it.rows[j] + c;
    typename Vec::vf w[NV];
    if (n_tail) {
      w[0] = Vec::load_tail(row, n_tail);
    } else {
      for (int v = 0; v < NV; ++v) w[v] = Vec::load(row + v * Vec::W);
      // The next column block of this row is read after all `rank` rows of this one: ask
      // for it now (rows sit in different pages; the hardware prefetcher cannot follow).
      for (int v = 0; v < NV; ++v) Vec::prefetch(row + (NV + v) * Vec::W);
    }
    for (int k = 0; k < NT; ++k) {
      const typename Vec::vf h = Vec::bcast(bt[k][j]);
      for (int v = 0; v < NV; ++v) acc[k][v] = Vec::fma(h, w[v], acc[k][v]);
    }
  }
  const typename Vec::vf scale = Vec::bcast(it.scale);
  for (int k = 0; k < NT; ++k) {
    T* dst = yt[k] + c;
    if (n_tail) {
      Vec::store_tail(dst, Vec::fma(scale, acc[k][0], Vec::load_tail(dst, n_tail)), n_tail);
    } else {
      for (int v = 0; v < NV; ++v) {
        T* p = dst + v * Vec::W;
        Vec::store(p, Vec::fma(scale, acc[k][v], Vec::load(p)));
      }
    }
  }
}

template <int NT, typename T>
static inline void expand_tokens(const ExpandItem& it, const T* pool, const float* const* bt, T* const* yt) {
  constexpr int64_t kBlock = Vec::kExpandVecs * Vec::W;
  int64_t c = it.c0;
  for (; c + kBlock <= it.c1; c += kBlock) expand_block<NT, Vec::kExpandVecs>(it, pool, bt, yt, c, 0);
  for (; c + Vec::W <= it.c1; c += Vec::W) expand_block<NT, 1>(it, pool, bt, yt, c, 0);
  if (c < it.c1) expand_block<NT, 1>(it, pool, bt, yt, c, static_cast<int>(it.c1 - c));
}

// One item: columns [c0, c1) of slice s for all tokens of the item. `y_slice` is y[:, slice s].
template <typename T>
static void expand_item(const ExpandItem& it, T* y_slice, int64_t y_stride, const T* pool) {
  constexpr int G = Vec::kTokens;
  for (int64_t t0 = 0; t0 < it.n_tok; t0 += G) {
    const int64_t* tok = it.tokens + t0;
    const int nt = static_cast<int>(imin(G, it.n_tok - t0));
    const float* bt[G];
    T* yt[G];
    for (int k = 0; k < nt; ++k) {
      bt[k] = it.buf + tok[k] * it.buf_stride_t;
      yt[k] = y_slice + tok[k] * y_stride;
    }
    switch (nt) {
      case 4: expand_tokens<4 <= G ? 4 : 1>(it, pool, bt, yt); break;
      case 3: expand_tokens<3 <= G ? 3 : 1>(it, pool, bt, yt); break;
      case 2: expand_tokens<2 <= G ? 2 : 1>(it, pool, bt, yt); break;
      default: expand_tokens<1>(it, pool, bt, yt); break;
    }
  }
}
