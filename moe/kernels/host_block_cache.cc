// A malloc interposer (LD_PRELOAD) that keeps large freed blocks mapped and hands them out
// again, so that a program which allocates and frees the same large buffers every step (XLA:CPU
// does, for each step's outputs and temporaries) stops taking a page fault per 4 KiB of them.
//
// glibc serves every block above its mmap threshold (at most 32 MiB) with a fresh mmap and
// unmaps it on free; the next step's buffer is then new memory that the kernel faults in and
// zeroes page by page, which on a small machine costs several times the write itself. Here,
// requests of at least kThreshold bytes are carved from one reserved address range in 2 MiB
// grains (transparent huge pages are asked for), and a freed block waits in a table for the
// next request of its size (up to twice as large). Everything smaller goes to glibc unchanged,
// with glibc's per-thread arenas, so small allocations do not serialize on this lock.
//
// Idle blocks are kept up to a quarter of physical memory; past that the pages of the blocks
// freed longest ago are returned to the system (madvise DONTNEED) while their address ranges
// stay in the table. Oldest first, not the block just freed: a program that moves on to new
// shapes (a benchmark's next configuration, an evaluation after training) leaves idle blocks
// that nothing will ask for again, and returning each newly freed block instead would fault
// the pages of every step's buffers again from then on (measured: 320 -> 390-430 ms steps).
// Pointers are ours exactly when they lie in the reserved range, which is how free, realloc and
// malloc_usable_size tell our blocks from glibc's. Built and preloaded by moe/host_memory.py.

#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

extern "C" {
void *__libc_malloc(size_t);
void __libc_free(void *);
void *__libc_calloc(size_t, size_t);
void *__libc_realloc(void *, size_t);
void *__libc_memalign(size_t, size_t);
}

namespace {

constexpr size_t kThreshold = size_t{32} << 20;  // glibc's largest mmap threshold
constexpr size_t kGrain = size_t{2} << 20;       // one huge page
constexpr size_t kReserve = size_t{1} << 40;     // address space only (PROT_NONE, NORESERVE)
constexpr int kMaxBlocks = 4096;

struct Block {
  char *start;
  size_t size;
  bool used;
  bool dirty;  // written since its pages were last fresh (calloc must clear it)
  uint64_t freed;  // when it was last freed, in releases: the oldest idle block goes first
};

pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
char *base = nullptr;
size_t top = 0;
int state = 0;  // 0: not reserved yet, 1: reserved, -1: reservation failed (glibc serves all)
Block blocks[kMaxBlocks];
int num_blocks = 0;
size_t idle_bytes = 0;  // freed blocks whose pages are still resident
size_t idle_limit = 0;
size_t reused = 0;
uint64_t releases = 0;

void Reserve() {
  void *range = mmap(nullptr, kReserve, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                     -1, 0);
  if (range == MAP_FAILED) {
    state = -1;
    return;
  }
  base = static_cast<char *>(range);
  long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
  idle_limit = pages > 0 && page > 0 ? size_t(pages) * size_t(page) / 4 : size_t{1} << 30;
  state = 1;
}

bool Ours(const void *p) {
  return base != nullptr && static_cast<const char *>(p) >= base &&
         static_cast<const char *>(p) < base + kReserve;
}

// A block of at least n bytes, or nullptr (then glibc serves the request). `fresh`, when
// given, says whether its pages read as zeros.
void *Acquire(size_t n, bool *fresh = nullptr) {
  size_t size = (n + kGrain - 1) & ~(kGrain - 1);
  void *out = nullptr;
  pthread_mutex_lock(&lock);
  if (state == 0) Reserve();
  if (state == 1) {
    int best = -1;
    for (int i = 0; i < num_blocks; ++i) {
      const Block &b = blocks[i];
      if (!b.used && b.size >= size && b.size <= 2 * size &&
          (best < 0 || b.size < blocks[best].size)) {
        best = i;
      }
    }
    if (best >= 0) {
      Block &b = blocks[best];
      b.used = true;
      if (b.dirty) idle_bytes -= b.size;
      if (fresh != nullptr) *fresh = !b.dirty;
      b.dirty = true;
      ++reused;
      out = b.start;
    } else if (num_blocks < kMaxBlocks && top + size <= kReserve) {
      char *start = base + top;
      if (mprotect(start, size, PROT_READ | PROT_WRITE) == 0) {
        madvise(start, size, MADV_HUGEPAGE);
        top += size;
        blocks[num_blocks++] = Block{start, size, true, true, 0};
        if (fresh != nullptr) *fresh = true;
        out = start;
      }
    }
  }
  pthread_mutex_unlock(&lock);
  return out;
}

// Past the idle limit, the pages of the idle blocks freed longest ago go back to the system
// (zero on reuse). Called with the lock held.
void TrimIdle() {
  while (idle_bytes > idle_limit) {
    int oldest = -1;
    for (int i = 0; i < num_blocks; ++i) {
      const Block &b = blocks[i];
      if (!b.used && b.dirty && (oldest < 0 || b.freed < blocks[oldest].freed)) oldest = i;
    }
    if (oldest < 0) return;
    Block &b = blocks[oldest];
    madvise(b.start, b.size, MADV_DONTNEED);
    b.dirty = false;
    idle_bytes -= b.size;
  }
}

// The block starting at p: its size, and (release) back to the table.
size_t Lookup(void *p, bool release) {
  size_t size = 0;
  pthread_mutex_lock(&lock);
  for (int i = 0; i < num_blocks; ++i) {
    Block &b = blocks[i];
    if (b.start != p) continue;
    size = b.size;
    if (release && b.used) {
      b.used = false;
      b.freed = ++releases;
      idle_bytes += b.size;
      TrimIdle();
    }
    break;
  }
  pthread_mutex_unlock(&lock);
  return size;
}

size_t LibcUsableSize(void *p) {
  static size_t (*usable)(void *) =
      reinterpret_cast<size_t (*)(void *)>(dlsym(RTLD_NEXT, "malloc_usable_size"));
  return usable(p);
}

// fork(): the child gets this table and its memory; the lock must not be held across it.
void Prepare() { pthread_mutex_lock(&lock); }
void Resume() { pthread_mutex_unlock(&lock); }
[[maybe_unused]] const int kAtFork = pthread_atfork(Prepare, Resume, Resume);

}  // namespace

