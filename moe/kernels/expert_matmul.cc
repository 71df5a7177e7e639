// Batched expert matmuls for XLA:CPU, as XLA FFI handlers.
//
// Each expert multiplies its few token rows (M = tokens * capacity / experts, 32 at 128
// experts) by its own large weight matrix. XLA:CPU's batched dot packs every expert's weight
// matrix before multiplying, which costs about as much as the multiply when M is small. These
// kernels read the weights where they lie: register tiles of outer products (forward and
// weight gradient) or of dot products (input gradient), each weight element loaded once per
// tile row block and used for every token row in the tile.
//
// Three products, row-major float32, E experts:
//   nn: x [E, M, K] . w [E, K, N]   -> y  [E, M, N]   (forward)
//   nt: g [E, M, N] . w [E, K, N]^T -> dx [E, M, K]   (input gradient)
//   tn: x [E, M, K]^T . g [E, M, N] -> dw [E, K, N]   (weight gradient)
// Work is split into independent units (an expert's column panel or row block) that the
// calling thread and XLA's intra-op thread pool claim from one atomic counter.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#if defined(__AVX__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

#if defined(__AVX512F__)
constexpr int kLanes = 16;
#elif defined(__AVX__)
constexpr int kLanes = 8;
#else
constexpr int kLanes = 4;
#endif
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));

inline Vec Load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void Store(float* p, Vec v) { std::memcpy(p, &v, sizeof(v)); }
// A broadcast load (vbroadcastss from memory: a load port, not the shuffle port the FMAs share).
inline Vec Splat(const float* p) {
#if defined(__AVX512F__)
  return (Vec)_mm512_set1_ps(*p);
#elif defined(__AVX__)
  return (Vec)_mm256_set1_ps(*p);
#else
  typedef int Lanes __attribute__((vector_size(kLanes * sizeof(int))));
  return __builtin_shuffle(Vec{*p}, Lanes{});
#endif
}
inline float Sum(Vec v) {
  float s = 0.0f;
  for (int l = 0; l < kLanes; ++l) s += v[l];
  return s;
}

// ---- outer-product tiles: c[r, j] = sum_p a(r, p) * b[p, j] ---------------------------------
// a(r, p) = a[r * a_row + p * a_depth]: either layout of the small operand.
constexpr int kOuterRows = 6;
constexpr int kOuterVecs = 4;
constexpr int64_t kPanel = kOuterVecs * kLanes;

