// Batched expert matmuls for XLA:CPU, as XLA FFI handlers.
//
// Each expert multiplies its few token rows (M = tokens * capacity / experts, 32 at 128
// experts) by its own large weight matrix. XLA:CPU's batched dot packs every expert's weight
// matrix before multiplying, which costs about as much as the multiply when M is small. These
// kernels use register tiles of outer products, each loaded weight element used for every
// token row in the tile.
//
// Three products, row-major float32, E experts:
//   nn: x [E, M, K] . w [E, K, N]   -> y  [E, M, N]   (forward)
//   nt: w [E, K, N] . g [E, M, N]^T -> dx^T [E, K, M] (input gradient, transposed)
//   tn: x [E, M, K]^T . g [E, M, N] -> dw [E, K, N]   (weight gradient)
// nt is the forward's code with g^T packed from g's rows: the weight rows are the tiles'
// broadcast operand, each read once, front to back, and g^T (small) is the packed panel.
// Measured at 128 experts on 2 cores, the input gradient took 52-67 ms as dot-product tiles
// over the weight rows, 37-47 ms this way (with the tiles' prefetch); packing g^T here
// instead of transposing g in XLA first saves the transposes' 42 MB of copies. Storing dx
// itself from the tiles, transposed, made the layer step slower (292-305 against 275-283 ms
// one float at a time, 268-279 against 257-269 ms with AVX-512 scatters).
// The forward and the weight gradient skip x's rows that are all zero (the capacity slots
// dispatch left unfilled; see NonzeroRows).
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
// A non-temporal store of a whole vector to an address aligned to its size: written to memory
// without first reading the line into cache (kStreamAlignment bytes, 1 where there is none).
// Such stores are weakly ordered: a thread fences them before it reports its work done.
#if defined(__AVX512F__)
constexpr int64_t kStreamAlignment = 64;
inline void StreamStore(float* p, Vec v) { _mm512_stream_ps(p, (__m512)v); }
inline void StreamFence() { _mm_sfence(); }
#elif defined(__AVX__)
constexpr int64_t kStreamAlignment = 32;
inline void StreamStore(float* p, Vec v) { _mm256_stream_ps(p, (__m256)v); }
inline void StreamFence() { _mm_sfence(); }
#else
constexpr int64_t kStreamAlignment = 1;
inline void StreamStore(float* p, Vec v) { Store(p, v); }
inline void StreamFence() {}
#endif
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
// a(r, p) = a[r * a_row + p * a_depth]: either layout of the small operand. kMode says how the
// tile's sums reach c.
enum class Output {
  kWrite,   // c = sum
  kAdd,     // c += sum
  kStream,  // c = sum, stored non-temporally (c's rows and columns aligned to whole vectors)
};
constexpr int kOuterRows = 6;
constexpr int kOuterVecs = 4;
constexpr int64_t kPanel = kOuterVecs * kLanes;
constexpr int64_t kAheadFloats = 64;
// Tiles of at most two vectors (a weight block read in place, or the input gradient's
// transposed output at 32 rows or fewer) take 14 rows: 28 accumulators of AVX-512's 32
// registers (6 x 2 of AVX's 16). At 128 experts the input gradient went 44-49 -> 40-48 ms.
constexpr int kNarrowTileRows = kLanes == 16 ? 14 : kOuterRows;
constexpr int64_t kNarrowTileCols = 2 * kLanes;
// Rows of at least a page (4 KiB) are long streams that the hardware prefetchers follow.
constexpr int64_t kLongRowColumns = 4096 / sizeof(float);

// The i-th depth step a tile takes: i itself, or depth_index[i] when the tile is given a list
// of steps (the weight gradient's token rows that are not all zero).
inline int64_t DepthStep(const int32_t* depth_index, int64_t i) {
  return depth_index == nullptr ? i : depth_index[i];
}