extern "C" {

// Nonzero while this library serves large blocks: loaded, and its address range reserved (or
// not needed yet). moe/host_memory.py calls it.
int moe_host_block_cache_active() { return state >= 0; }

// [blocks, bytes reserved for blocks, idle resident bytes, requests served by reuse].
void moe_host_block_cache_stats(size_t out[4]) {
  pthread_mutex_lock(&lock);
  out[0] = num_blocks;
  out[1] = top;
  out[2] = idle_bytes;
  out[3] = reused;
  pthread_mutex_unlock(&lock);
}

// Sets the idle limit (bytes of freed blocks kept resident; default a quarter of physical
// memory) and trims to it at once. Tests use it to reach the limit with small blocks.
void moe_host_block_cache_set_idle_limit(size_t bytes) {
  pthread_mutex_lock(&lock);
  if (state == 0) Reserve();
  idle_limit = bytes;
  TrimIdle();
  pthread_mutex_unlock(&lock);
}

void *malloc(size_t n) {
  if (n >= kThreshold) {
    if (void *p = Acquire(n)) return p;
  }
  return __libc_malloc(n);
}

void free(void *p) {
  if (p == nullptr) return;
  if (Ours(p)) {
    Lookup(p, true);
    return;
  }
  __libc_free(p);
}

void *calloc(size_t count, size_t each) {
  size_t n;
  if (__builtin_mul_overflow(count, each, &n)) {
    errno = ENOMEM;
    return nullptr;
  }
  bool fresh;
  if (n >= kThreshold) {
    if (void *p = Acquire(n, &fresh)) {
      if (!fresh) memset(p, 0, n);
      return p;
    }
  }
  return __libc_calloc(count, each);
}

void *realloc(void *p, size_t n) {
  if (p != nullptr && Ours(p)) {
    size_t old = Lookup(p, false);
    if (n <= old) return p;
    void *q = malloc(n);
    if (q == nullptr) return nullptr;
    memcpy(q, p, old);
    free(p);
    return q;
  }
  if (n >= kThreshold) {
    if (void *q = Acquire(n)) {
      if (p != nullptr) {
        size_t old = LibcUsableSize(p);
        memcpy(q, p, old < n ? old : n);
        __libc_free(p);
      }
      return q;
    }
  }
  return __libc_realloc(p, n);
}

size_t malloc_usable_size(void *p) {
  if (p == nullptr) return 0;
  return Ours(p) ? Lookup(p, false) : LibcUsableSize(p);
}

int posix_memalign(void **out, size_t alignment, size_t n) {
  if (n >= kThreshold && alignment <= kGrain) {
    if (void *p = Acquire(n)) {
      *out = p;
      return 0;
    }
  }
  void *p = __libc_memalign(alignment, n);
  if (p == nullptr) return ENOMEM;
  *out = p;
  return 0;
}

void *aligned_alloc(size_t alignment, size_t n) {
  if (n >= kThreshold && alignment <= kGrain) {
    if (void *p = Acquire(n)) return p;
  }
  return __libc_memalign(alignment, n);
}

void *memalign(size_t alignment, size_t n) { return aligned_alloc(alignment, n); }

}  // extern "C"
