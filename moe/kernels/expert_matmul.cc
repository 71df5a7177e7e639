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
// dot-product tiles over the weight rows, 37-47 ms this way (with the tiles' prefetch).
// Work is split into independent units (an expert's column chunk and row block, or its block
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

template <int R, int V, bool kAccumulate>
void OuterTile(int64_t depth, const float* a, int64_t a_row, int64_t a_depth, const float* b,
               int64_t b_row, float* c, int64_t c_row) {
  Vec acc[R][V] = {};
  if (kAccumulate)
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < V; ++v) acc[r][v] = Load(c + r * c_row + v * kLanes);
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

template <int V, bool kAccumulate>
void OuterRows(int rows, int64_t depth, const float* a, int64_t a_row, int64_t a_depth,
               const float* b, int64_t b_row, float* c, int64_t c_row) {
  switch (rows) {
    case 6: return OuterTile<6, V, kAccumulate>(depth, a, a_row, a_depth, b, b_row, c, c_row);
    case 5: return OuterTile<5, V, kAccumulate>(depth, a, a_row, a_depth, b, b_row, c, c_row);
    case 4: return OuterTile<4, V, kAccumulate>(depth, a, a_row, a_depth, b, b_row, c, c_row);
    case 3: return OuterTile<3, V, kAccumulate>(depth, a, a_row, a_depth, b, b_row, c, c_row);
    case 2: return OuterTile<2, V, kAccumulate>(depth, a, a_row, a_depth, b, b_row, c, c_row);
    default: return OuterTile<1, V, kAccumulate>(depth, a, a_row, a_depth, b, b_row, c, c_row);
  }
}

template <bool kAccumulate>
void OuterVecs(int vecs, int rows, int64_t depth, const float* a, int64_t a_row,
               int64_t a_depth, const float* b, int64_t b_row, float* c, int64_t c_row) {
  switch (vecs) {
    case 4: return OuterRows<4, kAccumulate>(rows, depth, a, a_row, a_depth, b, b_row, c, c_row);
    case 3: return OuterRows<3, kAccumulate>(rows, depth, a, a_row, a_depth, b, b_row, c, c_row);
    case 2: return OuterRows<2, kAccumulate>(rows, depth, a, a_row, a_depth, b, b_row, c, c_row);
    case 1: return OuterRows<1, kAccumulate>(rows, depth, a, a_row, a_depth, b, b_row, c, c_row);
    default: return;
  }
}