template <int R, int V>
void OuterTile(int64_t depth, const float* a, int64_t a_row, int64_t a_depth, const float* b,
               int64_t b_row, float* c, int64_t c_row) {
  Vec acc[R][V] = {};
  for (int64_t p = 0; p < depth; ++p) {
    Vec bv[V];
    for (int v = 0; v < V; ++v) bv[v] = Load(b + p * b_row + v * kLanes);
    for (int r = 0; r < R; ++r) {
      const Vec av = Splat(a + r * a_row + p * a_depth);
      for (int v = 0; v < V; ++v) acc[r][v] += av * bv[v];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) Store(c + r * c_row + v * kLanes, acc[r][v]);
}

template <int V>
void OuterRows(int rows, int64_t depth, const float* a, int64_t a_row, int64_t a_depth,
               const float* b, int64_t b_row, float* c, int64_t c_row) {
  switch (rows) {
    case 6: return OuterTile<6, V>(depth, a, a_row, a_depth, b, b_row, c, c_row);
    case 5: return OuterTile<5, V>(depth, a, a_row, a_depth, b, b_row, c, c_row);
    case 4: return OuterTile<4, V>(depth, a, a_row, a_depth, b, b_row, c, c_row);
    case 3: return OuterTile<3, V>(depth, a, a_row, a_depth, b, b_row, c, c_row);
    case 2: return OuterTile<2, V>(depth, a, a_row, a_depth, b, b_row, c, c_row);
    default: return OuterTile<1, V>(depth, a, a_row, a_depth, b, b_row, c, c_row);
  }
}

// Rows [0, rows) x columns [col, col + width) of c, width <= kPanel; columns past the last
// whole vector are summed one by one.
void OuterBlock(int rows, int64_t width, int64_t depth, const float* a, int64_t a_row,
                int64_t a_depth, const float* b, int64_t b_row, float* c, int64_t c_row) {
  const int vecs = static_cast<int>(width / kLanes);
  switch (vecs) {
    case 4: OuterRows<4>(rows, depth, a, a_row, a_depth, b, b_row, c, c_row); break;
    case 3: OuterRows<3>(rows, depth, a, a_row, a_depth, b, b_row, c, c_row); break;
    case 2: OuterRows<2>(rows, depth, a, a_row, a_depth, b, b_row, c, c_row); break;
    case 1: OuterRows<1>(rows, depth, a, a_row, a_depth, b, b_row, c, c_row); break;
    default: break;
  }
  for (int64_t j = static_cast<int64_t>(vecs) * kLanes; j < width; ++j) {
    for (int r = 0; r < rows; ++r) {
      float s = 0.0f;
      for (int64_t p = 0; p < depth; ++p) s += a[r * a_row + p * a_depth] * b[p * b_row + j];
      c[r * c_row + j] = s;
    }
  }
}

// ---- dot-product tiles: c[m, i] = sum_p a[m, p] * b[i, p] -----------------------------------
constexpr int kDotRows = 4;   // rows of a (tokens)
constexpr int kDotCols = 6;   // rows of b (weight rows)

template <int RM, int RI>
void DotTile(int64_t depth, const float* a, int64_t a_row, const float* b, int64_t b_row,
             float* c, int64_t c_row) {
  Vec acc[RM][RI] = {};
  int64_t p = 0;
  for (; p + kLanes <= depth; p += kLanes) {
    Vec av[RM], bv[RI];
    for (int m = 0; m < RM; ++m) av[m] = Load(a + m * a_row + p);
    for (int i = 0; i < RI; ++i) bv[i] = Load(b + i * b_row + p);
    for (int m = 0; m < RM; ++m)
      for (int i = 0; i < RI; ++i) acc[m][i] += av[m] * bv[i];
  }
  for (int m = 0; m < RM; ++m) {
    for (int i = 0; i < RI; ++i) {
      float s = Sum(acc[m][i]);
      for (int64_t q = p; q < depth; ++q) s += a[m * a_row + q] * b[i * b_row + q];
      c[m * c_row + i] = s;
    }
  }
}

template <int RI>
void DotRows(int rows, int64_t depth, const float* a, int64_t a_row, const float* b,
             int64_t b_row, float* c, int64_t c_row) {
  switch (rows) {
    case 4: return DotTile<4, RI>(depth, a, a_row, b, b_row, c, c_row);
    case 3: return DotTile<3, RI>(depth, a, a_row, b, b_row, c, c_row);
    case 2: return DotTile<2, RI>(depth, a, a_row, b, b_row, c, c_row);
    default: return DotTile<1, RI>(depth, a, a_row, b, b_row, c, c_row);
  }
}

void DotBlock(int rows, int cols, int64_t depth, const float* a, int64_t a_row, const float* b,
              int64_t b_row, float* c, int64_t c_row) {
  switch (cols) {
    case 6: return DotRows<6>(rows, depth, a, a_row, b, b_row, c, c_row);
    case 5: return DotRows<5>(rows, depth, a, a_row, b, b_row, c, c_row);
    case 4: return DotRows<4>(rows, depth, a, a_row, b, b_row, c, c_row);
    case 3: return DotRows<3>(rows, depth, a, a_row, b, b_row, c, c_row);
    case 2: return DotRows<2>(rows, depth, a, a_row, b, b_row, c, c_row);
    default: return DotRows<1>(rows, depth, a, a_row, b, b_row, c, c_row);
  }
}

// ---- work split ----------------------------------------------------------------------------

// Runs body(u) for u in [0, units): the calling thread and up to num_threads - 1 pool tasks
// claim units from one counter. The caller waits only for units already claimed (their
// threads are running them), so it cannot wait on a task the pool has not started.
template <typename Body>
void ParallelFor(ffi::ThreadPool& pool, int64_t units, Body body) {
  const int64_t threads = std::min<int64_t>(std::max<int64_t>(pool.num_threads(), 1), units);
  if (threads <= 1) {
    for (int64_t u = 0; u < units; ++u) body(u);
    return;
  }
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    int64_t units;
    Body body;
    State(int64_t n, Body b) : units(n), body(b) {}
  };
  auto state = std::make_shared<State>(units, body);
  auto work = [state]() {
    for (int64_t u; (u = state->next.fetch_add(1)) < state->units;) {
      state->body(u);
      state->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t t = 1; t < threads; ++t) pool.Schedule([work]() { work(); });
  work();
  while (state->done.load(std::memory_order_acquire) < units) std::this_thread::yield();
}

// Both operands are [E, ., .] with the same E, and a's dimension a_dim equals b's b_dim (the
// contraction, or the token rows of the weight gradient); else the error names the shapes.
ffi::Error CheckOperands(ffi::Span<const int64_t> a, ffi::Span<const int64_t> b, int a_dim,
                         int b_dim, const char* expected) {
  const bool ok = a.size() == 3 && b.size() == 3 && a[0] == b[0] && a[a_dim] == b[b_dim];
  return ok ? ffi::Error::Success() : ffi::Error::InvalidArgument(expected);
}

// A column panel of b (depth rows x width <= kPanel columns, row stride b_row) copied into a
// contiguous per-thread buffer: the tiles then read it sequentially from cache, instead of one
// 4 KiB page per depth step (a TLB miss each) from the strided original.
const float* PackPanel(int64_t depth, int64_t width, const float* b, int64_t b_row) {
  thread_local std::vector<float> buffer;
  if (static_cast<int64_t>(buffer.size()) < depth * kPanel) buffer.resize(depth * kPanel);
  float* out = buffer.data();
  constexpr int64_t kAhead = 16;  // rows prefetched ahead: the panel's rows lie in distinct pages
  for (int64_t p = 0; p < depth; ++p) {
    if (p + kAhead < depth) {
      for (int64_t j = 0; j < width; j += 16) __builtin_prefetch(b + (p + kAhead) * b_row + j);
    }
    std::memcpy(out + p * kPanel, b + p * b_row, width * 4);
  }
  return out;
}

// nn: y[e] = x[e] . w[e]; unit = (expert, column panel), rows inside.
ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                   ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), wd = w.dimensions();
  if (auto e = CheckOperands(xd, wd, 2, 1,
                             "moe_expert_matmul_nn: x [E, M, K] and w [E, K, N] expected");
      e.failure())
    return e;
  const int64_t experts = xd[0], rows = xd[1], k = xd[2], cols = wd[2];
  const int64_t panels = (cols + kPanel - 1) / kPanel;
  const float* xp = x.typed_data();
  const float* wp = w.typed_data();
  float* yp = y->typed_data();
  ParallelFor(pool, experts * panels, [=](int64_t u) {
    const int64_t e = u / panels, col = (u % panels) * kPanel;
    const int64_t width = std::min(kPanel, cols - col);
    const float* xe = xp + e * rows * k;
    const float* panel = PackPanel(k, width, wp + e * k * cols + col, cols);
    float* ye = yp + e * rows * cols + col;
    for (int64_t r = 0; r < rows; r += kOuterRows) {
      const int n = static_cast<int>(std::min<int64_t>(kOuterRows, rows - r));
      OuterBlock(n, width, k, xe + r * k, k, 1, panel, kPanel, ye + r * cols, cols);
    }
  });
  return ffi::Error::Success();
}