// b_ahead > 0: b is a weight block read in place, and each depth step prefetches the lines
// b_ahead floats past those it reads (further along the row, or the next block's row).
// depth_index, when given, lists the depth steps to take (see DepthStep).
template <int R, int V, Output kMode>
void OuterTile(int64_t depth, const int32_t* depth_index, const float* a, int64_t a_row,
               int64_t a_depth, int64_t a_ahead, const float* b, int64_t b_row, int64_t b_ahead,
               float* c, int64_t c_row) {
  Vec acc[R][V] = {};
  if (kMode == Output::kAdd)
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < V; ++v) acc[r][v] = Load(c + r * c_row + v * kLanes);
  for (int64_t i = 0; i < depth; ++i) {
    const int64_t p = DepthStep(depth_index, i);
    // Rows of a read along the depth (the input gradient's weight rows) are R streams at
    // once, too many for the hardware prefetchers: a_ahead > 0 fetches each row's line a_ahead
    // floats ahead (measured at 128 experts: g.wo^T 58 -> 47 ms kAheadFloats ahead in its
    // earlier form; see x_ahead in Product).
    if (a_ahead > 0 && p % kLanes == 0)
      for (int r = 0; r < R; ++r) __builtin_prefetch(a + r * a_row + p + a_ahead);
    if (b_ahead > 0)
      for (int v = 0; v < V; ++v) __builtin_prefetch(b + p * b_row + b_ahead + v * kLanes);
    Vec bv[V];
    for (int v = 0; v < V; ++v) bv[v] = Load(b + p * b_row + v * kLanes);
    for (int r = 0; r < R; ++r) {
      const Vec av = Splat(a + r * a_row + p * a_depth);
      for (int v = 0; v < V; ++v) acc[r][v] += av * bv[v];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) {
      if (kMode == Output::kStream) StreamStore(c + r * c_row + v * kLanes, acc[r][v]);
      else Store(c + r * c_row + v * kLanes, acc[r][v]);
    }
}

// The tile for `rows` (1..kMaxRows) rows of V vectors.
template <int kMaxRows, int V, Output kMode>
void OuterRows(int rows, int64_t depth, const int32_t* depth_index, const float* a,
               int64_t a_row, int64_t a_depth, int64_t a_ahead, const float* b, int64_t b_row,
               int64_t b_ahead, float* c, int64_t c_row) {
  if constexpr (kMaxRows > 1) {
    if (rows < kMaxRows)
      return OuterRows<kMaxRows - 1, V, kMode>(rows, depth, depth_index, a, a_row, a_depth,
                                               a_ahead, b, b_row, b_ahead, c, c_row);
  }
  OuterTile<kMaxRows, V, kMode>(depth, depth_index, a, a_row, a_depth, a_ahead, b, b_row,
                                b_ahead, c, c_row);
}

// Tiles of 3-4 vectors take up to kOuterRows rows, tiles of 1-2 vectors up to kNarrowTileRows.
template <Output kMode>
void OuterVecs(int vecs, int rows, int64_t depth, const int32_t* depth_index, const float* a,
               int64_t a_row, int64_t a_depth, int64_t a_ahead, const float* b, int64_t b_row,
               int64_t b_ahead, float* c, int64_t c_row) {
  switch (vecs) {
    case 4: return OuterRows<kOuterRows, 4, kMode>(rows, depth, depth_index, a, a_row, a_depth,
                                                   a_ahead, b, b_row, b_ahead, c, c_row);
    case 3: return OuterRows<kOuterRows, 3, kMode>(rows, depth, depth_index, a, a_row, a_depth,
                                                   a_ahead, b, b_row, b_ahead, c, c_row);
    case 2: return OuterRows<kNarrowTileRows, 2, kMode>(rows, depth, depth_index, a, a_row,
                                                         a_depth, a_ahead, b, b_row, b_ahead, c,
                                                         c_row);
    case 1: return OuterRows<kNarrowTileRows, 1, kMode>(rows, depth, depth_index, a, a_row,
                                                         a_depth, a_ahead, b, b_row, b_ahead, c,
                                                         c_row);
    default: return;
  }
}