// Rows [0, rows) x columns [col, col + width) of c, width <= kPanel, written (accumulate
// false) or added to (true); columns past the last whole vector are summed one by one.
void OuterBlock(int rows, int64_t width, int64_t depth, const float* a, int64_t a_row,
                int64_t a_depth, const float* b, int64_t b_row, float* c, int64_t c_row,
                bool accumulate) {
  const int vecs = static_cast<int>(width / kLanes);
  if (accumulate) OuterVecs<true>(vecs, rows, depth, a, a_row, a_depth, b, b_row, c, c_row);
  else OuterVecs<false>(vecs, rows, depth, a, a_row, a_depth, b, b_row, c, c_row);
  for (int64_t j = static_cast<int64_t>(vecs) * kLanes; j < width; ++j) {
    for (int r = 0; r < rows; ++r) {
      float s = accumulate ? c[r * c_row + j] : 0.0f;
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

// Rows [0, depth) x columns [0, width) of b (row stride b_row) copied panel by panel into a
// per-thread buffer, [panels][depth][kPanel]: the tiles then read each panel sequentially
// from cache instead of one row per depth step at b's stride. A single panel's rows lie in
// distinct pages and are prefetched ahead; whole rows stream in order by themselves.
const float* PackBlock(int64_t depth, int64_t width, const float* b, int64_t b_row) {
  const int64_t panels = (width + kPanel - 1) / kPanel;
  thread_local std::vector<float> buffer;
  if (static_cast<int64_t>(buffer.size()) < panels * depth * kPanel)
    buffer.resize(panels * depth * kPanel);
  float* out = buffer.data();
  constexpr int64_t kAhead = 16;  // rows
  for (int64_t p = 0; p < depth; ++p) {
    if (panels == 1 && p + kAhead < depth) {
      for (int64_t j = 0; j < width; j += 16) __builtin_prefetch(b + (p + kAhead) * b_row + j);
    }
    for (int64_t j = 0; j < panels; ++j) {
      const int64_t n = std::min(kPanel, width - j * kPanel);
      std::memcpy(out + (j * depth + p) * kPanel, b + p * b_row + j * kPanel, n * 4);
    }
  }
  return out;
}

// The forward's unit shape: columns of w per unit and depth (rows of w) per packed block.
// With few rows (at most kStreamedRows) and a wide w (a weight matrix, at least kWideColumns),
// packing costs about as much as the multiply, so w is packed kDepthBlock rows at a time
// across whole rows, read in order, and each block's product is added into y (the chunk
// narrows only to keep an expert's y chunk within 1 MiB of L2). Measured at 128 experts
// (32 rows) on 2 cores: 55-63 against 62-68 ms per product, 318-324 against 340-347 ms per
// layer step; at 64 rows it was even and at 128 rows slower (45-48 against 40 ms). Otherwise
// w is packed one 64-column panel at a time over the whole depth, which also keeps the long
// row streams of the input gradient's left operand (the weight rows) whole.
constexpr int64_t kWideColumns = 8 * kPanel;
constexpr int64_t kStreamedRows = 32;
constexpr int64_t kDepthBlock = 64;

struct ForwardShape {
  int64_t chunk, depth_block;
};

ForwardShape ForwardUnits(int64_t rows, int64_t k, int64_t cols) {
  if (cols < kWideColumns || rows > kStreamedRows) return {kPanel, k};
  int64_t chunk = cols;
  while (chunk > kPanel && rows * chunk * 4 > (int64_t{1} << 20))
    chunk = std::max(kPanel, (chunk / 2 + kPanel - 1) / kPanel * kPanel);
  return {chunk, kDepthBlock};
}

// nn: y[e] = x[e] . w[e]; unit = (expert, column chunk, block of rows). Rows are split into
// blocks only when experts x chunks would leave threads idle (few experts, or the input
// gradient's transposed output of one or two panels).
ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                   ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), wd = w.dimensions();
  if (auto e = CheckOperands(xd, wd, 2, 1,
                             "moe_expert_matmul_nn: x [E, M, K] and w [E, K, N] expected");
      e.failure())
    return e;
  const int64_t experts = xd[0], rows = xd[1], k = xd[2], cols = wd[2];
  const ForwardShape shape = ForwardUnits(rows, k, cols);
  const int64_t chunks = (cols + shape.chunk - 1) / shape.chunk;
  const int64_t wanted = (4 * pool.num_threads() + experts * chunks - 1) / (experts * chunks);
  const int64_t most = (rows + 8 * kOuterRows - 1) / (8 * kOuterRows);  // >= 8 tiles a block
  const int64_t split = std::max<int64_t>(1, std::min(wanted, most));
  const int64_t tiles = ((rows + split - 1) / split + kOuterRows - 1) / kOuterRows;
  const int64_t block_rows = tiles * kOuterRows;
  const int64_t blocks = (rows + block_rows - 1) / block_rows;
  const float* xp = x.typed_data();
  const float* wp = w.typed_data();
  float* yp = y->typed_data();
  ParallelFor(pool, experts * chunks * blocks, [=](int64_t u) {
    const int64_t e = u / (chunks * blocks), c0 = (u / blocks % chunks) * shape.chunk;
    const int64_t first = (u % blocks) * block_rows, last = std::min(rows, first + block_rows);
    const int64_t width = std::min(shape.chunk, cols - c0);
    const float* xe = xp + e * rows * k;
    float* ye = yp + e * rows * cols + c0;
    for (int64_t k0 = 0; k0 < k; k0 += shape.depth_block) {
      const int64_t depth = std::min(shape.depth_block, k - k0);
      const float* packed = PackBlock(depth, width, wp + e * k * cols + k0 * cols + c0, cols);
      for (int64_t col = 0; col < width; col += kPanel) {
        const int64_t panel_width = std::min(kPanel, width - col);
        for (int64_t r = first; r < last; r += kOuterRows) {
          const int n = static_cast<int>(std::min<int64_t>(kOuterRows, last - r));
          OuterBlock(n, panel_width, depth, xe + r * k + k0, k, 1, packed + col * depth,
                     kPanel, ye + r * cols + col, cols, k0 > 0);
        }
      }
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
      OuterBlock(n, width, rows, xe, 1, k, ge + col, cols, dwe + col, cols, false);
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