// nt: dx[e] = g[e] . w[e]^T; unit = (expert, block of weight rows), token rows inside.
ffi::Error InputGradient(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> g, ffi::Buffer<ffi::F32> w,
                         ffi::ResultBuffer<ffi::F32> dx) {
  auto gd = g.dimensions(), wd = w.dimensions();
  if (auto e = CheckOperands(gd, wd, 2, 2,
                             "moe_expert_matmul_nt: g [E, M, N] and w [E, K, N] expected");
      e.failure())
    return e;
  const int64_t experts = gd[0], rows = gd[1], cols = gd[2], k = wd[1];
  const int64_t blocks = (k + kDotCols - 1) / kDotCols;
  const float* gp = g.typed_data();
  const float* wp = w.typed_data();
  float* dxp = dx->typed_data();
  ParallelFor(pool, experts * blocks, [=](int64_t u) {
    const int64_t e = u / blocks, i = (u % blocks) * kDotCols;
    const int n = static_cast<int>(std::min<int64_t>(kDotCols, k - i));
    const float* ge = gp + e * rows * cols;
    const float* we = wp + e * k * cols + i * cols;
    float* dxe = dxp + e * rows * k + i;
    for (int64_t m = 0; m < rows; m += kDotRows) {
      const int mr = static_cast<int>(std::min<int64_t>(kDotRows, rows - m));
      DotBlock(mr, n, cols, ge + m * cols, cols, we, cols, dxe + m * k, k);
    }
  });
  return ffi::Error::Success();
}

// tn: dw[e] = x[e]^T . g[e]; unit = (expert, block of weight rows), all columns inside, so
// each unit writes whole rows of dw.
ffi::Error WeightGradient(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> g,
                          ffi::ResultBuffer<ffi::F32> dw) {
  auto xd = x.dimensions(), gd = g.dimensions();
  if (auto e = CheckOperands(xd, gd, 1, 1,
                             "moe_expert_matmul_tn: x [E, M, K] and g [E, M, N] expected");
      e.failure())
    return e;
  const int64_t experts = xd[0], rows = xd[1], k = xd[2], cols = gd[2];
  const int64_t blocks = (k + kOuterRows - 1) / kOuterRows;
  const float* xp = x.typed_data();
  const float* gp = g.typed_data();
  float* dwp = dw->typed_data();
  ParallelFor(pool, experts * blocks, [=](int64_t u) {
    const int64_t e = u / blocks, i = (u % blocks) * kOuterRows;
    const int n = static_cast<int>(std::min<int64_t>(kOuterRows, k - i));
    const float* xe = xp + e * rows * k + i;
    const float* ge = gp + e * rows * cols;
    float* dwe = dwp + e * k * cols + i * cols;
    for (int64_t col = 0; col < cols; col += kPanel) {
      const int64_t width = std::min(kPanel, cols - col);
      OuterBlock(n, width, rows, xe, 1, k, ge + col, cols, dwe + col, cols);
    }
  });
  return ffi::Error::Success();
}

}  // namespace

// Every product: XLA's thread pool, two float32 operands, one float32 result.
static auto TwoOperandsOneResult() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Ret<ffi::Buffer<ffi::F32>>();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(MoeExpertMatmulNN, Forward, TwoOperandsOneResult());
XLA_FFI_DEFINE_HANDLER_SYMBOL(MoeExpertMatmulNT, InputGradient, TwoOperandsOneResult());
XLA_FFI_DEFINE_HANDLER_SYMBOL(MoeExpertMatmulTN, WeightGradient, TwoOperandsOneResult());