// Rows [0, rows) x columns [col, col + width) of c, width <= kPanel, as `mode` says; columns
// past the last whole vector are summed one by one (and stored plainly).
void OuterBlock(int rows, int64_t width, int64_t depth, const int32_t* depth_index,
                const float* a, int64_t a_row, int64_t a_depth, int64_t a_ahead, const float* b,
                int64_t b_row, int64_t b_ahead, float* c, int64_t c_row, Output mode) {
  const int vecs = static_cast<int>(width / kLanes);
  switch (mode) {
    case Output::kWrite:
      OuterVecs<Output::kWrite>(vecs, rows, depth, depth_index, a, a_row, a_depth, a_ahead, b,
                                b_row, b_ahead, c, c_row);
      break;
    case Output::kAdd:
      OuterVecs<Output::kAdd>(vecs, rows, depth, depth_index, a, a_row, a_depth, a_ahead, b,
                              b_row, b_ahead, c, c_row);
      break;
    case Output::kStream:
      OuterVecs<Output::kStream>(vecs, rows, depth, depth_index, a, a_row, a_depth, a_ahead, b,
                                 b_row, b_ahead, c, c_row);
      break;
  }
  for (int64_t j = static_cast<int64_t>(vecs) * kLanes; j < width; ++j) {
    for (int r = 0; r < rows; ++r) {
      float s = mode == Output::kAdd ? c[r * c_row + j] : 0.0f;
      for (int64_t i = 0; i < depth; ++i) {
        const int64_t p = DepthStep(depth_index, i);
        s += a[r * a_row + p * a_depth] * b[p * b_row + j];
      }
      c[r * c_row + j] = s;
    }
  }
}

// ---- rows that are all zero ----------------------------------------------------------------
// Capacity dispatch leaves an expert's unfilled slots as zero rows: at 128 experts, top-1,
// capacity factor 1 and 512-token groups, a fifth of the rows of a freshly initialized layer.
// A zero row of x adds nothing to x . w (its row of y is zero) nor to x^T . g, so the forward
// and the weight gradient skip them and do only the filled rows' work (at 128 experts on 2
// cores the layer step went 294-304 -> 262-281 ms in alternating runs). Only rows that compare
// equal to zero everywhere are skipped: a NaN keeps its row. (A zero row times an infinite
// weight would give NaN where the skip gives 0; such a weight makes the filled rows non-finite
// too.) The input gradient's token rows are its output's columns, whole vectors wide, so there
// a skipped row would rarely save a vector; it computes them all.

// Lists in `kept` the rows of x [n, len] that hold a nonzero element, and returns how many
// there are.
int64_t NonzeroRows(const float* x, int64_t n, int64_t len, int32_t* kept) {
  int64_t count = 0;
  for (int64_t r = 0; r < n; ++r) {
    const float* row = x + r * len;
    int64_t j = 0;
    while (j < len && row[j] == 0.0f) ++j;
    if (j < len) kept[count++] = static_cast<int32_t>(r);
  }
  return count;
}

// A unit's rows of x with the zero rows left out, packed contiguously: the forward's tiles
// then run over the kept rows only. Each thread keeps the last packing it made, so that the
// units it takes of the same expert and row block in one call (their column chunks) pack once.
struct PackedRows {
  uint64_t call = ~uint64_t{0};
  int64_t expert = -1, first = -1, live = 0;
  std::vector<int32_t> kept;
  std::vector<float> rows;
};

// The packing of rows [first, first + n) of expert `expert`'s x [., k] in call `call`, or
// nullptr when none of them is zero (the unit then reads x in place).
const PackedRows* PackNonzeroRows(uint64_t call, int64_t expert, int64_t first, const float* x,
                                  int64_t n, int64_t k) {
  thread_local PackedRows packed;
  if (packed.call != call || packed.expert != expert || packed.first != first) {
    packed.call = call;
    packed.expert = expert;
    packed.first = first;
    packed.kept.resize(n);
    packed.live = NonzeroRows(x, n, k, packed.kept.data());
    if (packed.live < n) {
      packed.rows.resize(packed.live * k);
      for (int64_t i = 0; i < packed.live; ++i)
        std::memcpy(packed.rows.data() + i * k, x + packed.kept[i] * k, k * sizeof(float));
    }
  }
  return packed.live < n ? &packed : nullptr;
}

