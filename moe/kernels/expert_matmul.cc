// Batched expert matmuls for XLA:CPU, as XLA FFI handlers.
//
// Each expert multiplies its few token rows (M = tokens * capacity / experts, 32 at 128
// experts) by its own large weight matrix. XLA:CPU's batched dot packs every expert's weight
// matrix before multiplying, which costs about as much as the multiply when M is small. These
// kernels use register tiles of outer products, each loaded weight element used for every
// token row in the tile.
//
// Two products, row-major float32, E experts:
//   nn: x [E, M, K] . w [E, K, N]   -> y  [E, M, N]   (forward)
//   tn: x [E, M, K]^T . g [E, M, N] -> dw [E, K, N]   (weight gradient)
// The input gradient g . w^T is nn on (w, g^T), transposed back by the caller: there the
// weight rows are the tiles' broadcast operand, each read once, front to back, and g^T (small)
// is the packed panel. Measured at 128 experts on 2 cores, the product took 52-67 ms as
// dot-product tiles over the weight rows, 37-51 ms this way.
// Work is split into independent units (an expert's column panel and row block, or its block
// of weight-gradient rows) that the calling thread and XLA's intra-op thread pool claim from
// one atomic counter.

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

// ---- outer-product tiles: c[r, j] = sum_p a(r, p) * b[p, j] ---------------------------------
// a(r, p) = a[r * a_row + p * a_depth]: either layout of the small operand.
constexpr int kOuterRows = 6;
constexpr int kOuterVecs = 4;
constexpr int64_t kPanel = kOuterVecs * kLanes;
constexpr int64_t kAheadFloats = 64;

template <int R, int V>
void OuterTile(int64_t depth, const float* a, int64_t a_row, int64_t a_depth, const float* b,
               int64_t b_row, float* c, int64_t c_row) {
  Vec acc[R][V] = {};
  for (int64_t p = 0; p < depth; ++p) {
    // Rows of a read along the depth (the input gradient's weight rows) are R short streams
    // at once, too many for the hardware prefetchers at 512 floats a row: each is fetched
    // kAheadFloats ahead (measured: 58 -> 47 ms for that product at 128 experts).
    if (a_depth == 1 && p % kLanes == 0)
      for (int r = 0; r < R; ++r) __builtin_prefetch(a + r * a_row + p + kAheadFloats);
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

// nn: y[e] = x[e] . w[e]; unit = (expert, column panel, block of rows). Rows are split into
// blocks only when experts x panels would leave threads idle (few experts, or the input
// gradient's transposed output of one or two panels).
ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                   ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), wd = w.dimensions();
  if (auto e = CheckOperands(xd, wd, 2, 1,
                             "moe_expert_matmul_nn: x [E, M, K] and w [E, K, N] expected");
      e.failure())
    return e;
  const int64_t experts = xd[0], rows = xd[1], k = xd[2], cols = wd[2];
  const int64_t panels = (cols + kPanel - 1) / kPanel;
  const int64_t wanted = (4 * pool.num_threads() + experts * panels - 1) / (experts * panels);
  const int64_t most = (rows + 8 * kOuterRows - 1) / (8 * kOuterRows);  // >= 8 tiles a block
  const int64_t split = std::max<int64_t>(1, std::min(wanted, most));
  const int64_t tiles = ((rows + split - 1) / split + kOuterRows - 1) / kOuterRows;
  const int64_t block_rows = tiles * kOuterRows;
  const int64_t blocks = (rows + block_rows - 1) / block_rows;
  const float* xp = x.typed_data();
  const float* wp = w.typed_data();
  float* yp = y->typed_data();
  ParallelFor(pool, experts * panels * blocks, [=](int64_t u) {
    const int64_t e = u / (panels * blocks), col = (u / blocks % panels) * kPanel;
    const int64_t first = (u % blocks) * block_rows, last = std::min(rows, first + block_rows);
    const int64_t width = std::min(kPanel, cols - col);
    const float* xe = xp + e * rows * k;
    const float* panel = PackPanel(k, width, wp + e * k * cols + col, cols);
    float* ye = yp + e * rows * cols + col;
    for (int64_t r = first; r < last; r += kOuterRows) {
      const int n = static_cast<int>(std::min<int64_t>(kOuterRows, last - r));
      OuterBlock(n, width, k, xe + r * k, k, 1, panel, kPanel, ye + r * cols, cols);
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
XLA_FFI_DEFINE_HANDLER_SYMBOL(MoeExpertMatmulTN, WeightGradient, TwoOperandsOneResult());