// Rows [0, live) of y [n, width] (row stride y_row) hold the kept rows' products in order:
// each is moved to its own row, last first (kept[i] >= i, so no row is overwritten before it
// moves), and every other row is set to zero.
void SpreadRows(float* y, int64_t y_row, int64_t width, const int32_t* kept, int64_t live,
                int64_t n) {
  auto zero_rows = [&](int64_t from, int64_t to) {
    for (int64_t r = from; r < to; ++r) std::memset(y + r * y_row, 0, width * sizeof(float));
  };
  int64_t end = n;  // rows [end, n) are final
  for (int64_t i = live - 1; i >= 0; --i) {
    const int64_t row = kept[i];
    zero_rows(row + 1, end);
    if (row != i) std::memcpy(y + row * y_row, y + i * y_row, width * sizeof(float));
    end = row;
  }
  zero_rows(0, end);
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

// Rows [0, depth) x columns [0, width <= kPanel) of b copied into a per-thread panel
// [depth][kPanel]: the tiles then read it sequentially from cache instead of one row per depth
// step at b's stride. b[p, j] is at b + p * b_row, or, given transposed (b_row = 1: the input
// gradient's g), at b + j * b_col. The panel's rows lie in distinct pages and are prefetched
// ahead; the transposed panel's columns are rows of b, read side by side.
const float* PackPanel(int64_t depth, int64_t width, const float* b, int64_t b_row,
                       int64_t b_col) {
  thread_local std::vector<float> buffer;
  if (static_cast<int64_t>(buffer.size()) < depth * kPanel) buffer.resize(depth * kPanel);
  float* out = buffer.data();
  if (b_row == 1) {
    for (int64_t p = 0; p < depth; ++p)
      for (int64_t j = 0; j < width; ++j) out[p * kPanel + j] = b[j * b_col + p];
    return out;
  }
  constexpr int64_t kAhead = 16;  // rows
  for (int64_t p = 0; p < depth; ++p) {
    if (p + kAhead < depth)
      for (int64_t j = 0; j < width; j += 16) __builtin_prefetch(b + (p + kAhead) * b_row + j);
    std::memcpy(out + p * kPanel, b + p * b_row, width * 4);
  }
  return out;
}

// The forward's unit shape: columns of w per unit, and whether w is read in place. With few
// rows (at most kStreamedRows) and a wide w (a weight matrix, at least kWideColumns), a panel
// packed over the whole depth is used by too few rows to repay its copy: w is read in place,
// kInPlaceDepth rows at a time across the unit's columns, in tiles of kNarrowTileRows x
// kNarrowTileCols that add each block's product into y (the chunk narrows only to keep an
// expert's y chunk within 1 MiB of L2). The first tile of each column step prefetches w
// kAheadFloats further along its rows when they are a page or longer, else the next block's
// rows (a short row ends before the prefetch pays). Otherwise w is packed one kPanel-column
// panel at a time over the whole depth, which also keeps the long row streams of the input
// gradient's left operand (the weight rows) whole.
// Measured at 128 experts (32 rows, d 512/2048) on 2 cores, per product: w [512, 2048] in
// place 42-43 ms (prefetching the next block 55-57, packed 64 rows at a time 50-53, one panel
// 62-68), w [2048, 512] in place 43-47 ms (prefetching along the rows 47-48, packed by 64 rows
// 53-57). At 128 and 512 rows in place was slower (40-48 against 40 ms).
constexpr int64_t kWideColumns = 8 * kPanel;
constexpr int64_t kStreamedRows = 32;
constexpr int64_t kInPlaceDepth = 32;

struct ForwardShape {
  int64_t chunk;
  bool in_place;
};

ForwardShape ForwardUnits(int64_t rows, int64_t cols) {
  if (cols < kWideColumns || rows > kStreamedRows) return {kPanel, false};
  int64_t chunk = cols;
  while (chunk > kPanel && rows * chunk * 4 > (int64_t{1} << 20))
    chunk = std::max(kPanel, (chunk / 2 + kPanel - 1) / kPanel * kPanel);
  return {chunk, true};
}

// nn: y[e] = x[e] . w[e], or nt (w_transposed): y[e] = x[e] . w[e]^T with w [E, N, K];
// unit = (expert, column chunk, block of rows). Rows are split into blocks only when experts x
// chunks would leave threads idle (few experts, or the input gradient's output of one or two
// panels).
ffi::Error Product(ffi::ThreadPool& pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                   ffi::ResultBuffer<ffi::F32> y, bool w_transposed) {
  auto xd = x.dimensions(), wd = w.dimensions();
  if (auto e = w_transposed
                   ? CheckOperands(xd, wd, 2, 2,
                                   "moe_expert_matmul_nt: w [E, K, N] and g [E, M, N] expected")
                   : CheckOperands(xd, wd, 2, 1,
                                   "moe_expert_matmul_nn: x [E, M, K] and w [E, K, N] expected");
      e.failure())
    return e;
  const int64_t experts = xd[0], rows = xd[1], k = xd[2], cols = wd[w_transposed ? 1 : 2];
  // nt's w^T (the input gradient's g^T) is small, and its rows are w's columns: packed.
  const ForwardShape shape = w_transposed ? ForwardShape{kPanel, false} : ForwardUnits(rows, cols);
  const int64_t depth_block = shape.in_place ? kInPlaceDepth : k;
  const int64_t chunks = (cols + shape.chunk - 1) / shape.chunk;
  const int64_t wanted = (4 * pool.num_threads() + experts * chunks - 1) / (experts * chunks);
  const int64_t most = (rows + 8 * kOuterRows - 1) / (8 * kOuterRows);  // >= 8 tiles a block
  const int64_t split = std::max<int64_t>(1, std::min(wanted, most));
  const int64_t tiles = ((rows + split - 1) / split + kOuterRows - 1) / kOuterRows;
  const int64_t block_rows = tiles * kOuterRows;
  const int64_t blocks = (rows + block_rows - 1) / block_rows;
  const int64_t tile_cols = shape.in_place ? kNarrowTileCols : kPanel;
  const int64_t tile_rows =
      shape.in_place || cols <= kNarrowTileCols ? kNarrowTileRows : kOuterRows;
  // The tiles prefetch their rows of x kAheadFloats ahead, or, when these are the input
  // gradient's weight rows and shorter than a page, the next tile's rows (a short row ends
  // before the prefetch pays): g.wo^T [2048, 512] at 128 experts 42-44 -> 37-38 ms.
  const int64_t x_ahead =
      w_transposed && k < kLongRowColumns ? tile_rows * k : kAheadFloats;
  // w[p, j] of an expert is at w_e + p * w_row + j * w_col.
  const int64_t w_row = w_transposed ? 1 : cols, w_col = w_transposed ? k : 1;
  const float* xp = x.typed_data();
  const float* wp = w.typed_data();
  float* yp = y->typed_data();
  static std::atomic<uint64_t> calls{0};
  const uint64_t call = calls.fetch_add(1);
  ParallelFor(pool, experts * chunks * blocks, [=](int64_t u) {
    const int64_t e = u / (chunks * blocks), c0 = (u / blocks % chunks) * shape.chunk;
    const int64_t first = (u % blocks) * block_rows;
    const int64_t unit_rows = std::min(rows, first + block_rows) - first;
    const int64_t width = std::min(shape.chunk, cols - c0);
    // The unit's rows of x and y; the forward runs over x's nonzero rows only (see
    // PackNonzeroRows) and spreads their products to their rows of y at the end.
    const float* xu = xp + (e * rows + first) * k;
    float* yu = yp + (e * rows + first) * cols + c0;
    const PackedRows* packed =
        w_transposed ? nullptr : PackNonzeroRows(call, e, first, xu, unit_rows, k);
    const int64_t live = packed ? packed->live : unit_rows;
    if (packed) xu = packed->rows.data();
    for (int64_t k0 = 0; k0 < k; k0 += depth_block) {
      const int64_t depth = std::min(depth_block, k - k0);
      const float* block = wp + e * k * cols + k0 * w_row + c0 * w_col;
      const Output mode = k0 > 0 ? Output::kAdd : Output::kWrite;
      if (shape.in_place) {
        const int64_t next_rows = std::min(depth, k - k0 - depth);
        const int64_t ahead = cols >= kLongRowColumns ? kAheadFloats : next_rows * cols;
        for (int64_t col = 0; col < width; col += tile_cols) {
          for (int64_t r = 0; r < live; r += tile_rows) {
            const int n = static_cast<int>(std::min(tile_rows, live - r));
            OuterBlock(n, std::min(tile_cols, width - col), depth, nullptr, xu + r * k + k0, k,
                       1, kAheadFloats, block + col, cols, r == 0 ? ahead : 0,
                       yu + r * cols + col, cols, mode);
          }
        }
        continue;
      }
      for (int64_t col = 0; col < width && live > 0; col += kPanel) {
        const int64_t panel_width = std::min(kPanel, width - col);
        const float* panel = PackPanel(depth, panel_width, block + col * w_col, w_row, w_col);
        for (int64_t r = 0; r < live; r += tile_rows) {
          const int n = static_cast<int>(std::min(tile_rows, live - r));
          OuterBlock(n, panel_width, depth, nullptr, xu + r * k + k0, k, 1, x_ahead, panel,
                     kPanel, 0, yu + r * cols + col, cols, mode);
        }
      }
    }
    if (packed) SpreadRows(yu, cols, width, packed->kept.data(), live, unit_rows);
  });
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                   ffi::ResultBuffer<ffi::F32> y) {
  return Product(pool, x, w, y, false);
}

ffi::Error InputGradient(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> w,
                         ffi::Buffer<ffi::F32> g, ffi::ResultBuffer<ffi::F32> dx_t) {
  return Product(pool, w, g, dx_t, true);
}

// tn: dw[e] = x[e]^T . g[e]; unit = (expert, block of weight rows), all columns inside, so
// each unit writes whole rows of dw. dw (512 MiB a weight at 128 experts, d 512/2048) is far
// larger than the caches, so whoever reads it next reads it from memory. Rows shorter than a
// page (kLongRowColumns) are six short write streams per tile that the prefetchers do not
// follow, so each tile's stores waited for their lines to be read first; those rows are stored
// non-temporally, without the read. Measured at 128 experts (32 rows) on 2 cores: h^T.g
// [2048, 512] 52-54 -> 41 ms; x^T.g [512, 2048], whose 8 KiB rows stream, went 34-36 -> 37
// ms that way and keeps plain stores.
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
  const bool stream = kStreamAlignment > 1 && cols < kLongRowColumns &&
                      reinterpret_cast<uintptr_t>(dwp) % kStreamAlignment == 0 &&
                      cols * sizeof(float) % kStreamAlignment == 0;
  const Output mode = stream ? Output::kStream : Output::kWrite;
  // Each expert's token rows with a nonzero x (the tiles' depth steps; zero rows add nothing).
  std::vector<int32_t> kept(experts * rows);
  std::vector<int64_t> live(experts);
  int32_t* kept_p = kept.data();
  int64_t* live_p = live.data();
  ParallelFor(pool, experts, [=](int64_t e) {
    live_p[e] = NonzeroRows(xp + e * rows * k, rows, k, kept_p + e * rows);
  });
  ParallelFor(pool, experts * blocks, [=](int64_t u) {
    const int64_t e = u / blocks, i = (u % blocks) * kOuterRows;
    const int n = static_cast<int>(std::min<int64_t>(kOuterRows, k - i));
    const float* xe = xp + e * rows * k + i;
    const float* ge = gp + e * rows * cols;
    float* dwe = dwp + e * k * cols + i * cols;
    const int32_t* steps = live_p[e] < rows ? kept_p + e * rows : nullptr;
    for (int64_t col = 0; col < cols; col += kPanel) {
      const int64_t width = std::min(kPanel, cols - col);
      OuterBlock(n, width, live_p[e], steps, xe, 1, k, 0, ge + col, cols, 0, dwe + col, cols,
                 mode);
    }
    if (stream) StreamFence();
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
